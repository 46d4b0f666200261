"""Clients that leave, request deadlines, a full queue, an engine that stops."""

from __future__ import annotations

import threading
import time

import httpx
import pytest
from server_util import API_KEY, make_engine, metric_value, serving, sse_events, wait_idle

# About 3000 decode steps: seconds of work, so a test can leave in the middle.
LONG = {"prompt": "Hello", "max_tokens": 3000, "temperature": 0, "ignore_eos": True}


def _aborted(client) -> float:
    text = client.get("/metrics").text
    return metric_value(text, "tokenmill:request_success_total", 'finished_reason="abort"')


def _poll(fn, timeout: float = 2.0) -> None:
    end = time.monotonic() + timeout
    while not fn():
        assert time.monotonic() < end, "condition not met in time"
        time.sleep(0.02)


def test_a_streaming_client_that_leaves_frees_its_request(client, server_engine):
    before = _aborted(client)
    with client.stream("POST", "/v1/completions", json={**LONG, "stream": True}) as r:
        events = 0
        for line in r.iter_lines():
            events += bool(line)
            if events == 3:
                break
    wait_idle(server_engine)
    _poll(lambda: _aborted(client) == before + 1)
    assert client.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 3}).status_code == 200


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_a_client_that_times_out_frees_its_request(server, client, server_engine, path):
    before = _aborted(client)
    body = (
        dict(LONG) if path == "/v1/completions" else {**LONG, "messages": [{"role": "user", "content": "x"}]}
    )
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(
            f"{server.url}{path}", json=body, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=0.3
        )
    wait_idle(server_engine)
    _poll(lambda: _aborted(client) == before + 1)


@pytest.fixture(scope="module")
def deadline_server(long_dir):
    with serving(make_engine(long_dir), request_timeout=0.2) as s:
        yield s


def test_request_timeout_ends_requests_with_finish_reason_timeout(deadline_server):
    url = f"{deadline_server.url}/v1/completions"
    data = httpx.post(url, json=LONG, timeout=30).json()
    assert data["choices"][0]["finish_reason"] == "timeout"
    assert data["usage"]["completion_tokens"] < LONG["max_tokens"]
    with httpx.stream("POST", url, json={**LONG, "stream": True}, timeout=30) as r:
        events = list(sse_events(r.iter_lines()))
    assert events[-1] == "[DONE]" and events[-2]["choices"][0]["finish_reason"] == "timeout"


@pytest.fixture(scope="module")
def small_server(long_dir):
    """One sequence at a time and one waiting request at most."""
    engine = make_engine(long_dir, max_num_seqs=1, max_waiting=1)
    with serving(engine) as s:
        s.engine = engine
        yield s


def test_a_full_queue_is_503_with_retry_after(small_server):
    engine, url = small_server.engine, small_server.url
    with httpx.stream("POST", f"{url}/v1/completions", json={**LONG, "stream": True}, timeout=30) as running:
        lines = running.iter_lines()  # keep a reference: a collected iterator closes the response
        next(line for line in lines if line)  # A runs
        waiting = threading.Thread(
            target=httpx.post,
            args=(f"{url}/v1/completions",),
            kwargs={"json": {"prompt": "Hi", "max_tokens": 4}},
        )
        waiting.start()  # B waits: one sequence at a time
        _poll(lambda: engine.stats().num_waiting == 1)
        r = httpx.post(f"{url}/v1/completions", json={"prompt": "Hi", "max_tokens": 4})
        assert r.status_code == 503, r.text
        err = r.json()["error"]
        assert err["code"] == "engine_overloaded" and err["type"] == "server_error"
        assert r.headers["retry-after"] == "1"
    waiting.join(30)
    wait_idle(engine)
    assert httpx.get(f"{url}/health").json() == {"status": "ok"}


def test_an_engine_that_stops_midway_ends_the_stream_with_an_error_event(small_server):
    engine, url = small_server.engine, small_server.url
    with httpx.stream("POST", f"{url}/v1/completions", json={**LONG, "stream": True}, timeout=30) as r:
        lines = r.iter_lines()
        next(line for line in lines if line)
        small_server.call(engine.shutdown(timeout=0))
        events = list(sse_events(lines))
    assert events[-1] == "[DONE]"
    assert events[-2]["error"]["code"] == "engine_not_running"
    health = httpx.get(f"{url}/health")
    assert health.status_code == 503 and health.json()["status"] == "unavailable"
    r = httpx.post(f"{url}/v1/completions", json={"prompt": "Hi", "max_tokens": 2})
    assert r.status_code == 503 and r.json()["error"]["code"] == "engine_not_running"
    r = httpx.post(f"{url}/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}]})
    assert r.status_code == 503
    assert httpx.get(f"{url}/metrics").status_code == 200
