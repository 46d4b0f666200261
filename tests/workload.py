"""A staggered workload for the paged engine and its dense reference (shared by tests and
the CUDA check in benchmarks/)."""

from __future__ import annotations

import random

import tiny
from tokenmill import SamplingParams
from tokenmill.generation.dense_engine import Sequence, generate_batch
from tokenmill.generation.engine import EngineConfig, LLMEngine
from tokenmill.generation.outputs import RequestMetrics


def _engine(loaded, **kw) -> LLMEngine:
    kw.setdefault("block_size", 4)
    kw.setdefault("max_num_batched_tokens", 48)
    return LLMEngine(loaded, EngineConfig(**kw))


def _greedy(engine: LLMEngine, max_tokens: int) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)


def _dense_alone(engine: LLMEngine, prompt: list[int], max_tokens: int) -> list[int]:
    p = engine.resolve_params(_greedy(engine, max_tokens), len(prompt))
    seq = Sequence(0, 0, prompt, p, RequestMetrics())
    for _ in generate_batch(engine.runner, engine.tokenizer, engine.eos_token_ids, [seq]):
        pass
    return seq.output_ids


def _workload(seed: int = 0, count: int = 50):
    """(prompt, max_tokens, arrival step); every fourth prompt reuses the start of an earlier one."""
    rng = random.Random(seed)
    reqs = []
    for i in range(count):
        prompt = [rng.randrange(3, tiny.VOCAB) for _ in range(rng.randint(1, 70))]
        if i % 4 == 3:
            earlier = reqs[rng.randrange(len(reqs))][0]
            prompt = earlier[: rng.randint(1, len(earlier))] + prompt[: rng.randint(0, 12)]
        reqs.append((prompt, rng.randint(1, 28), rng.randint(0, 25)))
    return reqs


def _run(engine: LLMEngine, reqs) -> tuple[dict[int, list[int]], dict]:
    """Feed requests at their arrival steps; returns outputs and what the engine counted."""
    order = sorted(range(len(reqs)), key=lambda i: reqs[i][2])
    outs: dict[int, list[int]] = {}
    counted = {"preemptions": 0, "prefix_hits": 0, "max_batched": 0, "mixed_steps": 0}
    step = 0
    while order or engine.has_unfinished():
        while order and reqs[order[0]][2] <= step:
            i = order.pop(0)
            prompt, max_tokens, _ = reqs[i]
            engine.add_request(
                str(i), prompt, engine.resolve_params(_greedy(engine, max_tokens), len(prompt))
            )
        for group in engine.step():
            out = engine.snapshot(group)
            if out.finished:
                assert out.outputs[0].finish_reason == "length"
                outs[int(out.request_id)] = out.outputs[0].token_ids
        s = engine.last_stats
        counted["preemptions"] += s.num_preemptions
        counted["prefix_hits"] += s.prefix_cache_hits
        step += 1
        assert step < 5000, "the engine stopped making progress"
    return outs, counted
