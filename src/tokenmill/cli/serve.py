"""`tokenmill serve`: an OpenAI-compatible HTTP server for one model."""

from __future__ import annotations

import argparse


def run(args: argparse.Namespace) -> int:
    from tokenmill.server.launcher import serve

    return serve(args)
