"""The continuous-batching paged engine never changes a greedy output.

Requests arrive at different steps with random prompt and output lengths; each must
produce exactly what it produces alone on the dense reference path, with prefix
caching on or off, and with a KV pool so small that requests get preempted.
"""

from __future__ import annotations

import random

import pytest
import torch

import tiny
from tokenmill import SamplingParams
from tokenmill.generation.engine import EngineConfig
from tokenmill.weights.model_loader import load_model
from workload import _dense_alone, _engine, _greedy, _run, _workload


@pytest.fixture(scope="module", params=["llama", "gemma3"])
def loaded(request, tiny_root):
    return load_model(tiny.save_tiny_dir(request.param, tiny_root), dtype="float32", device="cpu")


@pytest.fixture(scope="module")
def references(loaded):
    engine = _engine(loaded)
    return [_dense_alone(engine, prompt, m) for prompt, m, _ in _workload()]


@pytest.mark.parametrize("prefix_caching", [False, True])
def test_fifty_staggered_requests_equal_each_alone_on_the_dense_path(loaded, references, prefix_caching):
    engine = _engine(loaded, enable_prefix_caching=prefix_caching)
    outs, counted = _run(engine, _workload())
    assert [outs[i] for i in range(50)] == references
    if prefix_caching:
        assert counted["prefix_hits"] > 0  # shared prompt starts were found again
    else:
        assert counted["prefix_hits"] == 0
    assert engine.kv.pool.num_used == 0


def test_a_pool_small_enough_to_preempt_changes_nothing(loaded, references):
    per_block = _engine(loaded).runner.kv_bytes_per_block(4)
    # 72 blocks of 4 tokens: one full-length request fits, fifty staggered ones do not.
    engine = _engine(loaded, kv_cache_memory=72 * per_block, max_num_seqs=16)
    assert engine.kv.num_blocks == 72
    outs, counted = _run(engine, _workload())
    assert counted["preemptions"] > 0
    assert engine.scheduler.num_preemptions == counted["preemptions"]
    assert [outs[i] for i in range(50)] == references
    assert engine.kv.pool.num_used == 0


def test_long_prompts_are_prefilled_in_chunks_beside_decoding(loaded):
    engine = _engine(loaded, max_num_batched_tokens=16)
    short, long = [5, 6, 7], list(range(3, 83))
    engine.add_request("short", short, engine.resolve_params(_greedy(engine, 20), 3))
    engine.step()  # the short request is decoding now
    engine.add_request("long", long, engine.resolve_params(_greedy(engine, 4), len(long)))
    chunk_steps = 0
    outs = {}
    while engine.has_unfinished():
        before = {r.request_id: r.num_computed_tokens for r in engine.scheduler.running}
        for group in engine.step():
            if group.finished:
                outs[group.request_id] = engine.snapshot(group).outputs[0].token_ids
        long_req = next((r for r in engine.scheduler.running if r.request_id == "long#0"), None)
        if long_req is not None and "short#0" in before and long_req.num_computed_tokens < len(long):
            chunk_steps += 1
    assert chunk_steps >= 3  # 80 prompt tokens under a 16-token budget shared with a decode
    assert outs["short"] == _dense_alone(engine, short, 20)
    assert outs["long"] == _dense_alone(engine, long, 4)


def test_seeded_requests_give_the_same_text_whatever_runs_beside_them(loaded):
    engine = _engine(loaded)
    prompt = [7, 8, 9, 10]
    sampled = SamplingParams(max_tokens=12, temperature=1.0, top_k=50, top_p=0.9, seed=123, ignore_eos=True)

    def run(extra: int) -> list[int]:
        engine.add_request("seeded", prompt, engine.resolve_params(sampled, len(prompt)))
        rng = random.Random(extra)
        for j in range(extra):
            other = SamplingParams(
                max_tokens=rng.randint(1, 15),
                temperature=rng.choice([0.0, 0.7, 1.3]),
                repetition_penalty=rng.choice([1.0, 1.2]),
                frequency_penalty=rng.choice([0.0, 0.5]),
                min_p=rng.choice([0.0, 0.1]),
                ignore_eos=True,
            )
            ids = [rng.randrange(3, tiny.VOCAB) for _ in range(rng.randint(1, 20))]
            engine.add_request(f"other{j}", ids, engine.resolve_params(other, len(ids)))
        result = None
        while engine.has_unfinished():
            for group in engine.step():
                if group.request_id == "seeded" and group.finished:
                    result = engine.snapshot(group).outputs[0].token_ids
        return result

    alone = run(0)
    assert run(5) == alone
    assert run(11) == alone


def test_greedy_rows_beside_sampled_rows_with_every_processor(loaded, references):
    engine = _engine(loaded)
    reqs = _workload()[:6]
    for i, (prompt, m, _) in enumerate(reqs):
        engine.add_request(f"g{i}", prompt, engine.resolve_params(_greedy(engine, m), len(prompt)))
        noisy = SamplingParams(
            max_tokens=m,
            temperature=0.9,
            top_k=20,
            top_p=0.8,
            min_p=0.05,
            repetition_penalty=1.3,
            presence_penalty=0.5,
            frequency_penalty=0.5,
            logit_bias={5: 3.0},
            min_tokens=min(m, 3),
            logprobs=2,
            seed=i,
        )
        engine.add_request(f"s{i}", prompt, engine.resolve_params(noisy, len(prompt)))
    outs = {}
    while engine.has_unfinished():
        for group in engine.step():
            if group.finished:
                outs[group.request_id] = engine.snapshot(group).outputs[0]
    for i in range(6):
        assert outs[f"g{i}"].token_ids == references[i]
        assert len(outs[f"s{i}"].logprobs) == len(outs[f"s{i}"].token_ids)


