"""Serving throughput and latency: `tokenmill serve` against transformers, same prompts, same machine.

(a) Starts `tokenmill serve` as a subprocess, waits for /health, and loads it over HTTP with
    the `tokenmill bench serve` client: random token-id prompts, greedy, `ignore_eos`, all
    requests queued at once and at most --concurrency in flight. TTFT, TPOT, ITL and E2E
    are measured at the client, so they include HTTP and detokenization.
(b) transformers in this process on the same prompt token ids, in its fastest bf16 form:
    (i)  `model.generate` on padded batches of --concurrency prompts (left padding, attention
         mask, min_new_tokens = max_new_tokens so every row generates --output-len tokens),
         the batch's first token timed with a streamer;
    (ii) continuous batching with `model.generate_batch` (at most --concurrency requests per
         batch), where the installed transformers has it, TTFT counted from the time a request
         is scheduled (the client's TTFT starts when a request may be sent, too).

The table gives both and the ratios against the better transformers row (by output
throughput): output tokens/s of tokenmill / transformers and p50 TTFT of transformers /
tokenmill, so > 1 means tokenmill is faster. JSON goes to benchmarks/results/.

    python benchmarks/bench_serve.py [--num-prompts 64] [--input-len 256] [--output-len 128]
                                     [--concurrency 16] [--hf-load auto] [--skip-server]
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time

import torch

from tokenmill.cli.bench_serve import BenchConfig, RequestResult, benchmark, random_token_prompts, summarize

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
HF_LOADS = ("gguf-direct", "gguf-fp32-cast", "resaved")


# ---------------------------------------------------------------- (a) tokenmill serve


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_healthy(url: str, proc: subprocess.Popen, timeout_s: float) -> float:
    import httpx

    t0 = time.perf_counter()
    while time.perf_counter() - t0 < timeout_s:
        if proc.poll() is not None:
            raise RuntimeError(f"tokenmill serve exited with code {proc.returncode} before it was healthy")
        try:
            if httpx.get(url + "/health", timeout=2.0).status_code == 200:
                return time.perf_counter() - t0
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"tokenmill serve was not healthy after {timeout_s:.0f} s")


def bench_tokenmill(args, prompts: list[list[int]], log_path: str) -> dict:
    port = args.port or _free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "tokenmill.cli.main", "serve", "--model", args.model]
    cmd += ["--dtype", args.dtype, "--device", "cpu", "--port", str(port), *shlex.split(args.server_args)]
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS=str(args.threads))
    print("starting:", " ".join(cmd), flush=True)
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        startup_s = _wait_healthy(url, proc, args.startup_timeout)
        print(f"server healthy after {startup_s:.1f} s; warming up", flush=True)
        warm = benchmark(
            BenchConfig(base_url=url, num_prompts=2, input_len=32, output_len=4, seed=args.seed + 1000)
        )
        if warm["completed"] != 2:
            raise RuntimeError(f"warm-up requests failed: {warm['first_error']}")
        config = BenchConfig(
            base_url=url,
            model=None,
            num_prompts=len(prompts),
            input_len=args.input_len,
            output_len=args.output_len,
            max_concurrency=args.concurrency,
            seed=args.seed,
            prompts=prompts,
        )
        result = benchmark(config)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            code = proc.wait()
            print("tokenmill serve did not stop within 60 s of SIGTERM; killed", flush=True)
    result["server_startup_s"] = startup_s
    result["server_exit_code"] = code
    if code != 0:
        print(f"WARNING: tokenmill serve exited with code {code} after SIGTERM (log: {log_path})")
    return result


# ---------------------------------------------------------------- (b) transformers


def _load_hf(form: str, path: str, dtype: torch.dtype):
    import transformers

    auto = transformers.AutoModelForCausalLM
    if not path.endswith(".gguf"):
        return auto.from_pretrained(path, dtype=dtype).eval()
    d, f = os.path.dirname(path), os.path.basename(path)
    if form == "gguf-direct":  # dequantized straight to the target dtype
        return auto.from_pretrained(d, gguf_file=f, dtype=dtype).eval()
    model = auto.from_pretrained(d, gguf_file=f, dtype=torch.float32).eval().to(dtype)
    if form == "gguf-fp32-cast":
        return model
    # "resaved": a plain checkpoint of the dequantized weights, loaded as a non-GGUF model.
    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = auto.from_config(config, dtype=dtype)
    plain.load_state_dict(model.state_dict())
    with tempfile.TemporaryDirectory() as tmp:
        plain.save_pretrained(tmp)
        return auto.from_pretrained(tmp, dtype=dtype).eval()


def _probe_tokens_per_s(model, batch: int) -> float:
    ids = torch.randint(1000, 10000, (batch, 32), generator=torch.Generator().manual_seed(0))
    kw = dict(do_sample=False, pad_token_id=0, max_new_tokens=16, min_new_tokens=16)
    with torch.inference_mode():
        t0 = time.perf_counter()
        model.generate(ids, **kw)
        return batch * 16 / (time.perf_counter() - t0)


def load_fastest_hf(args, path: str, dtype: torch.dtype):
    """Load transformers' model in each form asked for and keep the one that generates fastest.

    The probes alternate between the forms over a few rounds and keep each form's best, so a
    burst of other work on the machine does not decide the choice.
    """
    forms = HF_LOADS if args.hf_load == "auto" else (args.hf_load,)
    models, report = {}, {}
    for form in forms:
        t0 = time.perf_counter()
        models[form] = _load_hf(form, path, dtype)
        report[form] = {"load_s": round(time.perf_counter() - t0, 2)}
        print(f"transformers load {form}: {report[form]['load_s']:.1f} s", flush=True)
    if len(forms) == 1:
        return forms[0], models[forms[0]], report
    for m in models.values():  # warm-up
        _probe_tokens_per_s(m, 2)
    for _ in range(3):
        for form, m in models.items():
            probe = _probe_tokens_per_s(m, args.concurrency)
            report[form]["probe_tokens_per_s"] = round(
                max(probe, report[form].get("probe_tokens_per_s", 0)), 1
            )
    best = max(forms, key=lambda f: report[f]["probe_tokens_per_s"])
    print("transformers probes (tok/s):", {f: report[f]["probe_tokens_per_s"] for f in forms}, flush=True)
    return best, models[best], report


class _TokenTimes:
    """A generate streamer that records when each step's tokens arrive (the first put is the prompt)."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self.puts = 0

    def put(self, value) -> None:
        self.puts += 1
        if self.puts > 1:
            self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def _left_pad(batch: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for i, p in enumerate(batch):
        ids[i, width - len(p) :] = torch.tensor(p)
        mask[i, width - len(p) :] = 1
    return ids, mask


def bench_hf_generate(model, prompts: list[list[int]], output_len: int, batch: int, pad_id: int) -> dict:
    kw = dict(do_sample=False, pad_token_id=pad_id, max_new_tokens=output_len, min_new_tokens=output_len)
    results: list[RequestResult] = []
    with torch.inference_mode():
        ids, mask = _left_pad(prompts[:2], pad_id)  # warm-up
        model.generate(
            ids[:, :16], attention_mask=mask[:, :16], **dict(kw, max_new_tokens=4, min_new_tokens=4)
        )
        t_start = time.perf_counter()
        for i in range(0, len(prompts), batch):
            chunk = prompts[i : i + batch]
            ids, mask = _left_pad(chunk, pad_id)
            timer = _TokenTimes()
            t0 = time.perf_counter()
            out = model.generate(ids, attention_mask=mask, streamer=timer, **kw)
            t1 = time.perf_counter()
            new = out.shape[1] - ids.shape[1]
            if len(timer.times) != new:
                raise RuntimeError(f"streamer saw {len(timer.times)} steps for {new} new tokens")
            itls = [b - a for a, b in zip(timer.times, timer.times[1:])]
            for p in chunk:
                results.append(
                    RequestResult(
                        ok=True,
                        start_s=t0 - t_start,
                        ttft_s=timer.times[0] - t0,
                        itls_s=itls,
                        e2el_s=t1 - t0,
                        output_tokens=new,
                        prompt_tokens=len(p),
                    )
                )
        duration = time.perf_counter() - t_start
    return summarize(results, duration, [len(p) for p in prompts])


def bench_hf_generate_batch(model, prompts: list[list[int]], output_len: int, args) -> dict:
    import inspect

    from transformers import GenerationConfig
    from transformers.generation.configuration_utils import ContinuousBatchingConfig

    params = inspect.signature(ContinuousBatchingConfig).parameters
    page = 64
    need = args.concurrency * (max(len(p) for p in prompts) + output_len)
    cb_kwargs = dict(
        num_blocks=math.ceil(need / page) + args.concurrency,  # the KV cache of the requests in flight
        max_batch_tokens=args.cb_max_batch_tokens,
        max_requests_per_batch=args.concurrency,
        page_size=page,
    )
    cb = ContinuousBatchingConfig(**{k: v for k, v in cb_kwargs.items() if k in params})
    # No EOS: every request generates exactly output_len tokens, like ignore_eos on the server.
    gen = GenerationConfig(max_new_tokens=output_len, do_sample=False, eos_token_id=None, pad_token_id=0)
    warm = GenerationConfig(max_new_tokens=4, do_sample=False, eos_token_id=None, pad_token_id=0)
    model.generate_batch([p[:16] for p in prompts[:2]], generation_config=warm, continuous_batching_config=cb)
    t0 = time.perf_counter()
    outs = model.generate_batch(
        prompts, generation_config=gen, continuous_batching_config=cb, record_timestamps=True
    )
    duration = time.perf_counter() - t0
    results = []
    for o in outs.values():
        ts = o.timestamps or []
        if o.error or not ts:
            results.append(RequestResult(error=o.error or "no tokens"))
            continue
        scheduled, finished = o.lifespan
        results.append(
            RequestResult(
                ok=True,
                start_s=scheduled - t0,
                ttft_s=ts[0] - scheduled,
                itls_s=[b - a for a, b in zip(ts, ts[1:])],
                e2el_s=finished - scheduled,
                output_tokens=len(o.generated_tokens),
                prompt_tokens=len(o.prompt_ids),
            )
        )
    out = summarize(results, duration, [len(p) for p in prompts])
    out["cb_config"] = {k: v for k, v in cb_kwargs.items() if k in params}
    return out


# ---------------------------------------------------------------- report

ROW_KEYS = (
    ("request_throughput", "req/s", "{:.2f}"),
    ("output_throughput", "out tok/s", "{:.1f}"),
    ("median_ttft_ms", "TTFT p50 ms", "{:.0f}"),
    ("p99_ttft_ms", "TTFT p99 ms", "{:.0f}"),
    ("median_tpot_ms", "TPOT p50 ms", "{:.1f}"),
    ("median_itl_ms", "ITL p50 ms", "{:.1f}"),
    ("median_e2el_ms", "E2E p50 ms", "{:.0f}"),
)


def print_table(rows: dict[str, dict]) -> None:
    print("| system | ok/failed | " + " | ".join(k[1] for k in ROW_KEYS) + " |")
    print("|---|---|" + "---|" * len(ROW_KEYS))
    for name, r in rows.items():
        if "error" in r:
            print(f"| {name} | {r['error']} |")
            continue
        cells = [fmt.format(r[key]) for key, _, fmt in ROW_KEYS]
        print(f"| {name} | {r['completed']}/{r['failed']} | " + " | ".join(cells) + " |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--num-prompts", type=int, default=64)
    ap.add_argument("--input-len", type=int, default=256)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--concurrency", type=int, default=16, help="requests in flight / batch size")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    ap.add_argument("--port", type=int, default=0, help="server port (default: a free one)")
    ap.add_argument("--server-args", default="", help="extra `tokenmill serve` flags, one string")
    ap.add_argument("--startup-timeout", type=float, default=120.0)
    ap.add_argument("--hf-load", default="auto", choices=("auto", *HF_LOADS))
    ap.add_argument("--cb-max-batch-tokens", type=int, default=512, help="generate_batch token budget")
    ap.add_argument("--skip-server", action="store_true")
    ap.add_argument("--skip-transformers", action="store_true")
    ap.add_argument("--skip-generate-batch", action="store_true")
    ap.add_argument("--out", default=os.path.join(RESULTS_DIR, "bench_serve.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    os.makedirs(RESULTS_DIR, exist_ok=True)

    import transformers

    from tokenmill.weights.model_loader import resolve_source

    transformers.utils.logging.disable_progress_bar()

    prompts = random_token_prompts(args.num_prompts, args.input_len, args.seed)
    rows: dict[str, dict] = {}
    info = {
        "model": args.model,
        "dtype": args.dtype,
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "threads": args.threads,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "num_prompts": args.num_prompts,
        "input_len": args.input_len,
        "output_len": args.output_len,
        "concurrency": args.concurrency,
        "seed": args.seed,
        "load_average_at_start": os.getloadavg(),
    }
    # The server runs first and alone: the two never share the cores.
    if not args.skip_server:
        log_path = os.path.join(RESULTS_DIR, "bench_serve_server.log")
        try:
            rows["tokenmill serve"] = bench_tokenmill(args, prompts, log_path)
        except Exception as e:
            rows["tokenmill serve"] = {"error": f"{type(e).__name__}: {e}"}
            print(f"tokenmill serve failed: {e}; the server's log is {log_path}", flush=True)
    if not args.skip_transformers:
        path = resolve_source(args.model)
        form, model, load_report = load_fastest_hf(args, path, getattr(torch, args.dtype))
        info["hf_load"] = form
        info["hf_load_measured"] = load_report
        print(f"transformers model: {form} ({args.dtype})", flush=True)
        pad_id = model.generation_config.pad_token_id or 0
        rows[f"transformers generate (batches of {args.concurrency})"] = bench_hf_generate(
            model, prompts, args.output_len, args.concurrency, pad_id
        )
        name = f"transformers generate_batch (max {args.concurrency} per batch)"
        if args.skip_generate_batch:
            pass
        elif not hasattr(model, "generate_batch"):
            rows[name] = {"error": f"transformers {transformers.__version__} has no generate_batch"}
        else:
            try:
                rows[name] = bench_hf_generate_batch(model, prompts, args.output_len, args)
            except Exception as e:
                rows[name] = {"error": f"{type(e).__name__}: {e}"}
                print(f"generate_batch failed: {e}", flush=True)

    info["load_average_at_end"] = os.getloadavg()
    ratios = {}
    tm = rows.get("tokenmill serve", {})
    hf_ok = {k: v for k, v in rows.items() if k.startswith("transformers") and "error" not in v}
    if "error" not in tm and tm and hf_ok:
        best_name = max(hf_ok, key=lambda k: hf_ok[k]["output_throughput"])
        for name, r in hf_ok.items():
            ratios[name] = {
                "output_throughput_ratio": tm["output_throughput"] / r["output_throughput"],
                "p50_ttft_ratio": r["median_ttft_ms"] / tm["median_ttft_ms"],
            }
        ratios["best transformers"] = best_name

    print()
    print(json.dumps(info))
    print()
    print_table(rows)
    if ratios:
        print()
        print("| tokenmill vs | output tok/s ratio | p50 TTFT ratio (transformers / tokenmill) |")
        print("|---|---|---|")
        for name, r in ratios.items():
            if name != "best transformers":
                mark = " (best)" if name == ratios["best transformers"] else ""
                print(f"| {name}{mark} | {r['output_throughput_ratio']:.2f}x | {r['p50_ttft_ratio']:.2f}x |")
    with open(args.out, "w") as f:
        json.dump({"info": info, "results": rows, "ratios": ratios}, f, indent=1)
    print(f"\nresults written to {args.out}")


if __name__ == "__main__":
    main()
