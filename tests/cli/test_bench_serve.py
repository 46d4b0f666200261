"""`tokenmill bench serve` against a fake OpenAI-compatible streaming server (no model needed).

The fake streams one chunk per requested token after known sleeps, records when requests
arrive and how many are in flight, and fails on request: a prompt containing "BAD" gets a
400, one containing "BREAK" gets an error event in the middle of its stream.
"""

# No `from __future__ import annotations` here: FastAPI reads the handlers' annotations at run time.
import asyncio
import json
import socket
import threading
import time

import pytest

from tokenmill.cli.bench_serve import (
    BenchConfig,
    arrival_offsets,
    benchmark,
    format_report,
    percentile,
    random_text_prompts,
    random_token_prompts,
)
from tokenmill.cli.main import main

FIRST_SLEEP = 0.05
CHUNK_SLEEP = 0.005


class FakeServer:
    def __init__(self) -> None:
        self.in_flight = 0
        self.peak = 0
        self.arrivals: list[float] = []
        self.bodies: list[dict] = []
        self.send_usage = True
        self.app = self._make_app()
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"

    def reset(self) -> None:
        self.in_flight = self.peak = 0
        self.arrivals.clear()
        self.bodies.clear()
        self.send_usage = True

    def _make_app(self):
        from fastapi import FastAPI, Request
        from fastapi.responses import JSONResponse, StreamingResponse

        app = FastAPI()

        @app.get("/v1/models")
        async def models(request: Request):
            if request.headers.get("authorization") == "Bearer wrong":
                return JSONResponse({"error": {"message": "invalid API key"}}, status_code=401)
            return {"object": "list", "data": [{"id": "fake-model", "object": "model"}]}

        async def complete(request: Request, chat: bool):
            body = await request.json()
            self.arrivals.append(time.perf_counter())
            self.bodies.append(body)
            prompt = body["messages"][-1]["content"] if chat else body["prompt"]
            text = prompt if isinstance(prompt, str) else ""
            if "BAD" in text:
                return JSONResponse({"error": {"message": "prompt is BAD", "code": 400}}, status_code=400)
            n = body["max_tokens"]
            prompt_tokens = len(prompt) if isinstance(prompt, list) else len(text.split())

            async def events():
                self.in_flight += 1
                self.peak = max(self.peak, self.in_flight)
                try:
                    if chat:  # the role comes first, with no text: not the first token
                        yield _sse({"choices": [{"index": 0, "delta": {"role": "assistant"}}]})
                    await asyncio.sleep(FIRST_SLEEP)
                    for i in range(n):
                        if i:
                            await asyncio.sleep(CHUNK_SLEEP)
                        if "BREAK" in text and i == 2:
                            yield _sse({"error": {"message": "engine failed mid-stream", "code": 500}})
                            return
                        piece = {"delta": {"content": f" t{i}"}} if chat else {"text": f" t{i}"}
                        yield _sse({"choices": [{"index": 0, **piece, "finish_reason": None}]})
                    if self.send_usage:
                        usage = {"prompt_tokens": prompt_tokens, "completion_tokens": n}
                        yield _sse({"choices": [], "usage": usage})
                    yield "data: [DONE]\n\n"
                finally:
                    self.in_flight -= 1

            return StreamingResponse(events(), media_type="text/event-stream")

        @app.post("/v1/completions")
        async def completions(request: Request):
            return await complete(request, chat=False)

        @app.post("/v1/chat/completions")
        async def chat_completions(request: Request):
            return await complete(request, chat=True)

        return app


def _sse(obj: dict) -> str:
    return f"data: {json.dumps(obj)}\n\n"