def test_n_samples_share_the_prompt_blocks(loaded):
    engine = _engine(loaded)
    prompt = list(range(3, 3 + 33))  # 8 full blocks of 4, and one token more
    p = engine.resolve_params(
        SamplingParams(n=3, max_tokens=5, temperature=1.0, seed=1, ignore_eos=True), len(prompt)
    )
    engine.add_request("r", prompt, p)
    engine.step()  # the first sample computes the prompt alone and samples
    assert [r.request_id for r in engine.scheduler.running] == ["r#0"]
    assert engine.last_stats.prefix_cache_hits == 0
    engine.step()  # the siblings join and find the prompt's 8 full blocks cached
    assert engine.last_stats.prefix_cache_hits == 2 * 32
    shared = set(engine.kv.block_ids("r#0")[:8])
    assert shared == set(engine.kv.block_ids("r#1")[:8]) == set(engine.kv.block_ids("r#2")[:8])
    assert all(engine.kv.pool.blocks[b].ref_cnt == 3 for b in shared)
    while engine.has_unfinished():
        groups = engine.step()
    out = engine.snapshot(groups[0])
    assert len(out.outputs) == 3 and all(len(c.token_ids) == 5 for c in out.outputs)
    assert engine.kv.pool.num_used == 0


def test_aborting_a_group_whose_siblings_wait_frees_everything(loaded):
    engine = _engine(loaded)
    p = engine.resolve_params(SamplingParams(n=4, max_tokens=5, ignore_eos=True), 30)
    engine.add_request("r", list(range(3, 33)), p)
    assert engine.abort("r")  # before any step: only the first sample was queued
    assert not engine.has_unfinished() and not engine.scheduler.has_unfinished()
    assert engine.kv.pool.num_used == 0


def test_abort_frees_blocks_at_once(loaded):
    engine = _engine(loaded)
    engine.add_request("a", list(range(3, 40)), engine.resolve_params(_greedy(engine, 50), 37))
    engine.step()
    assert engine.kv.pool.num_used > 0
    assert engine.abort("a")
    assert engine.kv.pool.num_used == 0 and not engine.has_unfinished()
    assert not engine.abort("a")
    assert engine.step() == []
    assert [f.finish_reason for f in engine.last_stats.finished] == ["abort"]


def test_deadline_ends_a_request_with_reason_timeout(loaded):
    import time

    engine = _engine(loaded)
    p = engine.resolve_params(_greedy(engine, 100), 3)
    engine.add_request("late", [3, 4, 5], p, deadline=time.monotonic() - 1)
    groups = engine.step()
    out = engine.snapshot(groups[0])
    assert out.finished and out.outputs[0].finish_reason == "timeout"
    assert engine.kv.pool.num_used == 0


def test_kv_cache_too_small_for_max_model_len_is_a_clear_error(loaded):
    per_block = _engine(loaded).runner.kv_bytes_per_block(16)
    with pytest.raises(
        ValueError, match=r"holds 160 tokens \(10 blocks of 16\), fewer than max_model_len=256"
    ):
        _engine(loaded, block_size=16, kv_cache_memory=10 * per_block)
    # Lowering max_model_len to what fits is the way out.
    assert (
        _engine(loaded, block_size=16, kv_cache_memory=10 * per_block, max_model_len=160).max_model_len == 160
    )


def test_max_model_len_beyond_the_model_is_refused(loaded):
    with pytest.raises(ValueError, match="max_model_len is 100000 but the model's context is 256"):
        _engine(loaded, max_model_len=100000)


def test_bad_engine_config_names_the_field():
    with pytest.raises(ValueError, match="max_num_seqs must be an integer >= 1"):
        EngineConfig(max_num_seqs=0)
    with pytest.raises(ValueError, match="kv_cache_memory must be a positive integer"):
        EngineConfig(kv_cache_memory=-5)


def test_duplicate_request_id_is_refused(loaded):
    engine = _engine(loaded)
    p = engine.resolve_params(_greedy(engine, 2), 3)
    engine.add_request("x", [3, 4, 5], p)
    with pytest.raises(ValueError, match="request id 'x' is already running"):
        engine.add_request("x", [3, 4, 5], p)
    engine.abort("x")


def test_paged_attention_matches_dense_in_bf16(tiny_root):
    """bf16 on CPU takes the matmul attention path for chunks; outputs stay those of the dense path."""
    loaded = load_model(tiny.save_tiny_dir("llama", tiny_root), dtype="bfloat16", device="cpu")
    engine = _engine(loaded, max_num_batched_tokens=24)
    torch.manual_seed(0)
    prompts = [torch.randint(3, tiny.VOCAB, (n,)).tolist() for n in (5, 40, 17)]
    for i, prompt in enumerate(prompts):
        engine.add_request(str(i), prompt, engine.resolve_params(_greedy(engine, 8), len(prompt)))
    outs = {}
    while engine.has_unfinished():
        for group in engine.step():
            if group.finished:
                outs[int(group.request_id)] = engine.snapshot(group).outputs[0].token_ids
    for i, prompt in enumerate(prompts):
        assert outs[i] == _dense_alone(engine, prompt, 8)
