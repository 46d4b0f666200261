"""The GPU check of issue 4, prepared to run in one go on a CUDA machine.

1. The device's copy bandwidth: a device-to-device copy of ``--copy-gib`` GiB, bytes
   read plus written over the time.
2. A Llama of Llama-3.2-1B's shape (16 layers, hidden 2048, 32 query / 8 KV heads, MLP
   8192, tied embeddings, llama3 rope scaling) with SmolLM2's 49,152-token vocabulary, so
   that the packaged tokenizer serves it: 1.07 B parameters, random bf16 weights.
   - batch-1 decode tokens/s over 128 new tokens, against the limit: copy bandwidth over
     the bytes a decode step must read (every parameter once; the tied embedding is the
     LM head); the same with ``enforce_eager`` (no CUDA graphs), which must give the same
     greedy tokens;
   - output tokens/s of 64 prompts of 256 tokens with 128 new tokens each, through one
     ``LLM.generate``, against transformers' padded ``generate`` of the same batch.
3. Correctness: every tiny architecture on the device against transformers on the CPU
   (``cuda_check.correctness``: fp32 logits and 32 greedy tokens through ``LLM.generate``);
   int8, w8a8, int4 and w4a8 weights on the device against their dequantized reference
   (``cuda_check.quantized_correctness``).

Each part runs even if an earlier one failed (its traceback goes to ``errors``), and
``--out`` is rewritten after every part, so a run cut short keeps what it measured. (An
error that breaks the CUDA context itself, such as an illegal memory access, fails the
parts after it too; their tracebacks say so.)

Targets (issue 4): batch-1 decode at least 70% of the limit; throughput at least 5x
transformers'. Medians over ``--rounds``.

    PYTHONPATH=src:tests python benchmarks/cuda_decode_check.py [--device cuda] [--out results.json]

``--tiny`` shrinks everything (a 2-layer model, 4 prompts, 8 new tokens) so that the
script itself can be checked on a CPU (tests/e2e/test_cuda_decode_check.py).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time

import torch


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def copy_bandwidth(device: str, gib: float, rounds: int) -> float:
    """Bytes per second of a device-to-device copy (read + write)."""
    n = int(gib * 2**30)
    src = torch.empty(n, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    times = []
    for _ in range(max(rounds, 3)):
        _sync(device)
        t0 = time.perf_counter()
        dst.copy_(src)
        _sync(device)
        times.append(time.perf_counter() - t0)
    del src, dst
    return 2 * n / min(times)


def llama_1b_config(tiny: bool):
    import transformers

    if tiny:
        shape = dict(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
        )
    else:  # Llama-3.2-1B
        shape = dict(
            hidden_size=2048,
            intermediate_size=8192,
            num_hidden_layers=16,
            num_attention_heads=32,
            num_key_value_heads=8,
        )
    rope = {
        "rope_type": "llama3",
        "rope_theta": 500000.0,
        "factor": 32.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }
    return transformers.LlamaConfig(
        vocab_size=512 if tiny else 49152,
        max_position_embeddings=131072,  # as Llama-3.2-1B
        tie_word_embeddings=True,
        rope_parameters=rope,
        bos_token_id=1,
        eos_token_id=2,
        **shape,
    )


def make_model_dir(tiny: bool, device: str = "cpu") -> str:
    """A model directory: random bf16 weights of the config above and a matching tokenizer.
    The weights are drawn on ``device``: a billion float32 draws take tens of seconds on a
    CPU, time a short GPU session should not spend."""
    import transformers

    d = tempfile.mkdtemp()
    torch.manual_seed(0)
    with torch.device(device):
        model = transformers.LlamaForCausalLM(llama_1b_config(tiny)).to(torch.bfloat16)
    model.save_pretrained(d)
    del model
    if tiny:
        import tiny as tiny_models

        tiny_models.train_tokenizer(os.path.join(d, "tokenizer.json"))
    else:
        from tokenmill import LLM

        LLM("smollm2-135m-instruct").get_tokenizer().backend.save(os.path.join(d, "tokenizer.json"))
    return d


def decode_and_throughput(model_dir: str, device: str, rounds: int, tiny: bool, bandwidth: float) -> dict:
    import transformers

    from tokenmill import LLM, SamplingParams

    batch, prompt_len, new = (4, 16, 8) if tiny else (64, 256, 128)
    # a fixed KV budget: the default (80% of free memory) would leave transformers little
    kv = None if tiny else 8 << 30
    kw = dict(dtype="bfloat16", device=device, max_num_batched_tokens=4096, kv_cache_memory=kv)
    llm = LLM(model_dir, max_batch_size=batch, **kw)
    graphs = llm.engine.runner.graphs
    model = llm.engine.runner.model
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())  # tied weights once
    limit = bandwidth / weight_bytes
    g = torch.Generator().manual_seed(0)
    single = torch.randint(3, 400, (8,), generator=g).tolist()
    sp1 = SamplingParams(max_tokens=new, temperature=0, ignore_eos=True)

    def b1(engine: LLM) -> tuple[float, list[int]]:
        engine.generate([single], sp1)  # warm-up
        outs = [engine.generate([single], sp1)[0] for _ in range(rounds)]
        return statistics.median(o.metrics.decode_tokens_per_s for o in outs), outs[0].outputs[0].token_ids

    decode, tokens = b1(llm)
    # the same steps without CUDA graphs: what the graphs bring, and the same greedy tokens
    eager = LLM(model_dir, max_batch_size=8, enforce_eager=True, **kw)
    decode_eager, tokens_eager = b1(eager)
    # five prompts of different lengths: padded graphs (8 rows for 5, then 4, 2, 1 as they
    # end), against eager steps of exactly the live rows. Tokens may part where two
    # logits are within rounding (cuBLAS picks kernels by row count); the log-probabilities
    # of the tokens both chose must agree.
    sps = [
        SamplingParams(max_tokens=m, temperature=0, ignore_eos=True, logprobs=0) for m in (5, 9, 13, 16, 16)
    ]
    multi = [torch.randint(3, 400, (n,), generator=g).tolist() for n in (3, 17, 40, 9, 64)]
    outs_g = [o.outputs[0] for o in llm.generate(multi, sps)]
    outs_e = [o.outputs[0] for o in eager.generate(multi, sps)]
    diff, same = 0.0, 0
    for a, b in zip(outs_g, outs_e):
        same += a.token_ids == b.token_ids
        for ta, tb, la, lb in zip(a.token_ids, b.token_ids, a.logprobs, b.logprobs):
            diff = max(diff, abs(la.logprob - lb.logprob))
            if ta != tb:
                break
    del eager
    res = {
        "params": sum(p.numel() for p in model.parameters()),
        "weight_bytes_per_token": weight_bytes,
        "decode_limit_tok_s": limit,
        "decode_b1_tok_s": decode,
        "decode_fraction_of_limit": decode / limit,
        "cuda_graphs": None if graphs is None else {"sizes": graphs.sizes, "capture_s": graphs.capture_s},
        "graphs_off_reason": llm.engine.graphs_reason or None,
        "decode_b1_eager_tok_s": decode_eager,
        "greedy_tokens_match_eager": tokens == tokens_eager,
        "padded_graphs_identical_sequences": f"{same}/{len(multi)}",
        "padded_graphs_max_logprob_diff": diff,
    }
    print("batch-1 decode", json.dumps(res), flush=True)

    hf = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).to(device).eval()
    prompts = torch.randint(3, 400, (batch, prompt_len), generator=g)
    sp = SamplingParams(max_tokens=new, temperature=0, ignore_eos=True)

    def ours() -> float:
        llm.engine.kv.pool.reset_cache()  # no prefix hits from the previous round
        _sync(device)
        t0 = time.perf_counter()
        outs = llm.generate(prompts.tolist(), sp)
        dt = time.perf_counter() - t0
        assert sum(len(o.outputs[0].token_ids) for o in outs) == batch * new
        return batch * new / dt

    def theirs() -> float:
        ids = prompts.to(device)
        with torch.inference_mode():
            _sync(device)
            t0 = time.perf_counter()
            out = hf.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0)
            _sync(device)
            dt = time.perf_counter() - t0
        assert out.shape == (batch, prompt_len + new)
        return batch * new / dt

    ours(), theirs()  # warm-up
    a = statistics.median(ours() for _ in range(rounds))
    b = statistics.median(theirs() for _ in range(rounds))
    res.update({f"tokenmill_tok_s_{batch}": a, f"transformers_tok_s_{batch}": b, "throughput_ratio": a / b})
    print(f"throughput at {batch}", json.dumps({k: res[k] for k in list(res)[-3:]}), flush=True)
    return res


def run(
    device: str,
    rounds: int,
    tiny: bool,
    copy_gib: float,
    skip_correctness: bool = False,
    out: str | None = None,
) -> dict:
    import cuda_check
    from cuda_check import _section

    info = {
        "device": torch.cuda.get_device_name() if device.startswith("cuda") else "cpu",
        "torch": torch.__version__,
    }
    print(info, flush=True)
    result: dict = {"info": info}
    # The measurement the issue asks for first, then the correctness checks.
    _section(result, "copy_bandwidth_gb_s", lambda: copy_bandwidth(device, copy_gib, rounds) / 1e9, out)
    bw = result.get("copy_bandwidth_gb_s")
    if bw is not None:
        print(f"copy bandwidth {bw:.0f} GB/s", flush=True)
        _section(
            result,
            "llama_1b",
            lambda: decode_and_throughput(make_model_dir(tiny, device), device, rounds, tiny, bw * 1e9),
            out,
        )
    else:
        result.setdefault("errors", {})["llama_1b"] = "not run: no copy bandwidth to compare with"
    if not skip_correctness:
        _section(result, "correctness", lambda: cuda_check.correctness(device), out)
        _section(result, "quantized", lambda: cuda_check.quantized_correctness(device), out)
    targets = {}
    if "llama_1b" in result:
        r = result["llama_1b"]
        targets = {
            "decode_at_least_70pct_of_limit": r["decode_fraction_of_limit"] >= 0.7,
            "throughput_at_least_5x_transformers": r["throughput_ratio"] >= 5,
            "graphs_give_the_eager_tokens": r["greedy_tokens_match_eager"],
            "padded_graphs_agree_with_eager": r["padded_graphs_max_logprob_diff"] < 0.05,
        }
    if "correctness" in result:
        targets["architectures_match_transformers"] = all(
            v["greedy_32_equal"] for v in result["correctness"].values()
        )
    if "quantized" in result:
        targets["quantized_logits_within_4_bf16_steps"] = all(
            v["within_4_bf16_steps"] for v in result["quantized"].values()
        )
    _section(result, "targets", lambda: targets, out)
    print("targets", json.dumps(targets), "errors in:", sorted(result.get("errors", {})), flush=True)
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--copy-gib", type=float, default=2.0)
    ap.add_argument(
        "--tiny", action="store_true", help="a 2-layer model and a small batch: checks the script"
    )
    ap.add_argument("--skip-correctness", action="store_true")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    run(args.device, args.rounds, args.tiny, args.copy_gib, args.skip_correctness, args.out)


if __name__ == "__main__":
    main()
