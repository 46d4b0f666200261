"""Decode steps replayed from captured graphs (generation/cuda_graphs.py), run on the CPU.

Capturing needs a GPU; here ``capture_eager`` stands in for it: each replay runs the same
function over the same persistent buffers, padded batch and scratch block, so everything
but the recording itself is exercised. Each check steps an engine that replays graphs and
one that runs eagerly in lockstep, and compares their logits, tokens and KV caches.
"""

from __future__ import annotations

import types

import pytest
import torch

import tiny
from tokenmill import LLM, SamplingParams
from tokenmill.generation import cuda_graphs
from tokenmill.generation.engine import EngineConfig


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    return tiny.save_tiny_dir("llama", str(tmp_path_factory.mktemp("graphs")))


@pytest.fixture
def graphs_on_cpu(monkeypatch):
    monkeypatch.setattr(cuda_graphs, "capture", cuda_graphs.capture_eager)
    monkeypatch.setattr(cuda_graphs, "wanted", lambda *a: (True, ""))


def _pair(model_dir: str, monkeypatch, **kw) -> tuple[LLM, LLM]:
    eager = LLM(model_dir, dtype="float32", device="cpu", enforce_eager=True, **kw)
    monkeypatch.setattr(cuda_graphs, "capture", cuda_graphs.capture_eager)
    monkeypatch.setattr(cuda_graphs, "wanted", lambda *a: (True, ""))
    graphed = LLM(model_dir, dtype="float32", device="cpu", **kw)
    assert eager.runner.graphs is None and graphed.runner.graphs is not None
    return eager, graphed


def _record(llm: LLM) -> list:
    """Every step's (logits, rows, replayed batch size or None)."""
    seen: list = []
    runner = llm.runner
    execute = runner.execute

    def spy(cache, scheduled, tables):
        graphs = runner.graphs
        batch = None
        if graphs is not None and graphs.accepts(scheduled):
            batch = next(b for b in graphs.sizes if b >= len(scheduled))
        logits, samplers = execute(cache, scheduled, tables)
        seen.append((logits.clone(), len(scheduled), batch))
        return logits, samplers

    runner.execute = spy
    return seen


def _lockstep(a: LLM, b: LLM, prompts: list[list[int]], params: list[SamplingParams]) -> list:
    steps_a, steps_b = _record(a), _record(b)
    for llm in (a, b):
        for i, (p, sp) in enumerate(zip(prompts, params)):
            llm.engine.add_request(f"r{i}", p, llm.engine.resolve_params(sp, len(p)))
    outs: dict[str, list] = {"a": [], "b": []}
    while a.engine.has_unfinished():
        outs["a"] += a.engine.step()
        outs["b"] += b.engine.step()
        la, lb = steps_a[-1], steps_b[-1]
        assert la[1] == lb[1]
        torch.testing.assert_close(lb[0], la[0], atol=2e-5, rtol=1e-5)
        # every block the block manager hands out holds the same keys and values
        n = a.engine.cache.num_blocks
        for ka, kb in zip(a.engine.cache.k + a.engine.cache.v, b.engine.cache.k + b.engine.cache.v):
            torch.testing.assert_close(kb[:n], ka[:n], atol=2e-5, rtol=1e-5)
    assert not b.engine.has_unfinished()
    return steps_b


def test_padded_batches_match_eager_steps(model_dir, monkeypatch):
    eager, graphed = _pair(model_dir, monkeypatch, max_batch_size=6)
    assert graphed.runner.graphs.sizes == [1, 2, 4, 8]
    # the padding rows' block: one past the blocks the block manager knows
    assert graphed.engine.cache.num_blocks == graphed.engine.kv.num_blocks + 1
    torch.manual_seed(0)
    prompts = [torch.randint(3, tiny.VOCAB, (n,)).tolist() for n in (5, 17, 3, 30, 9)]
    # different lengths: the batch shrinks 5 -> 1 rows, through graphs of 8, 4, 2 and 1
    params = [
        SamplingParams(temperature=0, max_tokens=m, ignore_eos=True, logprobs=2) for m in (3, 9, 14, 20, 25)
    ]
    steps = _lockstep(eager, graphed, prompts, params)
    replayed = {batch for _, _, batch in steps if batch is not None}
    assert replayed == {8, 4, 2, 1}
    # the same generations, end to end
    a, b = eager.generate(prompts, params), graphed.generate(prompts, params)
    assert [o.outputs[0].token_ids for o in a] == [o.outputs[0].token_ids for o in b]


