"""Beam search over HTTP (``use_beam_search``): the same hypotheses as ``LLM.beam_search``."""

from __future__ import annotations

import asyncio
import re
import threading
import time

import httpx
import pytest
import torch
from server_util import API_KEY, MODEL, make_engine, metric_value, serving, sse_events, wait_idle

from tokenmill import SamplingParams
from tokenmill.generation.errors import EngineDeadError
from tokenmill.generation.sampling_params import BeamSearchParams

PROMPTS = ["The capital of France", "def f(x):"]
MESSAGES = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "The capital of Italy?"},
]


def _stream(client, path: str, body: dict) -> list:
    with client.stream("POST", path, json={**body, "stream": True}) as r:
        assert r.status_code == 200, r.read()
        assert r.headers["content-type"].startswith("text/event-stream")
        events = list(sse_events(r.iter_lines()))
    assert events[-1] == "[DONE]"
    return events[:-1]


def _usage(prompt_len: int, hyps) -> dict:
    completion = sum(len(h.token_ids) for h in hyps)
    return {
        "prompt_tokens": prompt_len,
        "completion_tokens": completion,
        "total_tokens": prompt_len + completion,
    }


def _error(r: httpx.Response, status: int = 400) -> dict:
    assert r.status_code == status, r.text
    return r.json()["error"]


@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_completions_equal_the_offline_beam_search(client, ref_llm, n):
    lp = 0.5 if n == 3 else 1.0
    for prompt in PROMPTS:
        ref = ref_llm.beam_search(prompt, BeamSearchParams(beam_width=n, max_tokens=8, length_penalty=lp))[0]
        body = {"model": MODEL, "prompt": prompt, "max_tokens": 8, "n": n, "use_beam_search": True}
        if lp != 1.0:
            body["length_penalty"] = lp
        r = client.post("/v1/completions", json=body)
        assert r.status_code == 200, r.text
        data = r.json()
        assert data["object"] == "text_completion" and data["id"].startswith("cmpl-")
        assert [c["index"] for c in data["choices"]] == list(range(n))
        assert [c["text"] for c in data["choices"]] == [h.text for h in ref.sequences]
        assert [c["finish_reason"] for c in data["choices"]] == [h.finish_reason for h in ref.sequences]
        assert all(c["logprobs"] is None for c in data["choices"])
        assert data["usage"] == _usage(len(ref.prompt_token_ids), ref.sequences)


def test_stop_token_ids_end_hypotheses(client, ref_llm):
    """A stop id taken from the best free-running hypothesis makes some hypotheses stop."""
    free = ref_llm.beam_search(PROMPTS[0], BeamSearchParams(beam_width=3, max_tokens=8))[0]
    stop_id = free.sequences[0].token_ids[2]
    params = BeamSearchParams(beam_width=3, max_tokens=8, stop_token_ids=[stop_id], ignore_eos=True)
    ref = ref_llm.beam_search(PROMPTS[0], params)[0]
    assert "stop" in [h.finish_reason for h in ref.sequences]
    body = {
        "prompt": PROMPTS[0],
        "max_tokens": 8,
        "n": 3,
        "use_beam_search": True,
        "stop_token_ids": [stop_id],
        "ignore_eos": True,
        "early_stopping": True,
        "temperature": 0,
        "top_p": 1,
        "seed": 3,
    }
    data = client.post("/v1/completions", json=body).json()
    assert [c["text"] for c in data["choices"]] == [h.text for h in ref.sequences]
    assert [c["finish_reason"] for c in data["choices"]] == [h.finish_reason for h in ref.sequences]
    stop_reasons = [stop_id if h.finish_reason == "stop" else None for h in ref.sequences]
    assert [c["stop_reason"] for c in data["choices"]] == stop_reasons
    assert data["usage"] == _usage(len(ref.prompt_token_ids), ref.sequences)


def test_token_id_prompts(client, ref_llm):
    ids = ref_llm.tokenizer.encode(PROMPTS[1])
    ref = ref_llm.beam_search(ids, BeamSearchParams(beam_width=2, max_tokens=5))[0]
    body = {"prompt": ids, "max_tokens": 5, "n": 2, "use_beam_search": True}
    data = client.post("/v1/completions", json=body).json()
    assert [c["text"] for c in data["choices"]] == [h.text for h in ref.sequences]


