"""Entry point of the `tokenmill` command: argument parsing only, subcommands load lazily.

Nothing here imports torch, so `tokenmill --help` answers at once.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

SUBCOMMANDS = {
    "generate": ("tokenmill.cli.generate", "Generate a continuation of a prompt (streams to the terminal)."),
    "chat": ("tokenmill.cli.chat", "Chat with a model interactively; the conversation is kept."),
    "run": ("tokenmill.cli.run", "Run a task pipeline (text-classification, ner, ...) on some inputs."),
    "models": ("tokenmill.cli.models", "List the models tokenmill can run offline here, and their tasks."),
    "serve": ("tokenmill.cli.serve", "Serve a model over an OpenAI-compatible HTTP API."),
    "bench": ("tokenmill.cli.bench", "Benchmark a running server: latency and throughput at the client."),
    "perplexity": (
        "tokenmill.cli.perplexity",
        "Measure a model's perplexity on a text (default: the shipped essay).",
    ),
    "feedback": ("tokenmill.cli.feedback", "Export the stored user feedback and request log, or count it."),
    "audit": (
        "tokenmill.cli.audit",
        "Audit models for bias with probe suites; writes a JSON + Markdown report.",
    ),
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
    p.add_argument(
        "--quantization",
        default="none",
        choices=["none", "int8", "int4", "w4a8", "w8a8", "gguf"],
        help="keep the linear layers' weights in int8 (per channel) or int4 (groups of 32), "
        "activations in --dtype; w4a8, w8a8: int4 or int8 weights with activations rounded to "
        "int8 per group (fastest on CPUs with AVX512-VNNI and AVX512-BF16); gguf (GGUF files "
        "only): each matrix at the precision its file stores it in, 4-bit types as w4a8, 5- to "
        "8-bit types as w8a8 (int4, int8 without those kernels), floats as they are (default: none)",
    )


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


def _run_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("task", help="a task: text-classification, ner, fill-mask, question-answering, ...")
    p.add_argument("inputs", nargs="*", metavar="INPUT", help="inputs ('-' or none: one per line from stdin)")
    p.add_argument("--model", "-m", default=None, help="short name, model directory or Hub repo id")
    p.add_argument("--revision", default=None, help="Hub revision (branch, tag or commit)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when available)")
    p.add_argument("--batch-size", type=int, default=8, help="inputs per forward pass (default: 8)")
    p.add_argument("--truncation", action="store_true", help="cut inputs over the model's limit")
    p.add_argument(
        "--option",
        "-o",
        action="append",
        default=None,
        metavar="NAME=VALUE",
        help="a task option, e.g. top_k=3 (repeatable; the value is read as JSON when it is JSON)",
    )
    p.add_argument("--question", default=None, help="question-answering: the question (inputs are contexts)")
    p.add_argument(
        "--candidate-labels", default=None, help="zero-shot-classification: labels, comma-separated"
    )
    p.add_argument("--source", default=None, help="sentence-similarity: the sentence inputs are compared to")
    p.add_argument("--json-input", action="store_true", help="read each input as JSON (e.g. text pairs)")
    p.add_argument(
        "--return-timestamps",
        action="store_true",
        default=None,
        help="automatic-speech-recognition: segments with their start and end times",
    )
    p.add_argument(
        "--language",
        default=None,
        help="automatic-speech-recognition: the spoken language (default: detected)",
    )
    p.add_argument(
        "--task",
        dest="speech_task",
        default=None,
        choices=["transcribe", "translate"],
        help="automatic-speech-recognition: transcribe (default) or translate into English",
    )
    p.add_argument("--json", action="store_true", help="print the results as JSON")


def _models_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print JSON")


def _serve_args(p: argparse.ArgumentParser) -> None:
    add_model_args(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument(
        "--api-key",
        default=None,
        help="require this key as 'Authorization: Bearer KEY' on /v1/* (default: $TOKENMILL_API_KEY)",
    )
    p.add_argument("--served-model-name", default=None, help="model name clients use (default: --model)")
    p.add_argument(
        "--task",
        action="append",
        default=None,
        metavar="TASK[=MODEL]",
        help="also serve a task pipeline at /v1/pipelines/TASK (feature-extraction: /v1/embeddings too); "
        "MODEL defaults to the task's default model; repeatable. Without --model only these are served",
    )
    g = p.add_argument_group("engine")
    g.add_argument("--max-num-seqs", type=int, default=64, help="most sequences in one step")
    g.add_argument("--max-num-batched-tokens", type=int, default=512, help="token budget of one step")
    g.add_argument("--max-model-len", type=int, default=None, help="context length (default: the model's)")
    g.add_argument("--block-size", type=int, default=16, help="tokens per KV cache block")
    g.add_argument(
        "--kv-cache-memory",
        default=None,
        help="KV cache budget, e.g. 2GiB or 512MiB (default: from free memory)",
    )
    g.add_argument("--no-prefix-caching", action="store_true", help="turn prefix caching off")
    g.add_argument(
        "--enforce-eager",
        action="store_true",
        help="on CUDA, run decode steps eagerly instead of replaying captured CUDA graphs",
    )
    g.add_argument(
        "--max-waiting",
        type=int,
        default=1024,
        help="requests that may wait for a seat; beyond them new ones get 503 (0: no queue)",
    )
    g.add_argument(
        "--request-timeout", type=float, default=None, help="seconds after which a request is ended"
    )
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    from tokenmill.cli.serve import add_filter_args, add_store_args  # argparse only

    add_store_args(p)
    add_filter_args(p)


def _bench_args(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="bench_command", metavar="WHAT", required=True)
    s = sub.add_parser("serve", help="load a running server and report TTFT, TPOT, ITL, throughput")
    s.add_argument("--base-url", default="http://127.0.0.1:8000", help="server address")
    s.add_argument("--model", default=None, help="model name to request (default: the server's first)")
    s.add_argument(
        "--endpoint", default="/v1/completions", choices=["/v1/completions", "/v1/chat/completions"]
    )
    s.add_argument("--api-key", default=None, help="bearer key (default: $TOKENMILL_API_KEY)")
    s.add_argument("--dataset", default="random", choices=["random", "file"])
    s.add_argument("--prompts-file", default=None, help="text file, one prompt per line (--dataset file)")
    s.add_argument("--input-len", type=int, default=256, help="prompt tokens of random prompts")
    s.add_argument("--output-len", type=int, default=128, help="tokens to generate per request")
    s.add_argument("--num-prompts", type=int, default=64)
    s.add_argument("--request-rate", type=float, default=float("inf"), help="Poisson arrivals per second")
    s.add_argument("--max-concurrency", type=int, default=None, help="most requests in flight")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--json-out", default=None, help="also write the results as JSON here")


def _perplexity_args(p: argparse.ArgumentParser) -> None:
    add_model_args(p)
    p.add_argument(
        "--file", "-f", default=None, help="UTF-8 text file (default: the essay shipped with tokenmill)"
    )
    p.add_argument("--max-tokens", type=int, default=None, help="score only the first N tokens of the text")
    p.add_argument(
        "--window", type=int, default=None, help="tokens per forward pass (default: 1024, or the context)"
    )
    p.add_argument(
        "--stride", type=int, default=None, help="tokens the window advances by (default: half the window)"
    )
    p.add_argument("--json", action="store_true", help="print one JSON object")


_ADDERS = {
    "generate": _generate_args,
    "chat": _chat_args,
    "run": _run_args,
    "models": _models_args,
    "serve": _serve_args,
    "bench": _bench_args,
    "perplexity": _perplexity_args,
    "feedback": lambda p: importlib.import_module("tokenmill.cli.feedback").add_args(p),
    "audit": lambda p: importlib.import_module("tokenmill.cli.audit").add_args(p),
}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        # `run`'s inputs may come after its options too, where argparse leaves them over
        cut = extra.index("--") if "--" in extra else len(extra)
        if args.command != "run" or any(x.startswith("-") and x != "-" for x in extra[:cut]):
            parser.parse_args(argv)  # argparse's own error for what it does not know
        args.inputs = [*args.inputs, *extra[:cut], *extra[cut + 1 :]]
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
    except BrokenPipeError:
        # The reader of our output went away (`| head`): stop quietly, as Unix tools do.
        # stdout is pointed at /dev/null so the interpreter's final flush fails no more.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 141  # 128 + SIGPIPE, what a shell reports for a tool killed by the pipe
    except ValueError as e:
        # User errors (bad values, missing files) get one clear line, not a traceback.
        print(f"tokenmill {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
