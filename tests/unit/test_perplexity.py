"""Perplexity with the native forward against transformers' loss on the same tokens (fp32,
relative 1e-4), the window bookkeeping, and the errors."""

from __future__ import annotations

import math

import pytest
import torch

from tokenmill.eval.perplexity import default_text, perplexity

TEXT = (
    "The capital of France is Paris. The capital of Italy is Rome. Hello world! "
    "def f(x):\n    return x * 2\n" * 3
)


def _hf_nll(hf, ids: list[int], window: int, stride: int) -> tuple[float, int]:
    """Summed NLL and count, window by window as documented: every token after the first once."""
    total, count, done = 0.0, 0, 1
    for begin in range(0, len(ids) - 1, stride):
        end = min(begin + window, len(ids))
        with torch.no_grad():
            logp = hf(torch.tensor([ids[begin:end]])).logits[0].double().log_softmax(-1)
        for t in range(max(done, begin + 1), end):
            total -= logp[t - 1 - begin, ids[t]].item()
            count += 1
        done = max(done, end)
        if end == len(ids):
            break
    return total, count


def test_one_window_equals_transformers_loss(llm, hf):
    ids = llm.get_tokenizer().encode(TEXT)
    r = perplexity(llm, TEXT, window=len(ids))
    with torch.no_grad():
        loss = hf(torch.tensor([ids]), labels=torch.tensor([ids])).loss.item()
    assert r.windows == 1 and r.tokens == len(ids) - 1
    assert math.isclose(r.perplexity, math.exp(loss), rel_tol=1e-4)
    assert math.isclose(r.nll, loss, rel_tol=1e-4)


@pytest.mark.parametrize("window,stride", [(16, 8), (16, 16), (24, 5), (17, 1)])
def test_sliding_windows_equal_transformers_window_by_window(llm, hf, window, stride):
    ids = llm.get_tokenizer().encode(TEXT)
    r = perplexity(llm, TEXT, window=window, stride=stride)
    total, count = _hf_nll(hf, ids, window, stride)
    assert r.tokens == count and (r.window, r.stride) == (window, stride)
    if stride < window:
        assert count == len(ids) - 1  # overlapping windows score every token but the first
    assert math.isclose(r.nll, total / count, rel_tol=1e-4)


def test_max_tokens_bounds_the_text(llm):
    r = perplexity(llm.loaded, TEXT, max_tokens=20, window=64)  # a LoadedModel works too
    assert r.tokens == 19 and r.windows == 1


def test_shipped_text_is_a_long_english_essay():
    text = default_text()
    assert 2500 <= len(text.split()) <= 3100
    assert text.startswith("Keepers of the Light")


def test_bad_arguments_name_the_field(llm):
    with pytest.raises(
        ValueError, match=r"window must be an integer in \[2, 256\] \(the model's context\), got 1000"
    ):
        perplexity(llm, TEXT, window=1000)
    with pytest.raises(ValueError, match=r"stride must be an integer in \[1, window=16\], got 0"):
        perplexity(llm, TEXT, window=16, stride=0)
    with pytest.raises(ValueError, match=r"max_tokens must be an integer >= 2 or None, got 1"):
        perplexity(llm, TEXT, max_tokens=1)
    with pytest.raises(ValueError, match=r"the text has 1 token\(s\); perplexity needs at least 2"):
        perplexity(llm, "")  # only the BOS token
    with pytest.raises(
        TypeError, match=r"perplexity\(\) takes an LLM, a LoadedModel or a model name, got int"
    ):
        perplexity(3, TEXT)