@pytest.mark.parametrize("n", [1, 3])
def test_chat_equals_the_offline_beam_search(client, ref_llm, n):
    ids = ref_llm.format_chat(MESSAGES)
    ref = ref_llm.beam_search(ids, BeamSearchParams(beam_width=n, max_tokens=10))[0]
    body = {
        "model": MODEL,
        "messages": MESSAGES,
        "max_completion_tokens": 10,
        "n": n,
        "use_beam_search": True,
    }
    r = client.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    data = r.json()
    assert data["object"] == "chat.completion"
    assert [c["index"] for c in data["choices"]] == list(range(n))
    assert [c["message"] for c in data["choices"]] == [
        {"role": "assistant", "content": h.text} for h in ref.sequences
    ]
    assert [c["finish_reason"] for c in data["choices"]] == [h.finish_reason for h in ref.sequences]
    assert data["usage"] == _usage(len(ids), ref.sequences)


def test_streamed_completion_sends_the_final_hypotheses(client):
    body = {"prompt": PROMPTS[0], "max_tokens": 6, "n": 3, "use_beam_search": True}
    whole = client.post("/v1/completions", json=body).json()
    events = _stream(client, "/v1/completions", {**body, "stream_options": {"include_usage": True}})
    *chunks, last = events
    assert len({e["id"] for e in events}) == 1
    assert all(e["object"] == "text_completion" and e["usage"] is None for e in chunks)
    got = {c["choices"][0]["index"]: c["choices"][0] for c in chunks}
    assert len(chunks) == 3 and sorted(got) == [0, 1, 2]
    for i, choice in enumerate(whole["choices"]):
        assert got[i]["text"] == choice["text"] and got[i]["finish_reason"] == choice["finish_reason"]
    assert last["choices"] == [] and last["usage"] == whole["usage"]


def test_streamed_chat_sends_the_final_hypotheses(client, ref_llm):
    ids = ref_llm.format_chat(MESSAGES)
    ref = ref_llm.beam_search(ids, BeamSearchParams(beam_width=2, max_tokens=7))[0]
    body = {"messages": MESSAGES, "max_tokens": 7, "n": 2, "use_beam_search": True}
    events = _stream(client, "/v1/chat/completions", body)
    assert all(e["object"] == "chat.completion.chunk" for e in events)
    roles = [e["choices"][0] for e in events if "role" in e["choices"][0]["delta"]]
    assert [c["index"] for c in roles] == [0, 1]
    for i, h in enumerate(ref.sequences):
        mine = [e["choices"][0] for e in events if e["choices"][0]["index"] == i]
        assert "".join(c["delta"].get("content", "") for c in mine) == h.text
        assert mine[-1]["finish_reason"] == h.finish_reason


def _refused(client, path: str, body: dict, param: str, *words: str) -> None:
    error = _error(client.post(path, json=body))
    assert error["param"] == param, error
    assert error["type"] == "invalid_request_error"
    for w in words:
        assert w in error["message"], (w, error["message"])


@pytest.mark.parametrize(
    "field,value",
    [
        ("temperature", 0.7),
        ("top_p", 0.9),
        ("top_k", 5),
        ("min_p", 0.1),
        ("repetition_penalty", 1.2),
        ("presence_penalty", 0.5),
        ("frequency_penalty", 0.5),
        ("logit_bias", {"5": 1.0}),
        ("min_tokens", 2),
    ],
)
def test_sampling_fields_are_refused(client, field, value):
    for path, base in (
        ("/v1/completions", {"prompt": "hi"}),
        ("/v1/chat/completions", {"messages": MESSAGES}),
    ):
        body = {**base, "n": 2, "use_beam_search": True, field: value}
        _refused(
            client, path, body, field, f"{field} is not supported with use_beam_search", f"leave {field} out"
        )


