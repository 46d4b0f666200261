"""`tokenmill feedback export|stats`: what `tokenmill serve --feedback-db` stored."""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from typing import Any


def add_args(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="feedback_command", metavar="WHAT", required=True)
    db_help = "the database given to `tokenmill serve --feedback-db`: a SQLite file path or postgresql://..."
    since_help = "only rows created at or after this date (YYYY-MM-DD or YYYY-MM-DDTHH:MM, UTC)"

    e = sub.add_parser("export", help="write the stored feedback or request log as JSON Lines or CSV")
    e.add_argument("--db", required=True, metavar="PATH_OR_URL", help=db_help)
    e.add_argument(
        "--format", default="jsonl", choices=["jsonl", "csv"], help="output format (default: jsonl)"
    )
    e.add_argument("--out", "-o", default=None, metavar="FILE", help="write here (default: standard output)")
    e.add_argument("--since", default=None, metavar="DATE", help=since_help)
    e.add_argument(
        "--what", default="feedback", choices=["feedback", "requests"], help="which table (default: feedback)"
    )

    s = sub.add_parser("stats", help="feedback counts by rating and label, per model and per day")
    s.add_argument("--db", required=True, metavar="PATH_OR_URL", help=db_help)
    s.add_argument("--since", default=None, metavar="DATE", help=since_help)
    s.add_argument("--json", action="store_true", help="print one JSON object")


def run(args: argparse.Namespace) -> int:
    from tokenmill.feedback import open_store
    from tokenmill.feedback.report import export, format_stats, parse_since, stats

    since = parse_since(args.since) if args.since else None
    if not _exists(args.db):
        raise ValueError(
            f"no feedback database at {args.db}; give the path or URL that `tokenmill serve --feedback-db` used"
        )
    store = open_store(args.db)
    try:
        if args.feedback_command == "stats":
            result = stats(store, since=since)
            print(json.dumps(result, indent=2) if args.json else format_stats(result))
            return 0
        with _output(args.out) as out:
            n = export(store, out, format=args.format, what=args.what, since=since)
        if args.out:
            print(f"wrote {n} {args.what} rows to {args.out}", file=sys.stderr)
        return 0
    finally:
        store.close()


def _exists(db: str) -> bool:
    """Reading a SQLite file that is not there would create an empty one; say so instead."""
    import os

    if "://" in db and not db.lower().startswith("sqlite"):
        return True
    path = db.split("://", 1)[1][1:] if "://" in db else db
    return not path or os.path.exists(os.path.expanduser(path))


@contextlib.contextmanager
def _output(path: str | None) -> Any:
    if path is None:
        yield sys.stdout
        return
    try:
        f = open(path, "w", encoding="utf-8", newline="")  # noqa: SIM115 - closed below
    except OSError as e:
        raise ValueError(f"cannot write --out {path}: {e.strerror or e}") from None
    with f:
        yield f
