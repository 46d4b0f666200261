"""`tokenmill generate PROMPT`: stream a continuation, or print JSON."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict

from tokenmill.cli.common import format_stats, load_llm, sampling_params, write


def run(args: argparse.Namespace) -> int:
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    llm = load_llm(args)
    if args.chat:
        prompt_in = llm.format_chat([{"role": "user", "content": prompt}])
    else:
        prompt_in = prompt
    if args.beams is not None:
        return _beams(llm, prompt_in, args)
    params = sampling_params(args, n=args.n)
    if args.json or args.n > 1:
        out = llm.generate([prompt_in], params)[0]
        if args.json:
            print(json.dumps(_as_json(out), ensure_ascii=False, indent=2))
        else:
            for c in out.outputs:
                print(f"--- sample {c.index} ({c.finish_reason})\n{c.text}")
        if args.stats and not args.json:
            print(format_stats(out.metrics), file=sys.stderr)
        return 0
    if not args.chat:
        write(prompt)
    stream = llm.stream(prompt_in, params)
    for delta in stream:
        write(delta)
    write("\n")
    if args.stats and stream.output is not None:
        print(format_stats(stream.output.metrics), file=sys.stderr)
    return 0


def _beams(llm, prompt, args: argparse.Namespace) -> int:
    from tokenmill import BeamSearchParams

    unused = [
        flag
        for flag, used in (
            ("--n", args.n != 1),
            ("--temperature", args.temperature not in (None, 0.0)),
            ("--top-k", args.top_k is not None),
            ("--top-p", args.top_p is not None),
            ("--min-p", args.min_p is not None),
            ("--seed", args.seed is not None),
            ("--stop", args.stop is not None),
            ("--min-tokens", args.min_tokens != 0),
            ("--logprobs", args.logprobs is not None),
            ("--repetition-penalty", args.repetition_penalty is not None),
            ("--presence-penalty", args.presence_penalty != 0.0),
            ("--frequency-penalty", args.frequency_penalty != 0.0),
        )
        if used
    ]
    if unused:
        raise ValueError(f"beam search does not use {', '.join(unused)}; drop them or drop --beams")
    params = BeamSearchParams(
        beam_width=args.beams,
        max_tokens=args.max_tokens,
        length_penalty=args.length_penalty,
        ignore_eos=args.ignore_eos,
        stop_token_ids=args.stop_token_id,
    )
    out = llm.beam_search([prompt], params)[0]
    if args.json:
        print(
            json.dumps(
                {"prompt": out.prompt, "sequences": [asdict(h) for h in out.sequences]},
                ensure_ascii=False,
                indent=2,
            )
        )
        return 0
    for rank, h in enumerate(out.sequences):
        print(f"--- beam {rank} (score {h.score:.4f}, {h.finish_reason})\n{h.text}")
    return 0


def _as_json(out) -> dict:
    return {
        "prompt": out.prompt,
        "prompt_token_ids": out.prompt_token_ids,
        "outputs": [
            {
                "index": c.index,
                "text": c.text,
                "token_ids": c.token_ids,
                "finish_reason": c.finish_reason,
                "stop_reason": c.stop_reason,
                "cumulative_logprob": c.cumulative_logprob,
                "logprobs": None
                if c.logprobs is None
                else [
                    {
                        "token_id": lp.token_id,
                        "logprob": lp.logprob,
                        "top_logprobs": {str(k): v for k, v in lp.top_logprobs.items()},
                    }
                    for lp in c.logprobs
                ],
            }
            for c in out.outputs
        ],
        "metrics": {
            k: v
            for k, v in asdict(out.metrics).items()
            if k
            in (
                "prompt_tokens",
                "output_tokens",
                "ttft_s",
                "tpot_s",
                "prefill_tokens_per_s",
                "decode_tokens_per_s",
                "e2e_s",
                "peak_memory_bytes",
            )
        },
    }
