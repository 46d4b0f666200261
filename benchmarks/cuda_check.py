"""One prepared check on a CUDA machine: correctness against the CPU reference, then speed.

1. Every tiny architecture: logits on CUDA (fp32, TF32 off) against transformers on CPU,
   and 32 greedy tokens through ``LLM.generate`` on CUDA against transformers on CPU.
2. A SmolLM2-shaped Llama with random bf16 weights: TTFT for 512 prompt tokens and
   batch-1 decode tokens/s over 128 tokens, tokenmill vs transformers on the same GPU.

    PYTHONPATH=src:tests python benchmarks/cuda_check.py [--device cuda] [--out results.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
import traceback

import torch


def _section(result: dict, name: str, fn, out: str | None) -> None:
    """Run one part of a check; a failure is recorded with its traceback and the rest
    still runs (a GPU session is short: one broken part must not cost the others), and
    the results so far are written after every part."""
    try:
        result[name] = fn()
    except Exception:
        result.setdefault("errors", {})[name] = traceback.format_exc()[-4000:]
        print(f"{name} failed:\n{result['errors'][name]}", flush=True)
    if out:
        with open(out, "w") as f:
            json.dump(result, f, indent=2, default=str)


def correctness(device: str) -> dict:
    import tiny
    from tokenmill import LLM, SamplingParams
    from tokenmill.layers.attention import DenseAttention
    from tokenmill.weights.model_loader import _finalize

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    report = {}
    root = tempfile.mkdtemp()
    for arch in tiny.ARCHS:
        hf = tiny.hf_model(arch)
        ours = _finalize(tiny.native_from_hf(hf), torch.device(device))
        ids = torch.randint(0, tiny.VOCAB, (2, 40))
        with torch.no_grad():
            ref = hf(ids).logits
            out = ours(
                ids.to(device),
                torch.arange(40).expand(2, 40).to(device),
                DenseAttention(None, 0, 40, 39),
                None,
            )
        err = (out.cpu() - ref).abs().max().item()
        d = tiny.save_tiny_dir(arch, root)
        llm = LLM(d, dtype="float32", device=device)
        prompt = [5, 17, 42, 99, 7, 3, 250, 11]
        got = (
            llm.generate([prompt], SamplingParams(temperature=0, max_tokens=32, min_tokens=32))[0]
            .outputs[0]
            .token_ids
        )
        want = hf.generate(
            torch.tensor([prompt]), max_new_tokens=32, min_new_tokens=32, do_sample=False, pad_token_id=0
        )[0, 8:].tolist()
        report[arch] = {"max_abs_logit_err": err, "greedy_32_equal": got == want}
        print(arch, report[arch], flush=True)
    return report


def quantized_correctness(device: str) -> dict:
    """int8, w8a8, int4 and w4a8 weights on the device. For each mode: a tiny bf16 Llama's
    logits against the same layers' reference path (``use_kernel=False``: the dequantized
    weight, and for w4a8 and w8a8 the int8-rounded activations, in float32; target: within 4 bf16 steps of
    the largest logit, as in the CPU tests) and against a float model holding the
    dequantized weights (what the mode costs); the kernels its layers run and why any
    fall back; and 32 greedy tokens through ``LLM(quantization=...)`` on the device
    against the same on the CPU (bf16 on two devices may part where two logits are within
    rounding: the index of the first difference is reported, 32 when none)."""
    import copy
    import functools

    import tiny
    from tokenmill import LLM, SamplingParams
    from tokenmill.layers.attention import DenseAttention
    from tokenmill.layers.quantized import Int4Linear, Int8Linear, quantize_model

    d = tiny.save_tiny_dir("llama", tempfile.mkdtemp())
    original = tiny.native_from_hf(tiny.hf_model("llama"), dtype=torch.bfloat16).to(device).eval()
    ids = torch.randint(0, tiny.VOCAB, (2, 40), generator=torch.Generator().manual_seed(0)).to(device)
    pos = torch.arange(40, device=device).expand(2, 40)
    prompt = [5, 17, 42, 99, 7, 3, 250, 11]
    sp = SamplingParams(temperature=0, max_tokens=32, min_tokens=32)

    def logits(model):
        with torch.inference_mode():
            return model(ids, pos, DenseAttention(None, 0, 40, 39), None).float()

    def rel(a, b):
        return ((a - b).abs().max() / b.abs().max()).item()

    report = {}
    for mode in ("int8", "w8a8", "int4", "w4a8"):
        model = copy.deepcopy(original)
        q = quantize_model(model, mode)
        layers = [m for m in model.modules() if isinstance(m, (Int8Linear, Int4Linear))]
        got = logits(model)
        for m in layers:
            m.forward = functools.partial(type(m).forward, m, use_kernel=False)
        want = logits(model)
        err = rel(got, want)
        tokens = {
            dev: LLM(d, dtype="bfloat16", device=dev, quantization=mode)
            .generate([prompt], sp)[0]
            .outputs[0]
            .token_ids
            for dev in dict.fromkeys([device, "cpu"])
        }
        pairs = zip(tokens[device], tokens["cpu"])
        report[mode] = {
            "max_logit_err_rel": err,
            "within_4_bf16_steps": err <= 4 * 2**-7,
            "vs_dequantized_float_model": rel(got, logits(tiny.dequantized_copy(original, model))),
            "kernels": sorted({str(m.kernel) for m in layers}),
            "fallback": sorted(set(q.fallback.values())),
            "greedy_equal_to_cpu_up_to": next((i for i, (a, b) in enumerate(pairs) if a != b), 32),
        }
        print(mode, report[mode], flush=True)
    return report


def smollm2_shape_config(**extra):
    """A Llama config with SmolLM2-135M's shapes (the weights are random)."""
    import transformers

    return transformers.LlamaConfig(
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        max_position_embeddings=8192,
        rope_parameters={"rope_type": "default", "rope_theta": 100000.0},
        tie_word_embeddings=True,
        **extra,
    )


