"""`tokenmill perplexity`: score a text with a model and print its perplexity."""

from __future__ import annotations

import argparse
import json
import time


def run(args: argparse.Namespace) -> int:
    from tokenmill.eval.perplexity import default_text, perplexity
    from tokenmill.weights.model_loader import load_model

    if args.file is None:
        text, source = default_text(), "the shipped essay"
    else:
        try:
            with open(args.file, encoding="utf-8") as f:
                text = f.read()
        except (OSError, UnicodeDecodeError) as e:
            raise ValueError(f"--file {args.file!r} cannot be read as UTF-8 text: {e}") from None
        source = args.file
    loaded = load_model(
        args.model,
        dtype=None if args.dtype == "auto" else args.dtype,
        device=args.device,
        revision=args.revision,
        quantization=args.quantization,
    )
    t0 = time.perf_counter()
    r = perplexity(loaded, text, max_tokens=args.max_tokens, window=args.window, stride=args.stride)
    seconds = time.perf_counter() - t0
    quantization = "none" if loaded.quantization is None else loaded.quantization.mode
    if args.json:
        out = {
            "model": loaded.source,
            "text": source,
            "quantization": quantization,
            "tokens": r.tokens,
            "perplexity": r.perplexity,
            "nll": r.nll,
            "window": r.window,
            "stride": r.stride,
            "seconds": seconds,
        }
        print(json.dumps(out))
    else:
        print(f"model: {loaded.source} (quantization: {quantization})")
        print(f"text: {source}, window {r.window}, stride {r.stride}")
        print(f"tokens: {r.tokens}")
        print(f"perplexity: {r.perplexity:.4f}")
    return 0
