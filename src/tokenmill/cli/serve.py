"""`tokenmill serve`: an OpenAI-compatible HTTP server for one model."""

from __future__ import annotations

import argparse


def add_store_args(p: argparse.ArgumentParser) -> None:
    """The feedback store's flags (``tokenmill.feedback``)."""
    g = p.add_argument_group("feedback and request log")
    g.add_argument(
        "--feedback-db",
        default=None,
        metavar="PATH_OR_URL",
        help="store POST /v1/feedback (and the request log) here: a SQLite file path, or "
        "postgresql://USER:PASSWORD@HOST:PORT/DATABASE",
    )
    g.add_argument(
        "--request-log",
        action="store_true",
        help="also record each request's prompt, output, parameters, filter decisions and timing "
        "in --feedback-db (off by default: prompts may hold personal data)",
    )
    g.add_argument(
        "--request-log-retention",
        type=float,
        default=30.0,
        metavar="DAYS",
        help="delete request-log rows older than this, at start and hourly (default: 30)",
    )


def add_filter_args(p: argparse.ArgumentParser) -> None:
    """The output filters' flag (``tokenmill.filters``)."""
    p.add_argument(
        "--filters",
        default=None,
        metavar="FILE",
        help="filter generated text with the filters in FILE (JSON, or TOML on Python 3.11+): "
        "mask, refuse or flag blocked words, patterns, personal data or classifier hits; see docs/filters.md",
    )


def run(args: argparse.Namespace) -> int:
    from tokenmill.server.launcher import serve

    return serve(args)