def speed(device: str, rounds: int) -> dict:
    import transformers

    from tokenmill.generation.runner import ModelRunner
    from tokenmill.layers.attention import DenseAttention
    from tokenmill.weights.model_loader import _finalize

    cfg = smollm2_shape_config()
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(cfg).to(torch.bfloat16).to(device).eval()
    import tiny

    ours = _finalize(tiny.native_from_hf(hf.cpu().float(), dtype=torch.bfloat16), torch.device(device))
    hf = hf.to(device)
    runner = ModelRunner(ours, ours.config, torch.device(device), torch.bfloat16)
    L, N = 512, 128
    ids = torch.randint(0, 49152, (1, L), device=device)

    def ours_run():
        cache = runner.new_cache(1, L + N + 1)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        logits = runner.forward(ids, torch.arange(L, device=device)[None], DenseAttention(cache, 0, L, L - 1))
        tok = logits.argmax(-1)
        tok.tolist()
        t1 = time.perf_counter()
        for i in range(N):
            logits = runner.forward(
                tok[:, None], torch.tensor([[L + i]], device=device), DenseAttention(cache, L + i, 1, L + i)
            )
            tok = logits.argmax(-1)
            tok.tolist()  # the engine reads every sampled token on the host
        t2 = time.perf_counter()
        return t1 - t0, N / (t2 - t1)

    def hf_run():
        kw = dict(do_sample=False, pad_token_id=0)
        with torch.inference_mode():
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            hf.generate(ids, max_new_tokens=1, **kw)
            t1 = time.perf_counter()
            hf.generate(ids, max_new_tokens=N + 1, min_new_tokens=N + 1, **kw)
            t2 = time.perf_counter()
        return t1 - t0, N / ((t2 - t1) - (t1 - t0))

    ours_run(), hf_run()
    rows = {"tokenmill": [], "transformers": []}
    for _ in range(rounds):
        rows["tokenmill"].append(ours_run())
        rows["transformers"].append(hf_run())
    res = {
        k: {
            "ttft_ms": 1000 * statistics.median(r[0] for r in v),
            "decode_tokens_per_s": statistics.median(r[1] for r in v),
        }
        for k, v in rows.items()
    }
    res["decode_speedup"] = (
        res["tokenmill"]["decode_tokens_per_s"] / res["transformers"]["decode_tokens_per_s"]
    )
    res["ttft_speedup"] = res["transformers"]["ttft_ms"] / res["tokenmill"]["ttft_ms"]
    print(json.dumps(res, indent=2), flush=True)
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default=None)
    ap.add_argument("--skip-speed", action="store_true")
    args = ap.parse_args()
    info = {
        "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
        "torch": torch.__version__,
    }
    print(info, flush=True)
    result: dict = {"info": info}
    _section(result, "correctness", lambda: correctness(args.device), args.out)
    _section(result, "quantized", lambda: quantized_correctness(args.device), args.out)
    if not args.skip_speed and args.device.startswith("cuda"):
        _section(result, "speed_bf16_smollm2_shape", lambda: speed(args.device, args.rounds), args.out)


if __name__ == "__main__":
    main()
