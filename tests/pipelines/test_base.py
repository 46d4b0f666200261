"""The pipeline driver's batching plan, checked without a model."""

import random

import pytest

from tokenmill.pipelines.base import MIN_BATCH_TOKENS, PAD_SLACK, plan_batches


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("batch_size", [1, 4, 32])
def test_every_input_runs_once_in_bounded_batches(seed, batch_size):
    rng = random.Random(seed)
    lengths = [rng.randint(1, 120) for _ in range(rng.randint(1, 90))]
    batches = plan_batches(lengths, batch_size)
    flat = [k for b in batches for k in b]
    assert sorted(flat) == list(range(len(lengths)))
    for b in batches:
        assert 1 <= len(b) <= batch_size
        lens = [lengths[k] for k in b]
        assert lens == sorted(lens)
        real = sum(lens)
        # Over the slack only while the batch before the newest row was still small.
        if max(lens) * len(lens) > PAD_SLACK * real:
            assert real - lens[-1] < MIN_BATCH_TOKENS


def test_equal_lengths_fill_whole_batches():
    assert plan_batches([10] * 10, 4) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]


def test_mixed_lengths_are_split_where_padding_would_waste():
    lengths = [20] * 16 + [200] * 2
    batches = plan_batches(lengths, 32)
    assert batches == [list(range(16)), [16, 17]]
