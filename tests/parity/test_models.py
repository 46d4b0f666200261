"""Every native architecture against transformers on tiny random configs, fp32 on CPU."""

from __future__ import annotations

import pytest
import torch

import tiny
from tokenmill.generation.runner import ModelRunner
from tokenmill.layers.attention import DenseAttention


@pytest.fixture(scope="module", params=tiny.ARCHS)
def pair(request):
    hf = tiny.hf_model(request.param)
    ours = tiny.native_from_hf(hf)
    return request.param, hf, ours


def _runner(model):
    return ModelRunner(model, model.config, torch.device("cpu"), next(model.parameters()).dtype)


def test_logits_match_transformers(pair):
    arch, hf, ours = pair
    torch.manual_seed(1)
    # 40 tokens: longer than the sliding windows of the tiny Mistral and Gemma 3 configs.
    ids = torch.randint(0, tiny.VOCAB, (2, 40))
    with torch.no_grad():
        ref = hf(ids).logits
    pos = torch.arange(40).expand(2, 40)
    out = ours(ids, pos, DenseAttention(None, 0, 40, 39), None)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=0)


def _greedy_cached(model, prompt: list[int], steps: int) -> tuple[list[int], list[torch.Tensor]]:
    runner = _runner(model)
    L = len(prompt)
    cache = runner.new_cache(1, L + steps)
    logits = runner.forward(torch.tensor([prompt]), torch.arange(L)[None], DenseAttention(cache, 0, L, L - 1))
    out, step_logits = [], []
    for i in range(steps):
        step_logits.append(logits[0])
        tok = int(logits[0].argmax())
        out.append(tok)
        if i == steps - 1:
            break
        logits = runner.forward(
            torch.tensor([[tok]]), torch.tensor([[L + i]]), DenseAttention(cache, L + i, 1, L + i)
        )
    return out, step_logits


def test_32_greedy_tokens_match_transformers(pair):
    arch, hf, ours = pair
    prompt = [5, 17, 42, 99, 7, 3, 250, 11]
    tokens, _ = _greedy_cached(ours, prompt, 32)
    ref = hf.generate(
        torch.tensor([prompt]), max_new_tokens=32, min_new_tokens=32, do_sample=False, pad_token_id=0
    )[0, len(prompt) :].tolist()
    assert tokens == ref


def test_cached_decoding_equals_uncached(pair):
    arch, hf, ours = pair
    prompt = [9, 8, 7, 6, 5, 4, 3, 2, 1, 10, 20, 30]
    tokens, step_logits = _greedy_cached(ours, prompt, 24)
    full = _runner(ours).full_logits(prompt + tokens)
    for i, logits in enumerate(step_logits):
        torch.testing.assert_close(logits, full[len(prompt) - 1 + i], atol=1e-4, rtol=0)


@pytest.mark.parametrize("arch", ["llama", "gemma3", "gpt2"])
def test_bfloat16_close_to_transformers(arch):
    """bf16 rounding differs between implementations; compare as vLLM's check_logprobs_close does."""
    hf = tiny.hf_model(arch, dtype=torch.bfloat16)
    ours = tiny.native_from_hf(hf, dtype=torch.bfloat16)
    prompt = [5, 17, 42, 99, 7, 3, 250, 11]
    tokens, step_logits = _greedy_cached(ours, prompt, 16)
    ref = hf.generate(
        torch.tensor([prompt]),
        max_new_tokens=16,
        min_new_tokens=16,
        do_sample=False,
        pad_token_id=0,
        output_logits=True,
        return_dict_in_generate=True,
    )
    ref_tokens = ref.sequences[0, len(prompt) :].tolist()
    for i, (a, b) in enumerate(zip(tokens, ref_tokens)):
        if a != b:
            # At the first divergence each side's choice must be among the other's top 5.
            ours_top = step_logits[i].float().topk(5).indices.tolist()
            ref_top = ref.logits[i][0].float().topk(5).indices.tolist()
            assert b in ours_top and a in ref_top, (i, a, b)
            break
    with torch.no_grad():
        ids = torch.tensor([prompt])
        ref_logits = hf(ids).logits[0].float()
        out = ours(
            ids, torch.arange(len(prompt))[None], DenseAttention(None, 0, len(prompt), len(prompt) - 1), None
        )[0].float()
    assert (out.log_softmax(-1) - ref_logits.log_softmax(-1)).abs().max() < 0.1
