"""`tokenmill chat`: an interactive chat loop that keeps the conversation."""

from __future__ import annotations

import argparse
import sys

from tokenmill.cli.common import format_stats, load_llm, sampling_params, write

HELP = "Type a message and press Enter. Commands: /reset clears the conversation, /exit quits."


def run(args: argparse.Namespace) -> int:
    llm = load_llm(args)
    params = sampling_params(args)
    history: list[dict[str, str]] = []
    if args.system:
        history.append({"role": "system", "content": args.system})
    interactive = sys.stdin.isatty()
    if interactive:
        print(HELP, file=sys.stderr)
    while True:
        if interactive:
            write("> ")
        line = sys.stdin.readline()
        if not line:
            break
        message = line.rstrip("\n")
        if not message.strip():
            continue
        if message.strip() in ("/exit", "/quit"):
            break
        if message.strip() == "/reset":
            history = history[:1] if args.system else []
            print("(conversation cleared)", file=sys.stderr)
            continue
        history.append({"role": "user", "content": message})
        prompt = llm.format_chat(history)
        stream = llm.stream(prompt, params)
        reply = []
        for delta in stream:
            reply.append(delta)
            write(delta)
        write("\n")
        history.append({"role": "assistant", "content": "".join(reply)})
        if args.stats and stream.output is not None:
            print(format_stats(stream.output.metrics), file=sys.stderr)
    return 0
