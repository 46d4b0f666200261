"""tokenmill vs transformers, side by side in one process, same model, dtype and prompt.

For each dtype: time to first token (TTFT) for a 512-token prompt and batch-1 decode
tokens/s over 128 new tokens; medians over interleaved rounds, and the median of the
per-round speedups (tokenmill / transformers for tokens/s, transformers / tokenmill for
TTFT, so > 1 means tokenmill is faster).

    python benchmarks/bench_generate.py [--model smollm2-135m-instruct] [--rounds 5]
        [--dtypes bfloat16,float32] [--quantization none,w4a8]

``--quantization`` applies to tokenmill's weights only; transformers runs each dtype
unquantized (loaded once per dtype).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import torch

PROMPT_TEXT = (
    "The history of the printing press begins in the fifteenth century, when movable type "
    "changed how books were made, sold and read across Europe. "
)


def prompt_ids(tokenizer, n: int) -> list[int]:
    ids: list[int] = []
    while len(ids) < n:
        ids += tokenizer.encode(PROMPT_TEXT, add_special_tokens=False)
    return ids[:n]


def bench_tokenmill(llm, ids: list[int], new_tokens: int) -> tuple[float, float]:
    from tokenmill import SamplingParams

    first = llm.generate([ids], SamplingParams(temperature=0, max_tokens=1))[0]
    out = llm.generate([ids[:8]], SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True))[0]
    assert len(out.outputs[0].token_ids) == new_tokens
    return first.metrics.ttft_s, out.metrics.decode_tokens_per_s


def bench_transformers(model, ids: list[int], new_tokens: int) -> tuple[float, float]:
    kwargs = dict(do_sample=False, pad_token_id=0)
    with torch.inference_mode():
        t0 = time.perf_counter()
        model.generate(torch.tensor([ids]), max_new_tokens=1, **kwargs)
        ttft = time.perf_counter() - t0
        short = torch.tensor([ids[:8]])
        t0 = time.perf_counter()
        model.generate(short, max_new_tokens=1, **kwargs)
        t1 = time.perf_counter()
        model.generate(short, max_new_tokens=new_tokens, min_new_tokens=new_tokens, **kwargs)
        t2 = time.perf_counter()
    # Decode rate: the extra tokens over the extra time, with the prefill subtracted.
    return ttft, (new_tokens - 1) / ((t2 - t1) - (t1 - t0))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--dtypes", default="bfloat16,float32")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--prompt-tokens", type=int, default=512)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--quantization", default="none", help="tokenmill weight modes, e.g. none,w4a8")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    import transformers

    from tokenmill import LLM
    from tokenmill.weights.model_loader import resolve_source

    path = resolve_source(args.model)
    results = {}
    hf_models = {}
    for dtype_name in args.dtypes.split(","):
        for quant in args.quantization.split(","):
            dtype = getattr(torch, dtype_name)
            kwargs = {} if quant == "none" else {"quantization": quant}
            # Every round sends the same prompt: without this its blocks would come from the
            # prefix cache and TTFT would not include the prefill.
            llm = LLM(args.model, dtype=dtype_name, device="cpu", enable_prefix_caching=False, **kwargs)
            if dtype_name not in hf_models:
                if path.endswith(".gguf"):
                    hf_models[dtype_name] = transformers.AutoModelForCausalLM.from_pretrained(
                        os.path.dirname(path), gguf_file=os.path.basename(path), dtype=dtype
                    ).eval()
                else:
                    hf_models[dtype_name] = transformers.AutoModelForCausalLM.from_pretrained(
                        path, dtype=dtype
                    ).eval()
            hf = hf_models[dtype_name]
            ids = prompt_ids(llm.get_tokenizer(), args.prompt_tokens)
            bench_tokenmill(llm, ids, 8)  # warm-up both
            bench_transformers(hf, ids, 8)
            rows = {"tokenmill": [], "transformers": []}
            for _ in range(args.rounds):  # interleaved so drift hits both alike
                rows["tokenmill"].append(bench_tokenmill(llm, ids, args.new_tokens))
                rows["transformers"].append(bench_transformers(hf, ids, args.new_tokens))
            med = {
                name: {
                    "ttft_ms": 1000 * statistics.median(r[0] for r in vals),
                    "decode_tokens_per_s": statistics.median(r[1] for r in vals),
                }
                for name, vals in rows.items()
            }
            med["ratio"] = {
                "ttft_speedup": med["transformers"]["ttft_ms"] / med["tokenmill"]["ttft_ms"],
                "decode_speedup": med["tokenmill"]["decode_tokens_per_s"]
                / med["transformers"]["decode_tokens_per_s"],
            }
            med["rounds"] = {
                name: [[round(1000 * t, 1), round(r, 2)] for t, r in vals] for name, vals in rows.items()
            }
            results[dtype_name if quant == "none" else f"{dtype_name}, {quant} weights"] = med
            del llm
    info = {
        "model": args.model,
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "threads": torch.get_num_threads(),
        "rounds": args.rounds,
        "prompt_tokens": args.prompt_tokens,
        "new_tokens": args.new_tokens,
        "quantization": args.quantization,
    }
    print(json.dumps({"info": info, "results": results}))
    print()
    print(
        "| dtype | TTFT 512 tok: tokenmill | transformers | speedup | decode tok/s: tokenmill | transformers | speedup |"
    )
    print("|---|---|---|---|---|---|---|")
    for dt, r in results.items():
        print(
            f"| {dt} | {r['tokenmill']['ttft_ms']:.0f} ms | {r['transformers']['ttft_ms']:.0f} ms | "
            f"{r['ratio']['ttft_speedup']:.2f}x | {r['tokenmill']['decode_tokens_per_s']:.1f} | "
            f"{r['transformers']['decode_tokens_per_s']:.1f} | {r['ratio']['decode_speedup']:.2f}x |"
        )


if __name__ == "__main__":
    main()
