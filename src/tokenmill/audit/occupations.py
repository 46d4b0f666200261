"""The occupations probe: how much likelier a model makes each occupation after one group's
subject ("my son", "he") than after the other's ("my daughter", "she").

Each (template, subject pair, occupation) gives one comparison: the log-ratio
``log p(occupation | group A sentence) - log p(occupation | group B sentence)``.
- causal LM: ``log p`` is the summed log-probability of the occupation's tokens after the
  text before it (the next words), so a multi-token occupation is scored exactly.
- masked LM: ``log p`` is the pseudo-log-likelihood of the occupation's tokens in the whole
  sentence, each token masked on its own with the rest visible; for a one-token occupation
  that is the fill-mask log-probability at the mask. A multi-token occupation's PLL is
  inflated by its own visible pieces, the same for both groups of a comparison, so the
  log-ratio stays comparable; the report counts those occupations.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from typing import Any

from tokenmill.audit.models import CAUSAL, AuditModel, causal_continuations, masked_spans
from tokenmill.audit.stats import mean_summary, proportion
from tokenmill.audit.suites import Suite

TOP_K = 10

METHODS = {
    CAUSAL: "summed log-probability of the occupation's tokens after the text before it",
    "masked-lm": (
        "pseudo-log-likelihood of the occupation's tokens in the full sentence, each token masked "
        "on its own (equals the fill-mask log-probability for a one-token occupation)"
    ),
}


def _sentence(template: str, term: str, occupation: dict) -> tuple[str, int]:
    """The sentence and where the occupation starts in it."""
    if template.startswith("{subject}"):
        term = term[:1].upper() + term[1:]
    marker = "\x00"
    text = template.format(subject=term, article=occupation["article"], occupation=marker)
    start = text.index(marker)
    return text.replace(marker, occupation["word"]), start


def expand(suite: Suite, limit: int | None) -> list[dict[str, Any]]:
    """One item per (template, subject pair, occupation, group), in a fixed order."""
    occupations = suite.by_type["occupation"][:limit]
    items = []
    for t in suite.by_type["template"]:
        for s in suite.by_type["subjects"]:
            for o in occupations:
                for g in suite.header["groups"]:
                    text, start = _sentence(t["text"], s["terms"][g], o)
                    items.append(
                        {
                            "template": t["id"],
                            "subjects": s["id"],
                            "occupation": o["word"],
                            "stereotype": o.get("stereotype"),
                            "group": g,
                            "text": text,
                            "span": [start, start + len(o["word"])],
                        }
                    )
    return items


def run(
    suite: Suite, model: AuditModel, *, limit: int | None, batch_size: int, progress: Callable[[int], None]
) -> dict[str, Any]:
    items = expand(suite, limit)
    if model.kind == CAUSAL:
        pairs = []
        for it in items:
            before = it["text"][: it["span"][0]]
            context = before.rstrip()
            it["context"] = context
            pairs.append((context, before[len(context) :] + it["occupation"]))
        scores = causal_continuations(model, pairs, batch_size, progress)
    else:
        scores = masked_spans(model, [(it["text"], tuple(it["span"])) for it in items], batch_size, progress)
    for it, lp in zip(items, scores):
        it["token_logprobs"] = lp
        it["tokens"] = len(lp)
        it["logprob"] = sum(lp)
    return {
        "groups": list(suite.header["groups"]),
        "method": METHODS[model.kind],
        "items": items,
        "top_predictions": top_predictions(suite, model, limit_templates=None),
    }


def top_predictions(suite: Suite, model: AuditModel, limit_templates: int | None) -> list[dict[str, Any]]:
    """The model's own most likely words at the occupation's place (the whole vocabulary,
    not only the suite's occupations): the fill-mask example of the seed notes."""
    blank = {"word": "\x01", "article": "a"}
    rows = []
    for t in suite.by_type["template"][:limit_templates]:
        for s in suite.by_type["subjects"]:
            for g in suite.header["groups"]:
                text, start = _sentence(t["text"], s["terms"][g], blank)
                rows.append(
                    {"template": t["id"], "subjects": s["id"], "group": g, "text": text, "start": start}
                )
    if model.kind == CAUSAL:
        from tokenmill.eval.loglik import next_token_topk

        tok = model.tokenizer
        contexts = [
            model.start_ids + tok.encode(r["text"][: r["start"]].rstrip(), add_special_tokens=False)
            for r in rows
        ]
        for r, top in zip(rows, next_token_topk(model.handle, contexts, TOP_K)):
            r["prompt"] = r["text"][: r["start"]].rstrip()
            r["predictions"] = [{"token": tok.decode([i]), "logprob": lp} for i, lp in top]
    else:
        import math

        pipe = model.handle
        for r in rows:
            r["prompt"] = r["text"].replace("\x01", pipe.mask_token)
        results = pipe([r["prompt"] for r in rows], top_k=TOP_K)
        for r, top in zip(rows, results):
            r["predictions"] = [{"token": p["token_str"], "logprob": math.log(p["score"])} for p in top]
    for r in rows:
        del r["text"], r["start"]
    return rows


def aggregate(raw: dict[str, Any]) -> dict[str, Any]:
    """Every summary of the occupations probe, from the raw items alone."""
    a, b = raw["groups"]
    lp: dict[tuple[str, str, str], dict[str, float]] = defaultdict(dict)
    meta: dict[str, dict[str, Any]] = {}
    for it in raw["items"]:
        lp[(it["occupation"], it["template"], it["subjects"])][it["group"]] = it["logprob"]
        m = meta.setdefault(it["occupation"], {"stereotype": it["stereotype"], "tokens": it["tokens"]})
        m["tokens"] = max(m["tokens"], it["tokens"])
    per_occ: dict[str, list[float]] = defaultdict(list)
    per_group: dict[tuple[str, str], list[float]] = defaultdict(list)
    agree_items = n_items = 0
    for (occ, _t, _s), by_group in lp.items():
        per_occ[occ].append(by_group[a] - by_group[b])
        for g in (a, b):
            per_group[(occ, g)].append(by_group[g])
        st = meta[occ]["stereotype"]
        if st is not None:
            other = b if st == a else a
            n_items += 1
            agree_items += by_group[st] > by_group[other]
    occupations = []
    for occ, diffs in per_occ.items():
        s = mean_summary(diffs)
        occupations.append(
            {
                "occupation": occ,
                "stereotype": meta[occ]["stereotype"],
                "tokens": meta[occ]["tokens"],
                "log_ratio": s,
                "share_favouring_" + a: sum(d > 0 for d in diffs) / len(diffs),
                "mean_logprob": {g: mean_summary(per_group[(occ, g)])["mean"] for g in (a, b)},
            }
        )
    occupations.sort(key=lambda o: o["log_ratio"]["mean"], reverse=True)
    labelled = [o for o in occupations if o["stereotype"] is not None]
    agree_occ = sum((o["log_ratio"]["mean"] > 0) == (o["stereotype"] == a) for o in labelled)
    by_label = {
        str(label): mean_summary([o["log_ratio"]["mean"] for o in occupations if o["stereotype"] == label])
        for label in (a, b, None)
    }
    gap = None
    if by_label[a]["n"] and by_label[b]["n"]:
        gap = by_label[a]["mean"] - by_label[b]["mean"]
    top = {
        g: [
            {"occupation": o["occupation"], "mean_logprob": o["mean_logprob"][g]}
            for o in sorted(occupations, key=lambda o: o["mean_logprob"][g], reverse=True)[:5]
        ]
        for g in (a, b)
    }
    return {
        "groups": [a, b],
        "log_ratio": f"log p(occupation | {a} subject) - log p(occupation | {b} subject), in nats",
        "comparisons": sum(len(d) for d in per_occ.values()),
        "occupations": occupations,
        "stereotype_agreement_occupations": proportion(agree_occ, len(labelled)),
        "stereotype_agreement_comparisons": proportion(agree_items, n_items),
        "mean_log_ratio_by_stereotype": by_label,
        "stereotype_gap": gap,
        "mean_abs_log_ratio": mean_summary([abs(o["log_ratio"]["mean"]) for o in occupations]),
        "multi_token_occupations": sorted(o["occupation"] for o in occupations if o["tokens"] > 1),
        "top_occupations": top,
    }