def test_other_refusals(client):
    beam = {"prompt": "hi", "n": 2, "use_beam_search": True}
    chat = {"messages": MESSAGES, "n": 2, "use_beam_search": True}
    _refused(client, "/v1/completions", {**beam, "stop": ["x"]}, "stop", "stop strings", "stop_token_ids")
    _refused(client, "/v1/completions", {**beam, "logprobs": 2}, "logprobs", "leave logprobs out")
    _refused(client, "/v1/chat/completions", {**chat, "logprobs": True}, "logprobs", "leave logprobs out")
    _refused(
        client,
        "/v1/chat/completions",
        {**chat, "logprobs": True, "top_logprobs": 2},
        "logprobs",
        "not supported with use_beam_search",
    )
    _refused(
        client, "/v1/completions", {**beam, "early_stopping": False}, "early_stopping", "early_stopping=false"
    )
    _refused(client, "/v1/completions", {**beam, "length_penalty": 11.0}, "length_penalty", "[-10.0, 10.0]")
    for name, value in (("length_penalty", 0.5), ("early_stopping", True)):
        for path, base in (
            ("/v1/completions", {"prompt": "hi"}),
            ("/v1/chat/completions", {"messages": MESSAGES}),
        ):
            _refused(
                client,
                path,
                {**base, name: value},
                name,
                "applies only to beam search",
                "use_beam_search=true",
            )
    _refused(client, "/v1/completions", {**beam, "n": 129}, "n", "[1, 128]")
    _refused(client, "/v1/completions", {**beam, "n": 0}, "n", "n must be")
    _refused(client, "/v1/completions", {**beam, "use_beam_search": "yes"}, "use_beam_search")
    _refused(
        client,
        "/v1/completions",
        {**beam, "stop_token_ids": [10**6]},
        "stop_token_ids",
        "outside the vocabulary",
    )


def test_context_and_cache_limits(client, server_engine):
    body = {"prompt": "hi", "n": 2, "use_beam_search": True, "max_tokens": 5000}
    error = _error(client.post("/v1/completions", json=body))
    assert error["code"] == "context_length_exceeded" and error["param"] == "max_tokens"
    assert "4096" in error["message"]

    limit = server_engine.num_blocks * server_engine.block_size
    prompt = [1, 2, 3, 4]
    max_tokens = 1000
    n = limit // (len(prompt) + max_tokens) + 1
    need = n * (len(prompt) + max_tokens)
    body = {"prompt": prompt, "n": n, "use_beam_search": True, "max_tokens": max_tokens}
    error = _error(client.post("/v1/completions", json=body))
    assert error["param"] == "n"
    for part in (f"n={n}", f"= {need} tokens", f"the {limit} tokens", "lower n or max_tokens"):
        assert part in error["message"], error["message"]
    chat = {"messages": MESSAGES, "n": n, "use_beam_search": True, "max_completion_tokens": max_tokens}
    error = _error(client.post("/v1/chat/completions", json=chat))
    assert error["param"] == "n" and "lower n or max_completion_tokens" in error["message"]
    wait_idle(server_engine)


def test_beam_search_while_other_requests_stream(client, server, ref_llm, server_engine):
    """Sampled streams and a beam search at once: each answer is what it is alone."""
    greedy = ref_llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=300, ignore_eos=True))
    beam_ref = ref_llm.beam_search(PROMPTS[0], BeamSearchParams(beam_width=4, max_tokens=24))[0]
    results: dict = {}

    def stream(i: int) -> None:
        body = {"prompt": PROMPTS[i], "max_tokens": 300, "temperature": 0, "ignore_eos": True, "stream": True}
        with httpx.Client(
            base_url=server.url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60
        ) as c:
            with c.stream("POST", "/v1/completions", json=body) as r:
                events = list(sse_events(r.iter_lines()))
        results[i] = "".join(e["choices"][0]["text"] for e in events[:-1])

    threads = [threading.Thread(target=stream, args=(i,)) for i in range(len(PROMPTS))]
    for t in threads:
        t.start()
    end = time.monotonic() + 10
    while server_engine.stats().num_running == 0 and time.monotonic() < end:
        time.sleep(0.005)
    body = {"prompt": PROMPTS[0], "max_tokens": 24, "n": 4, "use_beam_search": True}
    data = client.post("/v1/completions", json=body).json()
    assert any(t.is_alive() for t in threads)  # the search ran between the streams' steps
    for t in threads:
        t.join(60)
    assert [c["text"] for c in data["choices"]] == [h.text for h in beam_ref.sequences]
    assert [results[i] for i in range(len(PROMPTS))] == [g.outputs[0].text for g in greedy]
    wait_idle(server_engine)


