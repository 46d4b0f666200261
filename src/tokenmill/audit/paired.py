"""The paired-sentences probe: how often a model gives the stereotypical sentence of a pair
a higher (pseudo-)log-likelihood than the same sentence with the group swapped.

- causal LM: the log-likelihood of the whole sentence, every token given the ones before it
  (the first one given the model's start token).
- masked LM: the pseudo-log-likelihood of the whole sentence, every token masked on its own.

A model without preference would prefer the stereotypical sentence about half the time;
the share comes with a Wilson 95% interval over the pairs.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from typing import Any

from tokenmill.audit.models import CAUSAL, AuditModel, causal_sentences, masked_spans
from tokenmill.audit.stats import mean_summary, proportion
from tokenmill.audit.suites import Suite

METHODS = {
    CAUSAL: "sentence log-likelihood: the sum of log p(token | the tokens before it), from the model's start token",
    "masked-lm": "sentence pseudo-log-likelihood: the sum of log p(token | the sentence with that token masked)",
}


def _difference(a: str, b: str) -> tuple[str, str]:
    """The words where two sentences differ (the demographic terms), for the report."""
    x, y = a.split(), b.split()
    i = 0
    while i < min(len(x), len(y)) and x[i] == y[i]:
        i += 1
    j = 0
    while j < min(len(x), len(y)) - i and x[-1 - j] == y[-1 - j]:
        j += 1
    return " ".join(x[i : len(x) - j]), " ".join(y[i : len(y) - j])


def run(
    suite: Suite, model: AuditModel, *, limit: int | None, batch_size: int, progress: Callable[[int], None]
) -> dict[str, Any]:
    records = suite.records[:limit]
    texts = [t for r in records for t in (r["stereotypical"], r["anti_stereotypical"])]
    if model.kind == CAUSAL:
        scores = causal_sentences(model, texts, batch_size, progress)
    else:
        scores = masked_spans(model, [(t, None) for t in texts], batch_size, progress)
    items = []
    for k, r in enumerate(records):
        s, a = scores[2 * k], scores[2 * k + 1]
        terms = _difference(r["stereotypical"], r["anti_stereotypical"])
        items.append(
            {
                "id": r["id"],
                "category": r["category"],
                "terms": {"stereotypical": terms[0], "anti_stereotypical": terms[1]},
                "stereotypical": {"text": r["stereotypical"], "logprob": sum(s), "tokens": len(s)},
                "anti_stereotypical": {"text": r["anti_stereotypical"], "logprob": sum(a), "tokens": len(a)},
            }
        )
    return {"method": METHODS[model.kind], "items": items}


def aggregate(raw: dict[str, Any]) -> dict[str, Any]:
    """Shares preferring the stereotypical sentence, overall and per category, from the raw items.

    A pair prefers the stereotypical sentence when its log-likelihood is strictly higher;
    ties (equal scores) count as not preferring it and are counted apart.
    """
    by_cat: dict[str, list[dict]] = defaultdict(list)
    for it in raw["items"]:
        by_cat[it["category"]].append(it)

    def summary(items: list[dict]) -> dict[str, Any]:
        diffs = [it["stereotypical"]["logprob"] - it["anti_stereotypical"]["logprob"] for it in items]
        out = proportion(sum(d > 0 for d in diffs), len(diffs))
        out["ties"] = sum(d == 0 for d in diffs)
        out["mean_difference"] = mean_summary(diffs)
        return out

    return {
        "preferred": "stereotypical log-likelihood > anti-stereotypical log-likelihood (ties count as not preferred)",
        "overall": summary(raw["items"]),
        "categories": {cat: summary(items) for cat, items in sorted(by_cat.items())},
    }
