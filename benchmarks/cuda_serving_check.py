"""One prepared check of the paged engine on a CUDA machine: correctness, then throughput.

1. The Triton decode kernel against the PyTorch reference path on random paged caches.
2. Engine invariance on CUDA: 50 staggered requests through the paged engine (fp32)
   equal each request run alone on the dense path, for several tiny architectures,
   with prefix caching and with a pool small enough to preempt.
3. Throughput of a SmolLM2-shaped model with random bf16 weights: ``LLM.generate`` over
   16 and 64 prompts against transformers' padded ``generate`` batch of the same prompts.

    PYTHONPATH=src:tests python benchmarks/cuda_serving_check.py --tokenizer DIR
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import torch


def kernel_check() -> dict:
    from tokenmill.layers import triton_kernels
    from tokenmill.layers.paged_attention import PagedAttention, PagedKVCache

    out = {}
    torch.manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        for H, Hkv, D in ((9, 3, 64), (8, 8, 128), (16, 2, 64)):
            R, bs = 12, 16
            NB = R * (600 // bs + 1) + 8
            kc = torch.randn(NB, bs, Hkv, D, device="cuda").to(dtype)
            vc = torch.randn(NB, bs, Hkv, D, device="cuda").to(dtype)
            lens = torch.randint(1, 600, (R,), device="cuda")
            width = int(-(-int(lens.max()) // bs))
            tables = torch.randperm(NB, device="cuda")[: R * width].view(R, width)
            q = torch.randn(R, H, D, device="cuda").to(dtype)
            cache = PagedKVCache(1, 1, bs, Hkv, D, dtype, torch.device("cuda"))
            for window in (None, 100):
                ctx = PagedAttention(cache, torch.zeros(0), 0, R, tables, lens, use_kernels=False)
                ref = ctx._decode(q, kc, vc, D**-0.5, window)
                got = triton_kernels.paged_decode(q, kc, vc, tables, lens, D**-0.5, window)
                err = (ref.float() - got.float()).abs().max().item()
                out[f"{dtype}-{H}/{Hkv}x{D}-w{window}"] = err
    print("kernel max abs err", json.dumps(out, indent=1), flush=True)
    return out


def engine_check() -> dict:
    import tiny
    import workload as t
    from tokenmill.weights.model_loader import load_model

    torch.backends.cuda.matmul.allow_tf32 = False
    root = tempfile.mkdtemp()
    report = {}
    for arch in ("llama", "gemma3", "mistral", "qwen3", "gpt2"):
        loaded = load_model(tiny.save_tiny_dir(arch, root), dtype="float32", device="cuda")
        base = t._engine(loaded)
        refs = [t._dense_alone(base, p, m) for p, m, _ in t._workload()]
        res = {}
        for name, kw in (
            ("prefix_caching", {}),
            ("no_prefix_caching", {"enable_prefix_caching": False}),
            ("preempting", {"kv_cache_memory": 72 * base.runner.kv_bytes_per_block(4), "max_num_seqs": 16}),
        ):
            engine = t._engine(loaded, **kw)
            outs, counted = t._run(engine, t._workload())
            res[name] = {
                "equal": [outs[i] for i in range(50)] == refs,
                "preemptions": counted["preemptions"],
                "prefix_hits": counted["prefix_hits"],
            }
        report[arch] = res
        print(arch, res, flush=True)
    return report


def make_smollm2_shape(tokenizer_dir: str) -> str:
    import shutil

    import transformers
    from cuda_check import smollm2_shape_config

    cfg = smollm2_shape_config(bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).to(torch.bfloat16)
    d = tempfile.mkdtemp()
    model.save_pretrained(d)
    for name in os.listdir(tokenizer_dir):
        shutil.copy(os.path.join(tokenizer_dir, name), d)
    return d


def throughput(model_dir: str, rounds: int) -> dict:
    import transformers

    from tokenmill import LLM, SamplingParams

    llm = LLM(model_dir, dtype="bfloat16", device="cuda", max_batch_size=64, max_num_batched_tokens=4096)
    hf = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).cuda().eval()
    g = torch.Generator().manual_seed(0)
    P, N = 256, 128
    res = {}
    for batch in (16, 64):
        prompts = torch.randint(1000, 10000, (batch, P), generator=g)
        sp = SamplingParams(max_tokens=N, temperature=0, ignore_eos=True)

        def ours(prompts=prompts, sp=sp, batch=batch):
            llm.engine.kv.pool.reset_cache()
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            outs = llm.generate(prompts.tolist(), sp)
            dt = time.perf_counter() - t0
            ttft = sorted(o.metrics.ttft_s for o in outs)[batch // 2]
            return batch * N / dt, ttft

        def theirs(prompts=prompts, batch=batch):
            ids = prompts.cuda()
            with torch.inference_mode():
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                hf.generate(ids, max_new_tokens=1, do_sample=False, pad_token_id=0)
                t1 = time.perf_counter()
                hf.generate(ids, max_new_tokens=N, min_new_tokens=N, do_sample=False, pad_token_id=0)
                t2 = time.perf_counter()
            return batch * N / (t2 - t1), t1 - t0

        ours(), theirs()
        a = sorted(ours() for _ in range(rounds))[rounds // 2]
        b = sorted(theirs() for _ in range(rounds))[rounds // 2]
        res[batch] = {
            "tokenmill_tok_s": a[0],
            "tokenmill_p50_ttft_ms": 1000 * a[1],
            "transformers_tok_s": b[0],
            "transformers_ttft_ms": 1000 * b[1],
            "throughput_ratio": a[0] / b[0],
        }
        print(batch, res[batch], flush=True)
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokenizer", required=True, help="directory with tokenizer.json of a 49152-token vocab")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    info = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    print(info, flush=True)
    result = {"info": info, "kernel": kernel_check(), "engine": engine_check()}
    result["throughput"] = throughput(make_smollm2_shape(args.tokenizer), args.rounds)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2, default=str)


if __name__ == "__main__":
    main()
