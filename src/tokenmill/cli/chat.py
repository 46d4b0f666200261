"""`tokenmill chat`: an interactive chat loop that keeps the conversation."""

from __future__ import annotations

import argparse
import dataclasses
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
        try:
            prompt = llm.format_chat(history)
            turn_params = params
            room = llm.max_model_len - len(prompt)
            if 0 < room < params.max_tokens:
                # A long conversation leaves less room for the reply: shorten it, don't fail.
                turn_params = dataclasses.replace(
                    params, max_tokens=room, min_tokens=min(params.min_tokens, room)
                )
            stream = llm.stream(prompt, turn_params)
        except ValueError as e:
            # One bad turn (say, a conversation that outgrew the context) must not end the session.
            history.pop()
            print(f"error: {e} (use /reset to start a new conversation)", file=sys.stderr)
            continue
        reply = []
        for delta in stream:
            reply.append(delta)
            write(delta)
        write("\n")
        history.append({"role": "assistant", "content": "".join(reply)})
        if args.stats and stream.output is not None:
            print(format_stats(stream.output.metrics), file=sys.stderr)
    return 0
