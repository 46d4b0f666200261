"""Pipelines side by side with transformers' in one run, on the same inputs and threads.

* feature-extraction on all-MiniLM-L6-v2 (the packaged model), float32, at batch 1
  (one sentence per call) and batch 32 (a list of 32, ``batch_size=32``): sentences/s.
  Two comparisons: the same output (a tensor of token vectors per sentence; transformers'
  ``return_tensors=True``) and each library's sentence-embedding path (tokenmill pools
  and normalizes inside the pipeline, as the model's config says; transformers returns
  token vectors that the caller mean-pools and normalizes). The "bf16" rows run
  tokenmill in bfloat16 against transformers' float32.
* summarization, greedy, 16 texts x 32 new tokens, generated tokens/s: on the test
  suite's tiny random T5, and on a random T5 of t5-small's shape (60M parameters).

Medians over ``--rounds`` interleaved rounds.

    python benchmarks/bench_pipelines.py [--rounds 5] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))

WORDS = (
    "the quick brown fox jumps over a lazy dog while markets rise and fall as people talk about weather "
    "music science history football cooking travel computers language art"
).split()


def sentences(n: int, seed: int = 0) -> list[str]:
    """n sentences of 6 to 30 words, the lengths real sentence-embedding traffic has."""
    import random

    rng = random.Random(seed)
    return [
        " ".join(rng.choice(WORDS) for _ in range(rng.randint(6, 30))).capitalize() + "." for _ in range(n)
    ]


def timed(fn, repeat: int) -> float:
    fn()  # warm-up
    t0 = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - t0) / repeat


def bench_features(rounds: int) -> dict:
    import transformers

    import tiny_encoders
    from tokenmill import pipeline

    d = tiny_encoders.minilm_dir()
    ours = pipeline("feature-extraction", model="all-minilm-l6-v2")
    ours_bf16 = pipeline("feature-extraction", model="all-minilm-l6-v2", dtype="bfloat16")
    theirs = transformers.pipeline("feature-extraction", model=d, dtype=torch.float32, device="cpu")
    batch = sentences(32)
    singles = sentences(16, seed=1)

    def their_embed(texts, batch_size):
        out = theirs(texts, return_tensors=True, batch_size=batch_size)
        out = out if isinstance(out, list) else [out]
        return [torch.nn.functional.normalize(t[0].mean(0), dim=-1) for t in out]

    cases = {
        "tokens b1": (
            lambda: [ours(s, pooling="none", normalize=False, return_tensors=True) for s in singles],
            lambda: [theirs(s, return_tensors=True) for s in singles],
            len(singles),
        ),
        "tokens b32": (
            lambda: ours(batch, pooling="none", normalize=False, return_tensors=True, batch_size=32),
            lambda: theirs(batch, return_tensors=True, batch_size=32),
            len(batch),
        ),
        "embeddings b1": (
            lambda: [ours(s, return_tensors=True) for s in singles],
            lambda: [their_embed(s, 1) for s in singles],
            len(singles),
        ),
        "embeddings b32": (
            lambda: ours(batch, return_tensors=True, batch_size=32),
            lambda: their_embed(batch, 32),
            len(batch),
        ),
        # tokenmill in bfloat16 (cosine >= 0.9999 to float32 here) against transformers' float32
        "embeddings b1 bf16": (
            lambda: [ours_bf16(s, return_tensors=True) for s in singles],
            lambda: [their_embed(s, 1) for s in singles],
            len(singles),
        ),
        "embeddings b32 bf16": (
            lambda: ours_bf16(batch, return_tensors=True, batch_size=32),
            lambda: their_embed(batch, 32),
            len(batch),
        ),
    }
    results: dict[str, dict[str, list[float]]] = {k: {"tokenmill": [], "transformers": []} for k in cases}
    for _ in range(rounds):
        for name, (a, b, n) in cases.items():
            results[name]["tokenmill"].append(n / timed(a, 3))
            results[name]["transformers"].append(n / timed(b, 3))
    return results


def t5_small_shaped_dir() -> str:
    """A T5 with t5-small's shape (60M parameters) and random weights, beside the test
    suite's tiny T5 tokenizer: per-step overhead matters less than on the tiny model."""
    import shutil
    import tempfile

    import transformers

    import tiny_seq2seq

    d = tempfile.mkdtemp(prefix="t5-small-shaped-")
    src = tiny_seq2seq.t5_dir()
    cfg = transformers.T5Config(
        vocab_size=32128,
        d_model=512,
        d_kv=64,
        d_ff=2048,
        num_layers=6,
        num_heads=8,
        decoder_start_token_id=0,
        pad_token_id=0,
        eos_token_id=1,
    )
    torch.manual_seed(0)
    transformers.T5ForConditionalGeneration(cfg).save_pretrained(d)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if os.path.exists(os.path.join(src, name)):
            shutil.copy(os.path.join(src, name), os.path.join(d, name))
    return d


def bench_summarization(rounds: int, model_dir: str) -> dict:
    import transformers

    from tokenmill import pipeline

    texts = sentences(16, seed=2)
    new_tokens = 32
    ours = pipeline("summarization", model=model_dir)
    tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    model = transformers.AutoModelForSeq2SeqLM.from_pretrained(model_dir, dtype=torch.float32).eval()

    def theirs():
        batch = tok(texts, padding=True, return_tensors="pt")
        with torch.inference_mode():
            out = model.generate(
                **batch, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False
            )
        tok.batch_decode(out, skip_special_tokens=True)

    def mine():
        ours(
            texts,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            num_beams=1,
            batch_size=16,
        )

    total = len(texts) * new_tokens
    results: dict[str, list[float]] = {"tokenmill": [], "transformers": []}
    for _ in range(rounds):
        results["tokenmill"].append(total / timed(mine, 2))
        results["transformers"].append(total / timed(theirs, 2))
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--skip-summarization", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(
        f"# {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"{args.threads} threads, {args.rounds} rounds"
    )
    report: dict[str, dict] = {}
    for name, r in bench_features(args.rounds).items():
        a, b = statistics.median(r["tokenmill"]), statistics.median(r["transformers"])
        report[f"feature-extraction {name}"] = {"tokenmill": a, "transformers": b, "ratio": a / b}
        print(
            f"feature-extraction {name:<15} tokenmill {a:8.1f}  transformers {b:8.1f} sentences/s  ratio {a / b:.2f}x"
        )
    if not args.skip_summarization:
        import tiny_seq2seq

        for name, model_dir in (
            ("tiny T5", tiny_seq2seq.t5_dir()),
            ("t5-small shape", t5_small_shaped_dir()),
        ):
            r = bench_summarization(args.rounds, model_dir)
            a, b = statistics.median(r["tokenmill"]), statistics.median(r["transformers"])
            report[f"summarization {name}"] = {"tokenmill": a, "transformers": b, "ratio": a / b}
            print(
                f"summarization {name:<15} tokenmill {a:8.1f}  transformers {b:8.1f} tokens/s     ratio {a / b:.2f}x"
            )
    print(json.dumps(report))


if __name__ == "__main__":
    main()
