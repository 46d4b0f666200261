"""Few-row linear layers on CPU: the C kernels against the PyTorch paths they replace.

For each of SmolLM2-135M's linear shapes (in -> out: 576->1536, 1536->576, 576->576,
576->192 and the 576->49152 LM head) and row counts (default 1 and 4), the median time of

* bf16: ``F.linear`` on the plain (N, K) weight (ATen's GEMV, what a single decode row
  took before) and oneDNN on the pre-packed weight (what more rows take), against the
  ``bf16_gemv`` kernel (kernels/bf16_gemv.c) on the same plain weight;
* int4 (group 32): ``aten._weight_int4pack_mm_for_cpu`` against the ``int4_mm`` kernel
  (kernels/int4_gemv.c) on the same codes, scales and zeros.

Each time is the median of ``--reps`` timed batches of ``--inner`` calls, the variants of
one shape interleaved batch by batch; the minimum is printed too, the better estimate of
the unloaded speed on a shared machine. Every call reads the next of enough copies of the
weights to exceed the last-level cache (``--cache-mb``), so the weights come from memory
as in a decode step. The GB/s column is the weight bytes read per call (codes plus scales
for int4) over the time.

``--e2e`` measures batch-1 decode tokens/s of ``LLM("smollm2-135m-instruct",
dtype="bfloat16")`` and of the same with ``quantization="int4"`` (128 new tokens, greedy),
with and without the kernels, the four variants interleaved round by round (medians over
``--rounds``): bf16 without the kernel takes ATen's GEMV (the kernel switched off in the
same model), int4 without it is a second model packed for ``_weight_int4pack_mm_for_cpu``.
It also says whether the greedy tokens agree. Run on an idle machine for numbers to quote:

    python benchmarks/bench_gemv.py [--rows 1,4] [--reps 15] [--inner 20]
    python benchmarks/bench_gemv.py --e2e [--rounds 5]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from tokenmill.layers import cpu_kernels

SHAPES = [(576, 1536), (1536, 576), (576, 576), (576, 192), (576, 49152)]  # (in, out)
MODEL = "smollm2-135m-instruct"


def _time(fns: dict, reps: int, inner: int) -> dict[str, tuple[float, float]]:
    """(median, min) seconds per call of each function, the functions interleaved batch by batch."""
    for fn in fns.values():  # warm up
        fn()
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            for _ in range(inner):
                fn()
            samples[name].append((time.perf_counter() - t0) / inner)
    return {name: (statistics.median(v), min(v)) for name, v in samples.items()}


def _cycling(fn, x: torch.Tensor, copies: list):
    """A call of ``fn(x, *copy)`` on the next of ``copies`` each time."""
    state = {"i": 0}

    def call():
        state["i"] = (state["i"] + 1) % len(copies)
        return fn(x, *copies[state["i"]])

    return call


def kernels(args) -> None:
    rows_list = [int(r) for r in args.rows.split(",")]
    G = args.group_size
    cache = args.cache_mb * 2**20
    torch.manual_seed(0)
    print(f"{'shape':>12} {'rows':>4} {'variant':>12} {'median us':>10} {'min us':>9} {'GB/s at min':>11}")
    for K, N in SHAPES:
        bf16_bytes = N * K * 2
        int4_bytes = N * K // 2 + (K // G) * N * 4
        n_bf16 = max(1, -(-cache // bf16_bytes))
        n_int4 = max(1, -(-cache // int4_bytes))
        ws = [torch.randn(N, K, dtype=torch.bfloat16) for _ in range(n_bf16)]
        bf16 = [(w,) for w in ws]
        onednn = [(torch.ops.mkldnn._reorder_linear_weight(w, 16),) for w in ws]
        aten4, ours4 = [], []
        for _ in range(n_int4):
            codes = torch.randint(0, 16, (N, K), dtype=torch.uint8)
            sz = torch.stack([torch.rand(K // G, N) / 10, torch.randn(K // G, N) / 10], -1).to(torch.bfloat16)
            aten4.append((torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32), 1), sz))
            if cpu_kernels.int4_available():
                ours4.append((cpu_kernels.int4_pack(codes, G), sz))
        for M in rows_list:
            x = torch.randn(M, K, dtype=torch.bfloat16)
            fns = {
                "bf16 aten": _cycling(F.linear, x, bf16),
                "bf16 onednn": _cycling(
                    lambda x, p: torch.ops.mkldnn._linear_pointwise(x, p, None, "none", [], ""), x, onednn
                ),
            }
            if cpu_kernels.bf16_gemv_available() and M <= cpu_kernels.BF16_GEMV_MAX_ROWS:
                fns["bf16 kernel"] = _cycling(cpu_kernels.bf16_gemv, x, bf16)
            fns["int4 aten"] = _cycling(
                lambda x, q, sz: torch.ops.aten._weight_int4pack_mm_for_cpu(x, q, G, sz), x, aten4
            )
            if ours4:
                fns["int4 kernel"] = _cycling(
                    lambda x, q, sz, n=N: cpu_kernels.int4_mm(x, q, sz, n, G), x, ours4
                )
            times = _time(fns, args.reps, args.inner)
            for name, (med, best) in times.items():
                nbytes = int4_bytes if name.startswith("int4") else bf16_bytes
                print(
                    f"{K:>5}->{N:<6} {M:>4} {name:>12} {med * 1e6:>10.1f} {best * 1e6:>9.1f} "
                    f"{nbytes / best / 1e9:>11.1f}",
                    flush=True,
                )


def e2e(args) -> None:
    from tokenmill import LLM, SamplingParams

    real_available = cpu_kernels.int4_available
    cpu_kernels.int4_available = lambda: False  # a model packed for PyTorch's int4 kernel
    int4_before = LLM(MODEL, dtype="bfloat16", quantization="int4")
    cpu_kernels.int4_available = real_available
    int4_after = LLM(MODEL, dtype="bfloat16", quantization="int4")
    bf16 = LLM(MODEL, dtype="bfloat16")
    real_gemv = cpu_kernels.bf16_gemv_available
    variants = {
        "bf16 before": (bf16, False),
        "bf16 after": (bf16, True),
        "int4 before": (int4_before, True),
        "int4 after": (int4_after, True),
    }
    params = SamplingParams(temperature=0, max_tokens=args.new_tokens, ignore_eos=True)
    prompt = "Write a short story about a lighthouse keeper."
    rates: dict[str, list[float]] = {name: [] for name in variants}
    tokens: dict[str, list[int]] = {}
    for r in range(args.rounds + 1):  # round 0 warms up
        names = list(variants)
        names = names[r % len(names) :] + names[: r % len(names)]  # rotate, so drift hits all alike
        for name in names:
            llm, gemv = variants[name]
            cpu_kernels.bf16_gemv_available = real_gemv if gemv else (lambda: False)
            out = llm.generate([prompt], params)[0]
            cpu_kernels.bf16_gemv_available = real_gemv
            tokens[name] = list(out.outputs[0].token_ids)
            if r:
                rates[name].append(out.metrics.decode_tokens_per_s)
    print(f"batch-1 decode tok/s, {args.new_tokens} new tokens, medians of {args.rounds} rounds")
    for name, v in rates.items():
        print(f"{name:>12}: {statistics.median(v):7.1f}   ({', '.join(f'{x:.1f}' for x in v)})")
    for kind in ("bf16", "int4"):
        same = tokens[f"{kind} before"] == tokens[f"{kind} after"]
        print(f"{kind}: greedy tokens {'identical' if same else 'differ'} before/after")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", default="1,4", help="comma-separated row counts")
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--inner", type=int, default=20)
    ap.add_argument("--group-size", type=int, default=32)
    ap.add_argument("--cache-mb", type=int, default=64, help="weight copies to cycle through per shape")
    ap.add_argument("--e2e", action="store_true", help="decode tok/s of the whole model instead")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: all cores)")
    ap.add_argument("--new-tokens", type=int, default=128)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    e2e(args) if args.e2e else kernels(args)


if __name__ == "__main__":
    main()