def test_run_on_model_thread(server, server_engine):
    name = server.call(server_engine.run_on_model_thread(lambda: threading.current_thread().name))
    assert name == "tokenmill-engine"

    def fail() -> None:
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        server.call(server_engine.run_on_model_thread(fail))
    assert server_engine.is_running


def test_metrics_count_beam_searches(client):
    def count() -> float:
        return metric_value(client.get("/metrics").text, "tokenmill:e2e_request_latency_seconds_count")

    before = count()
    client.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 3, "n": 2, "use_beam_search": True})
    assert count() == before + 1


def test_a_client_that_leaves_stops_the_search(server, server_engine, client):
    def finished() -> float:
        return metric_value(client.get("/metrics").text, "tokenmill:e2e_request_latency_seconds_count")

    before = finished()
    # about 4000 steps of 8 beams: seconds on the tiny model, far beyond the client's patience
    body = {"prompt": "Hi", "max_tokens": 4000, "n": 8, "use_beam_search": True, "ignore_eos": True}
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=0.3) as c:
        with pytest.raises(httpx.ReadTimeout):
            c.post("/v1/completions", json=body)
    start = time.monotonic()
    server.call(server_engine.run_on_model_thread(lambda: None))  # runs once the search has ended
    assert time.monotonic() - start < 2
    assert finished() == before  # stopped, not run to its end
    r = client.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 2})
    assert r.status_code == 200


def test_request_timeout_ends_the_search(long_dir):
    engine = make_engine(long_dir)
    with serving(engine, request_timeout=0.3) as s:
        body = {"prompt": "Hi", "max_tokens": 3000, "n": 8, "use_beam_search": True, "ignore_eos": True}
        r = httpx.post(f"{s.url}/v1/completions", json=body, timeout=60)
        error = _error(r, 504)
        assert error["code"] == "timeout" and "request timeout of 0.3 s" in error["message"]
        assert "lower n or max_tokens" in error["message"]
        r = httpx.post(f"{s.url}/v1/completions", json={"prompt": "Hi", "max_tokens": 2}, timeout=60)
        assert r.status_code == 200
    with pytest.raises(EngineDeadError, match="shutting down"):
        asyncio.run(engine.run_on_model_thread(lambda: None))


def test_output_filters_apply_to_every_hypothesis(long_dir, ref_llm):
    from tokenmill.filters import parse_filters

    ref = ref_llm.beam_search(PROMPTS[0], BeamSearchParams(beam_width=3, max_tokens=12))[0]
    word = ref.sequences[0].text.strip()[:3]
    spec = {"name": "w", "kind": "regex", "patterns": [re.escape(word)], "action": "mask", "mask": "[w]"}
    expected = [h.text.replace(word, "[w]") for h in ref.sequences]
    assert expected[0] != ref.sequences[0].text
    engine = make_engine(long_dir)
    with serving(engine, filters=parse_filters({"filters": [spec]})) as s:
        with httpx.Client(base_url=s.url, timeout=60) as c:
            body = {"prompt": PROMPTS[0], "max_tokens": 12, "n": 3, "use_beam_search": True}
            data = c.post("/v1/completions", json=body).json()
            assert [ch["text"] for ch in data["choices"]] == expected
            assert data["usage"] == _usage(len(ref.prompt_token_ids), ref.sequences)
            events = _stream(c, "/v1/completions", body)
            for i, text in enumerate(expected):
                assert (
                    "".join(e["choices"][0]["text"] for e in events if e["choices"][0]["index"] == i) == text
                )


def test_device_out_of_memory_is_a_503(client, server_engine, monkeypatch):
    async def no_memory(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(server_engine, "beam_search", no_memory)
    body = {"prompt": [1, 2, 3], "max_tokens": 7, "n": 4, "use_beam_search": True}
    error = _error(client.post("/v1/completions", json=body), 503)
    assert error["code"] == "out_of_memory" and "(40 tokens" in error["message"]
    assert "lower n or max_tokens" in error["message"]
