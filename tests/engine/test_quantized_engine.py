"""Continuous batching never changes a greedy output with quantized weights either.

The dense reference path and the paged engine run the same quantized model; a batched
step feeds the linear layers several rows where the dense path feeds one, so the two
take different kernels (the int8 kernel for decode-sized batches, the dequantized weight
for larger ones) and must still agree: token for token in fp32, and in bf16 (where
rounding differs between row counts, quantized or not) as vLLM's check_logprobs_close
compares: at the first divergence each side's token is in the other's top 5.
"""

from __future__ import annotations

import pytest
from torch import nn

import tiny
from tokenmill import SamplingParams
from tokenmill.generation.dense_engine import Sequence, generate_batch
from tokenmill.generation.outputs import RequestMetrics
from tokenmill.layers.quantized import Int4Linear, Int8Linear, quantize_model
from tokenmill.weights.model_loader import load_model
from workload import _dense_alone, _engine, _run, _workload


def _load(tiny_root: str, mode: str, dtype: str):
    if mode == "gguf":
        return _load_mixed(tiny_root, dtype)
    loaded = load_model(tiny.save_tiny_dir("llama", tiny_root), dtype=dtype, device="cpu", quantization=mode)
    kind = Int8Linear if mode in ("int8", "w8a8") else Int4Linear
    assert isinstance(loaded.model.lm_head, kind) and loaded.quantization.mode == mode
    return loaded


def _load_mixed(tiny_root: str, dtype: str):
    """The tiny model with the mix of layers a GGUF file of several tensor types loads as in
    "gguf" mode (int8, w8a8, int4, w4a8 and float layers side by side), through the loader's own
    steps: quantized before the float layers get their device layout."""
    from tokenmill.weights import model_loader

    kinds = ("int8", "w4a8", "none", "int4", "w8a8")

    def quantize(model, device, quantization, int4_sources=None, layer_modes=None):
        names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
        modes = {n: kinds[i % len(kinds)] for i, n in enumerate(names)}
        return quantize_model(model.eval(), "gguf", device=device, layer_modes=modes)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(model_loader, "_quantize", quantize)
        loaded = load_model(
            tiny.save_tiny_dir("llama", tiny_root), dtype=dtype, device="cpu", quantization="int8"
        )
    report = loaded.quantization
    assert (
        report.mode == "gguf"
        and set(report.modes.values()) == {"int8", "w8a8", "w4a8", "int4"}
        and report.kept
    )
    return loaded


@pytest.fixture(scope="module", params=["int8", "w8a8", "int4", "w4a8", "gguf"])
def loaded(request, tiny_root):
    return _load(tiny_root, request.param, "float32")


@pytest.mark.parametrize("prefix_caching", [False, True])
def test_staggered_requests_equal_each_alone_on_the_dense_path(loaded, prefix_caching):
    reqs = _workload(count=24)
    engine = _engine(loaded, enable_prefix_caching=prefix_caching)
    references = [_dense_alone(engine, prompt, m) for prompt, m, _ in reqs]
    outs, counted = _run(engine, reqs)
    assert [outs[i] for i in range(len(reqs))] == references
    assert (counted["prefix_hits"] > 0) == prefix_caching
    assert engine.kv.pool.num_used == 0


def test_preemption_changes_nothing(loaded):
    reqs = _workload(seed=1, count=16)
    per_block = _engine(loaded).runner.kv_bytes_per_block(4)
    engine = _engine(loaded, kv_cache_memory=72 * per_block, max_num_seqs=8)
    references = [_dense_alone(engine, prompt, m) for prompt, m, _ in reqs]
    outs, counted = _run(engine, reqs)
    assert counted["preemptions"] > 0
    assert [outs[i] for i in range(len(reqs))] == references


def _greedy_logprobs(max_tokens: int) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True, logprobs=5)


@pytest.mark.parametrize("mode", ["int8", "w8a8", "int4", "w4a8", "gguf"])
def test_bf16_kernels_in_the_engine_stay_within_rounding_of_the_dense_path(tiny_root, mode):
    loaded = _load(tiny_root, mode, "bfloat16")
    assert loaded.quantization.fallback == {}  # the bf16 kernels run every layer
    reqs = _workload(count=16)
    engine = _engine(loaded)
    dense = []
    for prompt, m, _ in reqs:
        seq = Sequence(
            0, 0, prompt, engine.resolve_params(_greedy_logprobs(m), len(prompt)), RequestMetrics()
        )
        for _ in generate_batch(engine.runner, engine.tokenizer, engine.eos_token_ids, [seq]):
            pass
        dense.append(seq.logprobs)
    for i, (prompt, m, _) in enumerate(reqs):
        engine.add_request(str(i), prompt, engine.resolve_params(_greedy_logprobs(m), len(prompt)))
    paged = {}
    while engine.has_unfinished():
        for group in engine.step():
            out = engine.snapshot(group)
            if out.finished:
                paged[int(out.request_id)] = out.outputs[0].logprobs
    same = 0
    for i, ref in enumerate(dense):
        got = paged[i]
        assert len(got) == len(ref)
        for a, b in zip(got, ref):
            if a.token_id != b.token_id:
                assert a.token_id in b.top_logprobs and b.token_id in a.top_logprobs, i
                break
        else:
            same += 1
    assert same >= len(reqs) // 2  # most requests agree token for token even in bf16