def test_single_token_prompt_chunks_replay_without_sampling(model_dir, monkeypatch):
    # A budget of 4 tokens a step: with 3 sequences decoding, a new prompt gets one token a
    # step, a single-token row that does not sample, replayed in the same graph.
    eager, graphed = _pair(model_dir, monkeypatch, max_batch_size=4, max_num_batched_tokens=4)
    torch.manual_seed(1)
    prompts = [torch.randint(3, tiny.VOCAB, (n,)).tolist() for n in (2, 3, 1, 7)]
    params = [SamplingParams(temperature=0, max_tokens=m, ignore_eos=True) for m in (12, 12, 12, 4)]
    steps = _lockstep(eager, graphed, prompts, params)
    # some replayed step had more rows than logits: a prompt token that did not sample
    assert any(batch is not None and logits.shape[0] < rows for logits, rows, batch in steps)


def test_sampling_with_a_seed_matches(model_dir, monkeypatch):
    eager, graphed = _pair(model_dir, monkeypatch, max_batch_size=3)
    sp = SamplingParams(temperature=0.9, top_p=0.9, max_tokens=16, seed=7, n=3, ignore_eos=True)
    a = eager.generate("hello there", sp)
    b = graphed.generate("hello there", sp)
    assert [c.token_ids for c in a[0].outputs] == [c.token_ids for c in b[0].outputs]


def test_a_failed_capture_falls_back_to_eager_steps(model_dir, monkeypatch):
    def broken(fn, pool):
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(cuda_graphs, "capture", broken)
    monkeypatch.setattr(cuda_graphs, "wanted", lambda *a: (True, ""))
    llm = LLM(model_dir, dtype="float32", device="cpu", max_batch_size=2)
    assert llm.runner.graphs is None
    assert llm.engine.graphs_reason == "capture failed: operation not permitted when stream is capturing"
    out = llm.generate("hi", SamplingParams(max_tokens=3, ignore_eos=True))
    assert len(out[0].outputs[0].token_ids) == 3


def test_a_row_past_its_blocks_is_refused(model_dir, graphs_on_cpu):
    llm = LLM(model_dir, dtype="float32", device="cpu", max_batch_size=2)
    graphs = llm.runner.graphs
    bs = graphs.block_size
    req = types.SimpleNamespace(request_id="x", num_computed_tokens=2 * bs, all_token_ids=[5] * (2 * bs + 1))
    row = types.SimpleNamespace(request=req, num_new_tokens=1, samples=True)
    with pytest.raises(ValueError, match=r"request x decodes position 32 but owns 2 blocks of 16"):
        graphs.run([row], {"x": [0, 1]})


def test_scratch_block_must_be_in_the_cache(model_dir):
    llm = LLM(model_dir, dtype="float32", device="cpu", max_batch_size=2)
    cache = llm.engine.cache
    with pytest.raises(ValueError, match=f"scratch block {cache.num_blocks} is outside the cache's"):
        cuda_graphs.DecodeGraphs(llm.runner.forward, cache, cache.num_blocks, 64, [1])


def test_when_graphs_are_used():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert cuda_graphs.wanted(cpu, 64, 64, 16, False) == (False, "CUDA graphs need a CUDA device")
    assert cuda_graphs.wanted(cuda, 64, 64, 16, True) == (False, "enforce_eager is set")
    ok, why = cuda_graphs.wanted(cuda, 80, 80, 16, False)  # not a power of two (or no Triton here)
    assert not ok and "Triton" in why


@pytest.mark.parametrize(
    "n, sizes",
    [(1, [1]), (3, [1, 2, 4]), (8, [1, 2, 4, 8]), (20, [1, 2, 4, 8, 16, 24]), (1000, None)],
)
def test_graph_batch_sizes(n, sizes):
    got = cuda_graphs.graph_batch_sizes(n)
    if sizes is None:
        assert got[-1] == cuda_graphs.MAX_GRAPH_BATCH and len(got) == 3 + cuda_graphs.MAX_GRAPH_BATCH // 8
    else:
        assert got == sizes


