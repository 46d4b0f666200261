"""Load: 200 requests from 32 concurrent clients against a KV pool small enough to preempt.

Streaming and non-streaming greedy requests are mixed, 20 clients leave midway, and
every request that completes must equal the offline API's output for its prompt.
"""

from __future__ import annotations

import asyncio
import json
import random
import time

import httpx
import pytest
from server_util import make_engine, metric_value, serving, wait_idle

from tokenmill import LLM, SamplingParams
from tokenmill.generation.dense_engine import Sequence, generate_batch
from tokenmill.generation.outputs import RequestMetrics

NUM_REQUESTS = 200
CONCURRENCY = 32
WORDS = "The capital of France is Paris Italy Rome Hello world café naïve code def return x".split()
SHARED = "The capital of France is Paris. The capital of Italy is Rome."
# tiny Llama: 2 layers x (K + V) x 2 KV heads x 16 dims x 4 bytes = 512 bytes per token
KV_BYTES = 24 * 16 * 512  # 24 blocks of 16 tokens: about 8 requests' worth at once


def _workload() -> list[dict]:
    rng = random.Random(0)
    requests = []
    for i in range(NUM_REQUESTS):
        words = " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 12)))
        prompt = f"{SHARED} {words}" if i % 3 == 0 else words  # shared prefixes for the prefix cache
        leaves = i % 10 == 3
        requests.append(
            {
                "prompt": prompt,
                # long enough that a leaver is still generating when it goes
                "max_tokens": 120 if leaves else rng.randint(4, 24),
                "stream": i % 2 == 0,
                "leaves": leaves,
            }
        )
    return requests


@pytest.fixture(scope="module")
def load_server(llama_dir):
    engine = make_engine(llama_dir, max_num_seqs=CONCURRENCY, kv_cache_memory=KV_BYTES)
    with serving(engine) as s:
        s.engine = engine
        yield s


async def _one(client: httpx.AsyncClient, req: dict) -> tuple[str, str | None] | None:
    """(text, finish_reason) of a request, or None for a client that left."""
    body = {"prompt": req["prompt"], "max_tokens": req["max_tokens"], "temperature": 0}
    if req["leaves"]:
        body["ignore_eos"] = True
    if not req["stream"]:
        timeout = httpx.Timeout(30.0, read=0.02) if req["leaves"] else 30.0
        try:
            r = await client.post("/v1/completions", json=body, timeout=timeout)
        except httpx.ReadTimeout:
            return None
        assert r.status_code == 200, r.text
        choice = r.json()["choices"][0]
        return (None, None) if req["leaves"] else (choice["text"], choice["finish_reason"])
    text, finish, chunks = "", None, 0
    async with client.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
        assert r.status_code == 200
        async for line in r.aiter_lines():
            if not line or line == "data: [DONE]":
                continue
            choice = json.loads(line[len("data: ") :])["choices"][0]
            text += choice["text"]
            finish = choice["finish_reason"] or finish
            chunks += 1
            if req["leaves"] and chunks == 1 + len(req["prompt"]) % 2:
                return None  # leaving the block closes the connection mid-stream
    return text, finish


async def _run(url: str, workload: list[dict]) -> tuple[list, list[int]]:
    results: list = [None] * len(workload)
    health: list[int] = []
    done = asyncio.Event()
    limits = httpx.Limits(max_connections=2 * CONCURRENCY, max_keepalive_connections=CONCURRENCY)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=30.0) as client:

        async def watch_health() -> None:
            while not done.is_set():
                health.append((await client.get("/health")).status_code)
                await asyncio.sleep(0.05)

        queue: asyncio.Queue = asyncio.Queue()
        for i in range(len(workload)):
            queue.put_nowait(i)

        async def worker() -> None:
            while not queue.empty():
                i = queue.get_nowait()
                results[i] = await _one(client, workload[i])

        watcher = asyncio.create_task(watch_health())
        await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
        done.set()
        await watcher
    return results, health


def _alone_on_the_dense_path(llama_dir: str, workload: list[dict]) -> list[tuple[str, str]]:
    """(text, finish_reason) of each request run by itself on the dense reference path."""
    llm = LLM(llama_dir, dtype="float32", device="cpu")
    refs = []
    for r in workload:
        ids = llm.get_tokenizer().encode(r["prompt"])
        params = llm.engine.resolve_params(
            SamplingParams(temperature=0, max_tokens=r["max_tokens"]), len(ids)
        )
        seq = Sequence(0, 0, ids, params, RequestMetrics())
        for _ in generate_batch(llm.runner, llm.tokenizer, llm.eos_token_ids, [seq]):
            pass
        refs.append((seq.text, seq.finish_reason))
    return refs


def test_load_with_preemption_and_disconnects(load_server, llama_dir):
    workload = _workload()
    refs = _alone_on_the_dense_path(llama_dir, workload)

    start = time.monotonic()
    results, health = asyncio.run(_run(load_server.url, workload))
    elapsed = time.monotonic() - start

    compared = 0
    for req, ref, got in zip(workload, refs, results):
        if req["leaves"]:
            continue
        assert got == ref, req
        compared += 1
    assert compared == NUM_REQUESTS - 20
    assert sum(r is None for r in results) == 20  # every leaver really left midway
    assert health and set(health) == {200}

    wait_idle(load_server.engine)
    end = time.monotonic() + 2
    while True:
        text = httpx.get(f"{load_server.url}/metrics").text
        idle = metric_value(text, "tokenmill:num_requests_running") == 0
        if idle and metric_value(text, "tokenmill:kv_cache_blocks_used") == 0:
            break
        assert time.monotonic() < end, "metrics still show work in progress"
        time.sleep(0.05)
    finished = sum(
        metric_value(text, "tokenmill:request_success_total", f'finished_reason="{reason}"')
        for reason in ("stop", "length", "abort")
    )
    # a client that left before the engine saw its request is not counted
    assert NUM_REQUESTS - 20 <= finished <= NUM_REQUESTS
    preemptions = metric_value(text, "tokenmill:num_preemptions_total")
    assert preemptions > 0  # the pool is small enough that requests were preempted and resumed
    left = sum(r is None for r in results)
    print(
        f"\nload: {NUM_REQUESTS} requests in {elapsed:.1f} s, {left} left midway, {preemptions:.0f} preemptions"
    )
    assert elapsed < 60