@pytest.fixture(scope="module")
def fake():
    import uvicorn

    server = FakeServer()
    uv = uvicorn.Server(uvicorn.Config(server.app, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=uv.run, kwargs={"sockets": [server.sock]}, daemon=True)
    thread.start()
    deadline = time.time() + 10
    while not uv.started and time.time() < deadline:
        time.sleep(0.02)
    assert uv.started
    yield server
    uv.should_exit = True
    thread.join(timeout=5)


@pytest.fixture
def srv(fake):
    fake.reset()
    return fake


def test_completions_counts_tokens_and_times(srv):
    r = benchmark(BenchConfig(base_url=srv.url, num_prompts=6, input_len=12, output_len=5))
    assert r["model"] == "fake-model"
    assert (r["completed"], r["failed"]) == (6, 0)
    assert r["total_output_tokens"] == 30 and r["output_lens"] == [5] * 6
    assert r["total_input_tokens"] == 72
    # Random prompts on /v1/completions are exact token-id lists, with the streaming settings.
    body = srv.bodies[0]
    assert len(body["prompt"]) == 12 and all(1000 <= t < 10000 for t in body["prompt"])
    assert body["stream"] is True and body["ignore_eos"] is True and body["max_tokens"] == 5
    assert body["stream_options"] == {"include_usage": True} and body["temperature"] == 0
    assert min(r["ttfts"]) >= FIRST_SLEEP
    assert all(len(x) == 4 for x in r["itls"])
    assert r["median_itl_ms"] >= 0.8 * 1000 * CHUNK_SLEEP
    assert r["mean_tpot_ms"] >= 0.8 * 1000 * CHUNK_SLEEP
    assert r["mean_e2el_ms"] >= 1000 * (FIRST_SLEEP + 4 * CHUNK_SLEEP)
    assert r["output_throughput"] == pytest.approx(30 / r["duration_s"])
    report = format_report(r)
    assert "Successful requests:" in report and "Median TTFT (ms):" in report and "P99 ITL (ms):" in report


def test_chat_endpoint_skips_the_role_chunk_and_counts_chunks_without_usage(srv):
    srv.send_usage = False
    r = benchmark(
        BenchConfig(
            base_url=srv.url, endpoint="/v1/chat/completions", num_prompts=3, input_len=20, output_len=4
        )
    )
    assert (r["completed"], r["failed"]) == (3, 0)
    assert r["output_lens"] == [4, 4, 4]  # counted chunks: the server sent no usage
    assert min(r["ttfts"]) >= FIRST_SLEEP
    content = srv.bodies[0]["messages"][0]["content"]
    assert isinstance(content, str) and len(content.split()) == 20


def test_max_concurrency_is_respected(srv):
    r = benchmark(BenchConfig(base_url=srv.url, num_prompts=8, output_len=3, max_concurrency=2))
    assert r["completed"] == 8
    assert srv.peak == 2 and r["peak_concurrency"] == 2
    # Without the bound the requests overlap freely.
    srv.reset()
    r = benchmark(BenchConfig(base_url=srv.url, num_prompts=8, output_len=3))
    assert srv.peak > 2 and r["peak_concurrency"] == 8


def test_poisson_rate_spreads_arrivals(srv):
    rate, n, seed = 25.0, 8, 3
    expected = arrival_offsets(n, rate, seed)
    assert expected[0] == 0 and all(b > a for a, b in zip(expected, expected[1:]))
    r = benchmark(BenchConfig(base_url=srv.url, num_prompts=n, output_len=2, request_rate=rate, seed=seed))
    assert r["completed"] == n
    span = max(srv.arrivals) - min(srv.arrivals)
    assert span >= 0.8 * expected[-1]
    starts = r["start_times"]
    assert all(s >= e - 0.005 for s, e in zip(starts, expected))
    # At an infinite rate all requests leave at once.
    srv.reset()
    benchmark(BenchConfig(base_url=srv.url, num_prompts=n, output_len=2))
    assert max(srv.arrivals) - min(srv.arrivals) < expected[-1] / 2


def test_failures_are_counted_not_fatal(srv, tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("hello there\n\nBAD prompt\nplease BREAK here\nfine one\n")
    r = benchmark(
        BenchConfig(base_url=srv.url, dataset="file", prompts_file=str(path), num_prompts=4, output_len=5)
    )
    assert (r["completed"], r["failed"]) == (2, 2)
    assert r["errors"][1] == "HTTP 400: prompt is BAD"
    assert "mid-stream" in r["errors"][2]
    assert r["first_error"] == "HTTP 400: prompt is BAD"
    assert r["total_output_tokens"] == 10 and r["total_input_tokens"] == 4
    assert "First error: HTTP 400" in format_report(r)


def test_bad_settings_raise_clear_errors(srv, tmp_path):
    cases = [
        (dict(num_prompts=0), "--num-prompts"),
        (dict(input_len=0), "--input-len"),
        (dict(output_len=-1), "--output-len"),
        (dict(max_concurrency=0), "--max-concurrency"),
        (dict(request_rate=0.0), "--request-rate"),
        (dict(dataset="file", prompts_file=str(tmp_path / "missing.txt")), "missing.txt"),
        (dict(base_url="127.0.0.1:1"), "--base-url"),
        (dict(api_key="wrong"), "--api-key"),
    ]
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    cases.append((dict(dataset="file", prompts_file=str(empty)), "empty.txt"))
    for overrides, needle in cases:
        with pytest.raises(ValueError, match=needle.replace(".", r"\.")):
            benchmark(BenchConfig(base_url=srv.url, num_prompts=1, output_len=1), **overrides)
    # Nothing listens on a port we just closed.
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    with pytest.raises(ValueError, match="cannot reach the server at --base-url"):
        benchmark(BenchConfig(base_url=f"http://127.0.0.1:{port}", num_prompts=1))


def test_random_prompts_are_seeded():
    assert random_token_prompts(2, 5, 1) == random_token_prompts(2, 5, 1) != random_token_prompts(2, 5, 2)
    assert len(random_text_prompts(1, 30, 0)[0].split()) == 30
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.5 and percentile([5.0], 99) == 5.0


def test_cli_writes_json(srv, tmp_path, capsys):
    out = tmp_path / "res" / "bench.json"
    rc = main(
        ["bench", "serve", "--base-url", srv.url, "--num-prompts", "4", "--input-len", "8"]
        + ["--output-len", "3", "--max-concurrency", "2", "--json-out", str(out)]
    )
    assert rc == 0
    printed = capsys.readouterr().out
    assert "Serving Benchmark Result" in printed and "Output token throughput" in printed
    data = json.loads(out.read_text())
    assert data["completed"] == 4 and data["total_output_tokens"] == 12
    assert len(data["ttfts"]) == 4 and len(data["itls"][0]) == 2 and data["output_lens"] == [3] * 4
    assert data["config"]["max_concurrency"] == 2 and data["config"]["request_rate"] == "inf"


def test_cli_bad_flags_exit_2(srv, capsys, monkeypatch):
    assert main(["bench", "serve", "--base-url", srv.url, "--num-prompts", "0"]) == 2
    assert "--num-prompts must be at least 1" in capsys.readouterr().err
    assert main(["bench", "serve", "--base-url", srv.url, "--dataset", "file"]) == 2
    assert "--prompts-file" in capsys.readouterr().err
    monkeypatch.setenv("TOKENMILL_API_KEY", "wrong")  # the key comes from the environment by default
    assert main(["bench", "serve", "--base-url", srv.url, "--num-prompts", "1"]) == 2
    assert "--api-key" in capsys.readouterr().err