def test_enforce_eager_is_checked_and_reaches_the_engine():
    with pytest.raises(ValueError, match="enforce_eager must be True or False, got 'yes'"):
        EngineConfig(enforce_eager="yes")
    from tokenmill.cli.main import build_parser
    from tokenmill.server.launcher import engine_config

    args = build_parser().parse_args(["serve", "--enforce-eager"])
    assert engine_config(args).enforce_eager is True
    args = build_parser().parse_args(["serve"])
    assert engine_config(args).enforce_eager is False


def test_a_graph_that_recorded_nothing_is_caught_at_start(model_dir, monkeypatch):
    """As a capture on another device's stream would: the replay does nothing and the output
    keeps the capture run's logits. The check at start-up replays another input, sees
    stale logits and the engine steps eagerly."""

    def records_nothing(fn, pool):
        return cuda_graphs._Captured(lambda: None, fn().clone())

    monkeypatch.setattr(cuda_graphs, "capture", records_nothing)
    monkeypatch.setattr(cuda_graphs, "wanted", lambda *a: (True, ""))
    llm = LLM(model_dir, dtype="float32", device="cpu", max_batch_size=2)
    assert llm.runner.graphs is None
    assert llm.engine.graphs_reason.startswith(
        "capture failed: a replayed decode graph disagrees with the eager step (max difference"
    )
    # and the eager engine generates as one without graphs does
    ref = LLM(model_dir, dtype="float32", device="cpu", max_batch_size=2, enforce_eager=True)
    sp = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    assert llm.generate("hi", sp)[0].outputs[0].token_ids == ref.generate("hi", sp)[0].outputs[0].token_ids


def test_the_captured_step_never_waits_on_the_device(model_dir, monkeypatch):
    """What a CUDA capture forbids, checked on the CPU: no op of the step may read a
    tensor's value on the host (``.item()``, ``int(t)``, ``nonzero``, ``tolist``...).
    The step runs the PyTorch attention path (on CUDA, Triton takes its place; the C
    kernels here check bounds on the host, which CUDA graphs never run)."""
    import functools

    from torch.utils._python_dispatch import TorchDispatchMode

    aten = torch.ops.aten
    syncs = {
        aten.item.default,
        aten._local_scalar_dense.default,
        aten.is_nonzero.default,
        aten.nonzero.default,
        aten.equal.default,
    }

    class NoHostReads(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func in syncs:
                raise AssertionError(f"{func} reads a device value on the host inside a decode step")
            return func(*args, **(kwargs or {}))

    def capture_checked(fn, pool):
        with NoHostReads():
            out = fn().clone()

        def replay():
            with NoHostReads():
                out.copy_(fn())

        return cuda_graphs._Captured(replay, out)

    monkeypatch.setattr(cuda_graphs, "capture", capture_checked)
    monkeypatch.setattr(cuda_graphs, "wanted", lambda *a: (True, ""))
    monkeypatch.setattr(
        cuda_graphs, "PagedAttention", functools.partial(cuda_graphs.PagedAttention, use_kernels=False)
    )
    # the check must see a host read where there is one
    with pytest.raises(AssertionError, match="reads a device value on the host"), NoHostReads():
        int(torch.ones(2).sum())
    llm = LLM(model_dir, dtype="float32", device="cpu", max_batch_size=3, enforce_eager=True)
    llm.runner.model._decode_stack = False  # the C stack is CPU-only
    graphs = cuda_graphs.DecodeGraphs(
        llm.runner.forward, llm.engine.cache, llm.engine.cache.num_blocks - 1, 64, [1, 2, 4]
    )
    req = types.SimpleNamespace(request_id="x", num_computed_tokens=5, all_token_ids=list(range(3, 9)))
    row = types.SimpleNamespace(request=req, num_new_tokens=1, samples=True)
    logits, samplers = graphs.run([row, row, row], {"x": [0]})
    assert logits.shape == (3, llm.config.vocab_size) and samplers == [row, row, row]
