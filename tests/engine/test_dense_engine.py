"""The dense engine: batching, padding and early exits never change a greedy output."""

from __future__ import annotations

import pytest
import torch

import tiny
from tokenmill import LLM, SamplingParams
from tokenmill.generation.runner import ModelRunner


@pytest.fixture(scope="module", params=["llama", "gemma3", "gpt2"])
def llm(request, tiny_root):
    return LLM(tiny.save_tiny_dir(request.param, tiny_root), dtype="float32")


def _reference_greedy(llm: LLM, prompt: list[int], n: int) -> list[int]:
    """Greedy decoding by full recomputation, no cache: the simplest correct path."""
    runner: ModelRunner = llm.runner
    ids = list(prompt)
    for _ in range(n):
        ids.append(int(runner.full_logits(ids)[-1].argmax()))
    return ids[len(prompt) :]


def test_batched_prompts_of_different_lengths_equal_each_alone(llm):
    torch.manual_seed(0)
    prompts = [torch.randint(3, tiny.VOCAB, (n,)).tolist() for n in (3, 17, 9, 30, 1)]
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    batched = llm.generate(prompts, params)
    for prompt, out in zip(prompts, batched):
        assert out.outputs[0].token_ids == _reference_greedy(llm, prompt, 12)
        alone = llm.generate([prompt], params)[0]
        assert alone.outputs[0].token_ids == out.outputs[0].token_ids


def test_rows_finishing_early_leave_the_others_unchanged(llm):
    prompts = [[5, 6, 7], [8, 9, 10, 11, 12], [13]]
    lengths = [2, 9, 5]
    outs = llm.generate(
        prompts, [SamplingParams(temperature=0, max_tokens=m, ignore_eos=True) for m in lengths]
    )
    for prompt, m, out in zip(prompts, lengths, outs):
        assert out.outputs[0].token_ids == _reference_greedy(llm, prompt, m)
        assert out.outputs[0].finish_reason == "length"


def test_small_max_batch_size_gives_same_outputs(tiny_root):
    d = tiny.save_tiny_dir("llama", tiny_root)
    prompts = [[3 + i, 40 + i, 7] for i in range(5)]
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    a = LLM(d, dtype="float32").generate(prompts, params)
    b = LLM(d, dtype="float32", max_batch_size=2).generate(prompts, params)
    assert [o.outputs[0].token_ids for o in a] == [o.outputs[0].token_ids for o in b]


def test_n_samples_with_seed_are_distinct_and_reproducible(llm):
    params = SamplingParams(n=3, temperature=1.0, seed=7, max_tokens=10, ignore_eos=True)
    a = llm.generate([[4, 5, 6]], params)[0]
    b = llm.generate([[4, 5, 6]], params)[0]
    assert [c.token_ids for c in a.outputs] == [c.token_ids for c in b.outputs]
    assert len({tuple(c.token_ids) for c in a.outputs}) == 3
    assert [c.index for c in a.outputs] == [0, 1, 2]


def test_metrics_are_filled(llm):
    out = llm.generate([[4, 5, 6, 7]], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))[0]
    m = out.metrics
    assert m.prompt_tokens == 4 and m.output_tokens == 8
    assert 0 < m.ttft_s <= m.e2e_s
    assert m.tpot_s > 0 and m.decode_tokens_per_s == pytest.approx(1 / m.tpot_s)
    assert m.prefill_tokens_per_s > 0 and m.peak_memory_bytes > 0


def test_every_eos_id_of_generation_config_stops(tiny_root):
    """Some models list several EOS ids in generation_config.json; any of them ends generation."""
    plain = LLM(tiny.save_tiny_dir("qwen2", tiny_root), dtype="float32")
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    path = plain.generate([[4, 5, 6]], params)[0].outputs[0].token_ids
    second_eos = path[3]
    assert second_eos not in path[:3]
    d = tiny.save_tiny_dir("qwen2", tiny_root, generation_config={"eos_token_id": [1, second_eos]})
    llm = LLM(d, dtype="float32")
    assert {1, second_eos} <= set(llm.eos_token_ids)
    out = llm.generate([[4, 5, 6]], SamplingParams(temperature=0, max_tokens=10))[0].outputs[0]
    assert out.token_ids == path[:4]
    assert out.finish_reason == "stop" and out.stop_reason is None


def test_min_tokens_beyond_the_context_left_is_an_error(tiny_root):
    llm = LLM(tiny.save_tiny_dir("llama", tiny_root), dtype="float32")
    with pytest.raises(
        ValueError, match="min_tokens is 300 but only 253 tokens fit after the 3-token prompt"
    ):
        llm.generate([[4, 5, 6]], SamplingParams(max_tokens=None, min_tokens=300))


def test_a_tuple_of_ids_is_one_prompt(tiny_root):
    llm = LLM(tiny.save_tiny_dir("llama", tiny_root), dtype="float32")
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    a = llm.generate((4, 5, 6), params)
    b = llm.generate([4, 5, 6], params)
    assert len(a) == 1 and a[0].outputs[0].token_ids == b[0].outputs[0].token_ids
