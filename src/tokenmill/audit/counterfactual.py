"""The counterfactual probe: one prompt, the group term swapped, several samples per group.

Every group's samples use the same seeds (seed, seed + 1, ...), so two groups' i-th samples
draw the same random numbers and differ only through the group term (common random
numbers). What is compared, per prompt and group: the words generated (stop words and the
group terms left out), the length in tokens, and the labels of a text classifier when one
is given. The word distributions are compared with the Jensen-Shannon divergence and a
permutation test that shuffles the group labels among the samples of one seed (the design's
pairs), which says how much of the divergence sampling noise explains.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable
from typing import Any

from tokenmill.audit.models import AuditModel
from tokenmill.audit.stats import jensen_shannon, mean_summary, permutation_pvalue, total_variation
from tokenmill.audit.suites import Suite

PERMUTATIONS = 200
TOP_WORDS = 8
#: prompts generated per engine call (the progress bar moves between calls)
_CHUNK = 8

# Function words carry little of what a continuation says about a group.
STOPWORDS = frozenset(
    """a an the and or but if then so of to in on at by for with from as into onto about over under
    after before than that this these those there here is are was were be been being am do does did
    has have had having i me my we us our you your he him his she her it its they them their who
    whom which what when where why how not no all any some each very just also too can could will
    would shall should may might must up out off down again more most such own same only s t
    """.split()
)
_WORD = re.compile(r"[a-z]+(?:'[a-z]+)?")


def words(text: str, exclude: frozenset[str] = frozenset()) -> list[str]:
    """Lower-case words of ``text`` without stop words and the ``exclude`` words."""
    return [w for w in _WORD.findall(text.lower()) if w not in STOPWORDS and w not in exclude]


def run(
    suite: Suite,
    model: AuditModel,
    *,
    limit: int | None,
    samples: int,
    seed: int,
    classifier: Any | None,
    progress: Callable[[int], None],
) -> dict[str, Any]:
    from tokenmill import SamplingParams

    gen = suite.header["generation"]
    params = SamplingParams(
        n=samples,
        seed=seed,
        max_tokens=gen["max_tokens"],
        temperature=gen["temperature"],
        top_p=gen.get("top_p", 1.0),
    )
    jobs = [(r, g) for r in suite.records[:limit] for g in r["groups"]]
    items: list[dict[str, Any]] = []
    for start in range(0, len(jobs), _CHUNK):
        chunk = jobs[start : start + _CHUNK]
        prompts = [r["template"].replace("{group}", g) for r, g in chunk]
        outputs = model.llm.generate(prompts, params)
        for (r, g), prompt, out in zip(chunk, prompts, outputs):
            for i, c in enumerate(out.outputs):
                items.append(
                    {
                        "id": r["id"],
                        "category": r["category"],
                        "group": g,
                        "prompt": prompt,
                        "sample": i,
                        "seed": seed + i,
                        "completion": c.text,
                        "tokens": len(c.token_ids),
                        "finish_reason": c.finish_reason,
                    }
                )
        progress(len(chunk))
    if classifier is not None:
        _classify(items, classifier)
    return {
        "generation": {**gen, "samples": samples, "seed": seed},
        "groups": {r["id"]: r["groups"] for r in suite.records[:limit]},
        "classifier": None if classifier is None else getattr(classifier.loaded, "source", str(classifier)),
        "items": items,
    }


def _classify(items: list[dict[str, Any]], classifier: Any) -> None:
    """Label each completion (not the prompt, which names the group) with every label's score."""
    texts = [(k, it["completion"].strip()) for k, it in enumerate(items)]
    texts = [(k, t) for k, t in texts if t]
    for it in items:
        it["sentiment"] = None  # an empty completion has nothing to classify
    if not texts:
        return
    results = classifier([t for _, t in texts], top_k=None)
    for (k, _), scores in zip(texts, results):
        best = max(scores, key=lambda s: s["score"])
        items[k]["sentiment"] = {"label": best["label"], "scores": {s["label"]: s["score"] for s in scores}}


def aggregate(raw: dict[str, Any]) -> dict[str, Any]:
    """Per prompt: each group's words, lengths and labels, and how far apart the groups are."""
    seed = raw["generation"]["seed"]
    prompts = []
    for pid, groups in raw["groups"].items():
        exclude = frozenset(w for g in groups for w in _WORD.findall(g.lower()))
        per_group, samples, labels, blocks = {}, [], [], []
        for gi, g in enumerate(groups):
            mine = [it for it in raw["items"] if it["id"] == pid and it["group"] == g]
            bags = [words(it["completion"], exclude) for it in mine]
            counts = Counter(w for bag in bags for w in bag)
            in_samples = Counter(w for bag in bags for w in set(bag))
            classified = [it["sentiment"]["label"] for it in mine if it.get("sentiment")]
            per_group[g] = {
                "samples": len(mine),
                "tokens": mean_summary([it["tokens"] for it in mine]),
                "words_per_sample": mean_summary([len(b) for b in bags]),
                "top_words": [
                    {"word": w, "count": c, "samples": in_samples[w]}
                    for w, c in sorted(counts.items(), key=lambda x: (-x[1], x[0]))[:TOP_WORDS]
                ],
                "counts": dict(counts),
                "labels": (
                    {lab: c / len(classified) for lab, c in sorted(Counter(classified).items())}
                    if classified
                    else None
                ),
                "classified": len(classified),
            }
            samples.extend(bags)
            labels.extend([gi] * len(bags))
            blocks.extend(it["sample"] for it in mine)
        means = [s["tokens"]["mean"] for s in per_group.values() if s["tokens"]["n"]]
        dists = [s["labels"] for s in per_group.values() if s["labels"]]
        jsd = jensen_shannon([Counter(s["counts"]) for s in per_group.values()])
        prompts.append(
            {
                "id": pid,
                "groups": per_group,
                "jensen_shannon_bits": jsd,
                "permutation_p": permutation_pvalue(samples, labels, PERMUTATIONS, seed, blocks)
                if samples
                else None,
                "permutations": PERMUTATIONS,
                "length_gap_tokens": max(means) - min(means) if means else None,
                "label_total_variation": total_variation(dists) if len(dists) == len(per_group) else None,
            }
        )
    ps = [p["permutation_p"] for p in prompts if p["permutation_p"] is not None]
    return {
        "prompts": prompts,
        "mean_jensen_shannon_bits": mean_summary([p["jensen_shannon_bits"] for p in prompts]),
        "prompts_with_p_below_0.05": {"k": sum(p < 0.05 for p in ps), "n": len(ps)},
    }
