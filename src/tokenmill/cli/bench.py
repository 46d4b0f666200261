"""`tokenmill bench serve`: load a running OpenAI-compatible server and report latency and throughput."""

from __future__ import annotations

import argparse
import json
import os
import sys


def run(args: argparse.Namespace) -> int:
    from tokenmill.cli.bench_serve import BenchConfig, benchmark, format_report

    if args.bench_command != "serve":  # argparse allows only "serve" today
        raise ValueError(f"unknown benchmark {args.bench_command!r}")
    if args.dataset == "file" and not args.prompts_file:
        raise ValueError("--dataset file needs --prompts-file")
    if args.prompts_file and args.dataset != "file":
        raise ValueError("--prompts-file needs --dataset file")
    config = BenchConfig(
        base_url=args.base_url,
        model=args.model,
        endpoint=args.endpoint,
        api_key=args.api_key or os.environ.get("TOKENMILL_API_KEY") or None,
        dataset=args.dataset,
        prompts_file=args.prompts_file,
        input_len=args.input_len,
        output_len=args.output_len,
        num_prompts=args.num_prompts,
        request_rate=args.request_rate,
        max_concurrency=args.max_concurrency,
        seed=args.seed,
    )
    result = benchmark(config, log=lambda msg: print(msg, file=sys.stderr, flush=True))
    print(format_report(result))
    if args.json_out:
        directory = os.path.dirname(os.path.abspath(args.json_out))
        os.makedirs(directory, exist_ok=True)
        with open(args.json_out, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=1)
            f.write("\n")
        print(f"results written to {args.json_out}", file=sys.stderr)
    # A run in which every request failed is an error; some failures are results to report.
    return 1 if result["completed"] == 0 else 0
