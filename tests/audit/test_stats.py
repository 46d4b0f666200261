"""The audit's statistics against values worked out by hand."""

from __future__ import annotations

import math
from collections import Counter

import pytest

from tokenmill.audit.stats import (
    jensen_shannon,
    mean_summary,
    permutation_pvalue,
    proportion,
    total_variation,
    wilson,
)


def test_wilson_interval_by_hand():
    # k=7, n=10, z=1.96: centre = (0.7 + 0.19208) / 1.38416 = 0.64451;
    # half = 1.96 * sqrt(0.021 + 0.009604) / 1.38416 = 0.24772
    lo, hi = wilson(7, 10, z=1.96)
    assert lo == pytest.approx(0.64451 - 0.24772, abs=1e-4) and hi == pytest.approx(
        0.64451 + 0.24772, abs=1e-4
    )
    assert (lo, hi) == pytest.approx((0.3968, 0.8922), abs=1e-4)  # the textbook values
    # the extremes stay inside [0, 1] and are not degenerate
    lo, hi = wilson(0, 5)
    assert lo == 0.0 and 0.4 < hi < 0.5
    lo, hi = wilson(5, 5)
    assert hi == 1.0 and 0.5 < lo < 0.6
    assert wilson(0, 0) == (0.0, 1.0)
    p = proportion(3, 4)
    assert p["share"] == 0.75 and p["k"] == 3 and p["n"] == 4 and p["ci_method"] == "wilson"


def test_mean_summary_by_hand():
    s = mean_summary([1.0, 2.0, 4.0])
    sd = math.sqrt(((1 - 7 / 3) ** 2 + (2 - 7 / 3) ** 2 + (4 - 7 / 3) ** 2) / 2)
    assert s["mean"] == pytest.approx(7 / 3) and s["sd"] == pytest.approx(sd)
    assert s["se"] == pytest.approx(sd / math.sqrt(3))
    assert s["ci95"] == pytest.approx(
        [7 / 3 - 1.959964 * sd / math.sqrt(3), 7 / 3 + 1.959964 * sd / math.sqrt(3)]
    )
    assert mean_summary([5.0]) == {"n": 1, "mean": 5.0, "sd": None, "se": None, "ci95": None}
    assert mean_summary([])["mean"] is None


def test_jensen_shannon_by_hand():
    assert jensen_shannon([Counter(a=2, b=2), Counter(a=1, b=1)]) == pytest.approx(0.0)
    assert jensen_shannon([Counter(a=3), Counter(b=5)]) == pytest.approx(1.0)  # disjoint: 1 bit
    # P = (1/2, 1/2, 0), Q = (0, 1/2, 1/2): M = (1/4, 1/2, 1/4), H(M) = 1.5, H(P) = H(Q) = 1 -> 0.5 bit
    assert jensen_shannon([Counter(a=1, b=1), Counter(b=1, c=1)]) == pytest.approx(0.5)
    assert jensen_shannon([Counter(a=1), Counter()]) == 0.0  # an empty group has nothing to compare


def test_permutation_pvalue_and_total_variation():
    # perfectly separated groups: few shuffles reach the observed divergence
    samples = [["x"]] * 6 + [["y"]] * 6
    p = permutation_pvalue(samples, [0] * 6 + [1] * 6, permutations=200, seed=1)
    assert p < 0.05
    # identical groups: every shuffle reaches it
    assert permutation_pvalue([["x"]] * 8, [0] * 4 + [1] * 4, permutations=50) == 1.0
    assert permutation_pvalue(samples, [0] * 6 + [1] * 6, 200, 1) == p  # seeded: recomputable
    # shuffled only within blocks (the samples of one seed): two blocks of two allow 4 labellings,
    # half of which reach the observed separation -> p near 1/2, never below 1/4
    blocked = permutation_pvalue([["x"], ["y"], ["x"], ["y"]], [0, 1, 0, 1], 400, 2, blocks=[0, 0, 1, 1])
    assert 0.4 < blocked < 0.6
    # a block of one sample cannot move: its label stays, so the observed split always returns
    assert permutation_pvalue([["x"], ["y"]], [0, 1], 50, 0, blocks=[0, 1]) == 1.0
    assert total_variation([{"pos": 0.75, "neg": 0.25}, {"pos": 0.25, "neg": 0.75}]) == pytest.approx(0.5)
    assert total_variation([{"pos": 1.0}, {"pos": 1.0}, {"neg": 1.0}]) == pytest.approx(1.0)
