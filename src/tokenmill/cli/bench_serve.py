"""Load an OpenAI-compatible server with streaming requests and measure latency at the client.

A pure HTTP client: it needs no model and no tokenizer. Each request streams
(``"stream": true``) with ``ignore_eos`` and ``max_tokens = output_len``, so every request
generates exactly ``output_len`` tokens, and the client times each chunk as it arrives:

* TTFT: from sending the request to the first chunk with non-empty text;
* ITL: the gaps between consecutive chunks with text;
* TPOT: ``(e2e - ttft) / (output_tokens - 1)``, output tokens from the usage chunk
  (the count of text chunks when the server sends no usage);
* E2E: from sending the request to the end of its stream.

Random prompts: on ``/v1/completions`` a prompt is a list of ``input_len`` token ids drawn
uniformly from ``[1000, 10000)`` (ids every vocabulary of a usable size has, away from the
special tokens at the start), so the prompt length is exact. On ``/v1/chat/completions`` a
prompt is ``input_len`` common English words, each about one token with its leading space;
the chat template adds a few tokens around it.

    result = benchmark(BenchConfig(base_url="http://127.0.0.1:8000", num_prompts=32))
    print(format_report(result))
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import random
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Any

ENDPOINTS = ("/v1/completions", "/v1/chat/completions")
TOKEN_ID_RANGE = (1000, 10000)

# Common short English words; almost every BPE vocabulary has each as one token after a space.
WORDS = tuple(
    (
        "the of and to in is was for on that with as by at from his her this which but not are had have "
        "one all were they be been has their more its who two there can time into other new some these "
        "after first only most may over also any many such them where years made would than then when "
        "about each city state world year out used part later people well called known between during "
        "three while both under since through being high school family found local music south north east "
        "west small great large early life work team group house water light day night game book war land "
        "road river line area long place home name public power side end best back last free open good old "
        "little own right"
    ).split()
)


@dataclass
class BenchConfig:
    base_url: str = "http://127.0.0.1:8000"
    model: str | None = None  # None: the first model the server lists
    endpoint: str = "/v1/completions"
    api_key: str | None = None
    dataset: str = "random"  # "random" or "file"
    prompts_file: str | None = None
    input_len: int = 256
    output_len: int = 128
    num_prompts: int = 64
    request_rate: float = math.inf  # Poisson arrivals per second; inf sends all at once
    max_concurrency: int | None = None
    seed: int = 0
    # Prompts given directly (text or token-id lists); they replace the dataset.
    prompts: list[str | list[int]] | None = None
    request_timeout_s: float = 600.0


@dataclass
class RequestResult:
    ok: bool = False
    error: str | None = None
    start_s: float = 0.0  # when the request was sent, from the start of the benchmark
    ttft_s: float = 0.0
    itls_s: list[float] = field(default_factory=list)
    e2el_s: float = 0.0
    output_tokens: int = 0
    prompt_tokens: int | None = None


def validate(config: BenchConfig) -> None:
    """Raise ValueError naming the flag of the first bad setting."""
    if not config.base_url.startswith(("http://", "https://")):
        raise ValueError(f"--base-url must start with http:// or https://, got {config.base_url!r}")
    if config.endpoint not in ENDPOINTS:
        raise ValueError(f"--endpoint must be one of {', '.join(ENDPOINTS)}, got {config.endpoint!r}")
    if config.dataset not in ("random", "file"):
        raise ValueError(f"--dataset must be 'random' or 'file', got {config.dataset!r}")
    if config.dataset == "file" and config.prompts is None and not config.prompts_file:
        raise ValueError("--dataset file needs --prompts-file")
    for flag, value in (
        ("--num-prompts", config.num_prompts),
        ("--input-len", config.input_len),
        ("--output-len", config.output_len),
    ):
        if value < 1:
            raise ValueError(f"{flag} must be at least 1, got {value}")
    if math.isnan(config.request_rate) or config.request_rate <= 0:
        raise ValueError(f"--request-rate must be > 0 (inf sends all at once), got {config.request_rate}")
    if config.max_concurrency is not None and config.max_concurrency < 1:
        raise ValueError(f"--max-concurrency must be at least 1, got {config.max_concurrency}")


def random_token_prompts(num: int, input_len: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    lo, hi = TOKEN_ID_RANGE
    return [[rng.randrange(lo, hi) for _ in range(input_len)] for _ in range(num)]


def random_text_prompts(num: int, input_len: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(input_len)) for _ in range(num)]


def read_prompts_file(path: str | None) -> list[str]:
    if not path or not os.path.isfile(path):
        raise ValueError(f"--prompts-file {path!r} does not exist")
    with open(path, encoding="utf-8") as f:
        prompts = [line.rstrip("\n") for line in f if line.strip()]
    if not prompts:
        raise ValueError(f"--prompts-file {path!r} has no prompts (one per line, blank lines skipped)")
    return prompts


def make_prompts(config: BenchConfig) -> list[str | list[int]]:
    """`num_prompts` prompts; a file or a given list shorter than that is cycled."""
    if config.prompts is not None:
        source: list = list(config.prompts)
        if not source:
            raise ValueError("no prompts given")
    elif config.dataset == "file":
        source = read_prompts_file(config.prompts_file)
    elif config.endpoint == "/v1/completions":
        return random_token_prompts(config.num_prompts, config.input_len, config.seed)
    else:
        return random_text_prompts(config.num_prompts, config.input_len, config.seed)
    return [source[i % len(source)] for i in range(config.num_prompts)]


def arrival_offsets(num: int, rate: float, seed: int) -> list[float]:
    """Seconds after the start at which each request is sent: a Poisson process of `rate`/s."""
    if math.isinf(rate):
        return [0.0] * num
    rng = random.Random(seed)
    t, out = 0.0, [0.0]
    for _ in range(num - 1):
        t += rng.expovariate(rate)
        out.append(t)
    return out


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile with linear interpolation between the closest ranks (NumPy's default)."""
    if not values:
        return 0.0
    s = sorted(values)
    pos = (len(s) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def _stats_ms(name: str, values: list[float]) -> dict[str, float]:
    ms = [1000.0 * v for v in values]
    return {
        f"mean_{name}_ms": sum(ms) / len(ms) if ms else 0.0,
        f"median_{name}_ms": percentile(ms, 50),
        f"p99_{name}_ms": percentile(ms, 99),
    }


def _headers(api_key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


def _error_message(body: bytes | str) -> str:
    text = body.decode("utf-8", "replace") if isinstance(body, bytes) else body
    try:
        data = json.loads(text)
    except ValueError:
        return text.strip()[:500]
    err = data.get("error", data) if isinstance(data, dict) else data
    if isinstance(err, dict):
        return str(err.get("message") or err.get("detail") or err)
    return str(err)


async def resolve_model(client, config: BenchConfig) -> str:
    """Check that the server answers; return --model or the first model it lists."""
    import httpx

    url = config.base_url.rstrip("/") + "/v1/models"
    try:
        r = await client.get(url, headers=_headers(config.api_key), timeout=30.0)
    except httpx.HTTPError as e:
        reason = str(e) or type(e).__name__
        raise ValueError(f"cannot reach the server at --base-url {config.base_url}: {reason}") from None
    if r.status_code in (401, 403):
        raise ValueError(f"GET {url} returned {r.status_code} ({_error_message(r.content)}): check --api-key")
    if config.model:
        return config.model
    if r.status_code != 200:
        raise ValueError(f"GET {url} returned {r.status_code}; name the model with --model")
    try:
        return r.json()["data"][0]["id"]
    except (ValueError, KeyError, IndexError, TypeError):
        raise ValueError(f"GET {url} lists no model; name one with --model") from None


def _payload(config: BenchConfig, model: str, prompt: str | list[int]) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": model,
        "max_tokens": config.output_len,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if config.endpoint == "/v1/chat/completions":
        body["messages"] = [{"role": "user", "content": prompt}]
    else:
        body["prompt"] = prompt
    return body


async def _send(client, url: str, headers: dict, body: dict, chat: bool, t_start: float) -> RequestResult:
    res = RequestResult()
    t0 = time.perf_counter()
    res.start_s = t0 - t_start
    last = None
    chunks = 0
    usage_tokens = None
    try:
        async with client.stream("POST", url, json=body, headers=headers) as r:
            if r.status_code != 200:
                res.error = f"HTTP {r.status_code}: {_error_message(await r.aread())}"
                return res
            async for line in r.aiter_lines():
                line = line.strip()
                if not line.startswith("data:"):
                    continue  # blank separators, comments, "event:" lines
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                event = json.loads(data)
                if event.get("error"):
                    res.error = _error_message(json.dumps(event))
                    return res
                if event.get("usage"):
                    usage_tokens = event["usage"].get("completion_tokens")
                    res.prompt_tokens = event["usage"].get("prompt_tokens")
                for choice in event.get("choices") or []:
                    text = (choice.get("delta") or {}).get("content") if chat else choice.get("text")
                    if text:
                        now = time.perf_counter()
                        if last is None:
                            res.ttft_s = now - t0
                        else:
                            res.itls_s.append(now - last)
                        last = now
                        chunks += 1
        res.e2el_s = time.perf_counter() - t0
    except Exception as e:  # a broken request is counted as failed, never ends the benchmark
        res.error = f"{type(e).__name__}: {e}"
        return res
    if last is None:
        res.error = "the stream ended without any text"
        return res
    res.output_tokens = usage_tokens if usage_tokens is not None else chunks
    res.ok = True
    return res


async def run_benchmark(config: BenchConfig, log=None) -> dict[str, Any]:
    """Run the benchmark; return the metrics and the per-request arrays (see `summarize`)."""
    import httpx

    validate(config)
    if config.api_key is None and os.environ.get("TOKENMILL_API_KEY"):
        config = replace(config, api_key=os.environ["TOKENMILL_API_KEY"])
    prompts = make_prompts(config)
    offsets = arrival_offsets(len(prompts), config.request_rate, config.seed)
    limit = config.max_concurrency or len(prompts)
    limits = httpx.Limits(max_connections=limit, max_keepalive_connections=limit)
    timeout = httpx.Timeout(config.request_timeout_s, connect=30.0)
    async with httpx.AsyncClient(limits=limits, timeout=timeout) as client:
        model = await resolve_model(client, config)
        if log:
            log(
                f"{len(prompts)} requests to {config.base_url}{config.endpoint} (model {model}), "
                f"rate {config.request_rate}/s, max concurrency {config.max_concurrency or 'none'}"
            )
        url = config.base_url.rstrip("/") + config.endpoint
        headers = _headers(config.api_key)
        chat = config.endpoint == "/v1/chat/completions"
        sem = asyncio.Semaphore(limit)
        in_flight = peak = 0
        t_start = time.perf_counter()

        async def one(prompt, offset: float) -> RequestResult:
            nonlocal in_flight, peak
            delay = t_start + offset - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            async with sem:
                in_flight += 1
                peak = max(peak, in_flight)
                try:
                    return await _send(client, url, headers, _payload(config, model, prompt), chat, t_start)
                finally:
                    in_flight -= 1

        results = await asyncio.gather(*(one(p, o) for p, o in zip(prompts, offsets)))
        duration = time.perf_counter() - t_start
    input_lens = [
        r.prompt_tokens if r.prompt_tokens is not None else (len(p) if isinstance(p, list) else None)
        for r, p in zip(results, prompts)
    ]
    out = summarize(results, duration, input_lens)
    out.update(model=model, peak_concurrency=peak, config=_config_dict(config))
    return out


def _config_dict(config: BenchConfig) -> dict[str, Any]:
    d = asdict(config)
    d.pop("prompts")
    d["api_key"] = "***" if config.api_key else None
    d["request_rate"] = "inf" if math.isinf(config.request_rate) else config.request_rate
    return d


def summarize(results: list[RequestResult], duration_s: float, input_lens: list[int | None]) -> dict:
    ok = [r for r in results if r.ok]
    out_tokens = sum(r.output_tokens for r in ok)
    in_tokens = sum(n or 0 for r, n in zip(results, input_lens) if r.ok)
    errors = [r.error for r in results if not r.ok]
    metrics: dict[str, Any] = {
        "completed": len(ok),
        "failed": len(errors),
        "first_error": errors[0] if errors else None,
        "duration_s": duration_s,
        "total_input_tokens": in_tokens,
        "total_output_tokens": out_tokens,
        "request_throughput": len(ok) / duration_s if duration_s > 0 else 0.0,
        "output_throughput": out_tokens / duration_s if duration_s > 0 else 0.0,
        "total_token_throughput": (in_tokens + out_tokens) / duration_s if duration_s > 0 else 0.0,
    }
    tpots = [(r.e2el_s - r.ttft_s) / (r.output_tokens - 1) for r in ok if r.output_tokens > 1]
    metrics.update(_stats_ms("ttft", [r.ttft_s for r in ok]))
    metrics.update(_stats_ms("tpot", tpots))
    metrics.update(_stats_ms("itl", [x for r in ok for x in r.itls_s]))
    metrics.update(_stats_ms("e2el", [r.e2el_s for r in ok]))
    # Per request, in seconds, in prompt order; failed requests have zeros and their error.
    metrics.update(
        ttfts=[r.ttft_s for r in results],
        itls=[r.itls_s for r in results],
        e2els=[r.e2el_s for r in results],
        output_lens=[r.output_tokens for r in results],
        input_lens=input_lens,
        start_times=[r.start_s for r in results],
        errors=[r.error for r in results],
    )
    return metrics


def benchmark(config: BenchConfig | None = None, log=None, **overrides: Any) -> dict[str, Any]:
    """Synchronous wrapper of `run_benchmark`; keyword arguments override fields of `config`."""
    config = config or BenchConfig()
    for k, v in overrides.items():
        if not hasattr(config, k):
            raise TypeError(f"unknown benchmark setting {k!r}")
        setattr(config, k, v)
    return asyncio.run(run_benchmark(config, log=log))


def format_report(r: dict[str, Any]) -> str:
    width = 50
    rows: list[str] = [" Serving Benchmark Result ".center(width, "=")]

    def row(label: str, value: Any) -> None:
        text = f"{value:.2f}" if isinstance(value, float) else str(value)
        rows.append(f"{label:<40}{text:>10}")

    row("Model:", r.get("model", "?"))
    row("Successful requests:", r["completed"])
    row("Failed requests:", r["failed"])
    conc = (r.get("config") or {}).get("max_concurrency")
    row("Maximum request concurrency:", conc if conc is not None else "none")
    if "peak_concurrency" in r:
        row("Peak requests in flight:", r["peak_concurrency"])
    row("Benchmark duration (s):", r["duration_s"])
    row("Total input tokens:", r["total_input_tokens"])
    row("Total generated tokens:", r["total_output_tokens"])
    row("Request throughput (req/s):", r["request_throughput"])
    row("Output token throughput (tok/s):", r["output_throughput"])
    row("Total token throughput (tok/s):", r["total_token_throughput"])
    for key, title in (
        ("ttft", "Time to First Token"),
        ("tpot", "Time per Output Token (excl. 1st token)"),
        ("itl", "Inter-token Latency"),
        ("e2el", "End-to-end Latency"),
    ):
        rows.append(f" {title} ".center(width, "-"))
        name = key.upper()
        row(f"Mean {name} (ms):", r[f"mean_{key}_ms"])
        row(f"Median {name} (ms):", r[f"median_{key}_ms"])
        row(f"P99 {name} (ms):", r[f"p99_{key}_ms"])
    rows.append("=" * width)
    if r.get("first_error"):
        rows.append(f"First error: {r['first_error']}")
    return "\n".join(rows)
