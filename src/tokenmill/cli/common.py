"""Helpers shared by the subcommands."""

from __future__ import annotations

import argparse
import sys
from typing import Any


def sampling_params(args: argparse.Namespace, **extra: Any):
    from tokenmill import SamplingParams

    return SamplingParams(
        max_tokens=args.max_tokens,
        min_tokens=args.min_tokens,
        # The command line is deterministic unless asked otherwise; several samples
        # (--n) only make sense when sampling, so they default to temperature 1.
        temperature=(1.0 if extra.get("n", 1) > 1 else 0.0) if args.temperature is None else args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        min_p=args.min_p,
        repetition_penalty=args.repetition_penalty,
        presence_penalty=args.presence_penalty,
        frequency_penalty=args.frequency_penalty,
        seed=args.seed,
        stop=args.stop,
        stop_token_ids=args.stop_token_id,
        ignore_eos=args.ignore_eos,
        logprobs=args.logprobs,
        **extra,
    )


def load_llm(args: argparse.Namespace):
    from tokenmill import LLM

    return LLM(
        args.model,
        dtype=None if args.dtype == "auto" else args.dtype,
        device=args.device,
        revision=args.revision,
        quantization=args.quantization,
    )


def format_stats(metrics: Any) -> str:
    def fmt(value: float | None, unit: str, scale: float = 1.0, digits: int = 1) -> str:
        return "n/a" if value is None else f"{value * scale:.{digits}f} {unit}"

    return (
        f"prompt tokens: {metrics.prompt_tokens}, generated tokens: {metrics.output_tokens}\n"
        f"time to first token: {fmt(metrics.ttft_s, 'ms', 1000)}\n"
        f"time per output token: {fmt(metrics.tpot_s, 'ms', 1000)}\n"
        f"prefill: {fmt(metrics.prefill_tokens_per_s, 'tokens/s')}\n"
        f"decode: {fmt(metrics.decode_tokens_per_s, 'tokens/s')}\n"
        f"peak memory: {fmt(metrics.peak_memory_bytes / 2**20, 'MiB')}"
    )


def write(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()
