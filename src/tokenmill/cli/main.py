"""Entry point of the `tokenmill` command: argument parsing only, subcommands load lazily.

Nothing here imports torch, so `tokenmill --help` answers at once.
"""

from __future__ import annotations

import argparse
import importlib
import sys

SUBCOMMANDS = {
    "generate": ("tokenmill.cli.generate", "Generate a continuation of a prompt (streams to the terminal)."),
    "chat": ("tokenmill.cli.chat", "Chat with a model interactively; the conversation is kept."),
    "models": ("tokenmill.cli.models", "List the models tokenmill can run offline here."),
}


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model",
        "-m",
        default=None,
        help="short name, model directory, .gguf file or Hub repo id (default: smollm2-135m-instruct)",
    )
    p.add_argument("--revision", default=None, help="Hub revision (branch, tag or commit)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when available)")


def add_sampling_args(p: argparse.ArgumentParser, default_max_tokens: int) -> None:
    g = p.add_argument_group("sampling")
    g.add_argument("--max-tokens", type=int, default=default_max_tokens)
    g.add_argument("--min-tokens", type=int, default=0)
    g.add_argument("--temperature", "-t", type=float, default=None, help="0 = greedy (the default here)")
    g.add_argument("--top-k", type=int, default=None)
    g.add_argument("--top-p", type=float, default=None)
    g.add_argument("--min-p", type=float, default=None)
    g.add_argument("--repetition-penalty", type=float, default=None)
    g.add_argument("--presence-penalty", type=float, default=0.0)
    g.add_argument("--frequency-penalty", type=float, default=0.0)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    g.add_argument(
        "--stop-token-id", type=int, action="append", default=None, help="stop token id (repeatable)"
    )
    g.add_argument("--ignore-eos", action="store_true")
    g.add_argument("--logprobs", type=int, default=None, help="top log-probabilities per token (with --json)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tokenmill",
        description="Run pretrained transformer models: generate, chat, list models.",
    )
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_module, help_text) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        _ADDERS[name](p)
    return parser


def _generate_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("prompt", help="the prompt text ('-' reads it from standard input)")
    add_model_args(p)
    add_sampling_args(p, default_max_tokens=128)
    p.add_argument("--n", type=int, default=1, help="number of sequences to sample")
    p.add_argument("--beams", type=int, default=None, help="beam search with this many beams")
    p.add_argument("--length-penalty", type=float, default=1.0, help="beam search length penalty")
    p.add_argument("--chat", action="store_true", help="format the prompt with the chat template")
    p.add_argument("--stats", action="store_true", help="print TTFT, TPOT, tokens/s and peak memory")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of streaming text")


def _chat_args(p: argparse.ArgumentParser) -> None:
    add_model_args(p)
    add_sampling_args(p, default_max_tokens=512)
    p.add_argument("--system", default=None, help="system prompt")
    p.add_argument("--stats", action="store_true", help="print timings after each reply")


def _models_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print JSON")


_ADDERS = {"generate": _generate_args, "chat": _chat_args, "models": _models_args}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.version:
        from tokenmill import __version__

        print(__version__)
        return 0
    if args.command is None:
        parser.print_help()
        return 0
    module = importlib.import_module(SUBCOMMANDS[args.command][0])
    try:
        return int(module.run(args) or 0)
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except ValueError as e:
        # User errors (bad values, missing files) get one clear line, not a traceback.
        print(f"tokenmill {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
