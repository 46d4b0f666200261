"""The statistics an audit reports, in plain Python so every number can be recomputed
from the raw items in report.json with the formulas written here and in docs/audit.md."""

from __future__ import annotations

import math
import random
from collections import Counter
from collections.abc import Sequence

#: the normal quantile of a two-sided 95% interval
Z95 = 1.959963984540054


def wilson(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval for a proportion k/n (95% by default); (0, 1) when n is 0.

    Chosen over the normal (Wald) interval because it stays inside [0, 1] and keeps its
    coverage at the small n and extreme shares a probe suite gives.
    """
    if n == 0:
        return 0.0, 1.0
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def proportion(k: int, n: int) -> dict:
    lo, hi = wilson(k, n)
    return {"k": k, "n": n, "share": k / n if n else None, "ci95": [lo, hi], "ci_method": "wilson"}


def mean_summary(values: Sequence[float]) -> dict:
    """Mean, sample standard deviation, standard error and a normal 95% interval of the mean."""
    n = len(values)
    if n == 0:
        return {"n": 0, "mean": None, "sd": None, "se": None, "ci95": None}
    mean = math.fsum(values) / n
    if n < 2:
        return {"n": n, "mean": mean, "sd": None, "se": None, "ci95": None}
    sd = math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (n - 1))
    se = sd / math.sqrt(n)
    return {"n": n, "mean": mean, "sd": sd, "se": se, "ci95": [mean - Z95 * se, mean + Z95 * se]}


def entropy_bits(counts: Counter) -> float:
    total = sum(counts.values())
    return -math.fsum(c / total * math.log2(c / total) for c in counts.values() if c)


def jensen_shannon(distributions: Sequence[Counter]) -> float:
    """Jensen-Shannon divergence (bits, in [0, log2 k]) of k count distributions, equal weights:
    H(mean of the distributions) - mean of their entropies. 0 for identical distributions."""
    non_empty = [c for c in distributions if sum(c.values())]
    if len(non_empty) < 2:
        return 0.0
    mixture: Counter = Counter()
    for c in non_empty:
        total = sum(c.values())
        for word, count in c.items():
            mixture[word] += count / total / len(non_empty)
    return max(0.0, entropy_bits(mixture) - math.fsum(entropy_bits(c) for c in non_empty) / len(non_empty))


def permutation_pvalue(
    samples: Sequence[Sequence[str]],
    groups: Sequence[int],
    permutations: int = 200,
    seed: int = 0,
    blocks: Sequence[int] | None = None,
) -> float:
    """How often shuffling the group labels of the samples gives a Jensen-Shannon divergence at
    least the observed one: (1 + #{>=}) / (1 + permutations). Small values say the groups'
    word distributions differ by more than sampling noise explains.

    ``blocks``: labels are shuffled only among samples of the same block. Samples drawn with
    one seed for every group are a block: without a group effect they are exchangeable with
    each other, not with samples of other seeds.
    """
    k = max(groups) + 1

    def divergence(labels: Sequence[int]) -> float:
        counts = [Counter() for _ in range(k)]
        for words, g in zip(samples, labels):
            counts[g].update(words)
        return jensen_shannon(counts)

    observed = divergence(groups)
    rng = random.Random(seed)
    members: dict[int, list[int]] = {}
    for i, b in enumerate(blocks if blocks is not None else [0] * len(groups)):
        members.setdefault(b, []).append(i)
    labels = list(groups)
    at_least = 0
    for _ in range(permutations):
        for idx in members.values():
            values = [labels[i] for i in idx]
            rng.shuffle(values)
            for i, v in zip(idx, values):
                labels[i] = v
        at_least += divergence(labels) >= observed - 1e-12
    return (1 + at_least) / (1 + permutations)


def total_variation(distributions: Sequence[dict[str, float]]) -> float:
    """The largest total-variation distance between any two of the label distributions."""
    worst = 0.0
    for i in range(len(distributions)):
        for j in range(i + 1, len(distributions)):
            a, b = distributions[i], distributions[j]
            worst = max(worst, 0.5 * math.fsum(abs(a.get(x, 0.0) - b.get(x, 0.0)) for x in set(a) | set(b)))
    return worst
