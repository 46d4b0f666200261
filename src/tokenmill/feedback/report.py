"""Export of the stored rows (JSON Lines, CSV) and feedback statistics."""

from __future__ import annotations

import csv
import datetime as dt
import json
from collections import Counter
from typing import Any, TextIO

from tokenmill.feedback.records import RATING_MAX, RATING_MIN
from tokenmill.feedback.store import Store

FORMATS = ("jsonl", "csv")
FEEDBACK_COLUMNS = ("id", "request_id", "created", "created_utc", "model", "rating", "labels", "comment")
REQUEST_COLUMNS = (
    "id", "created", "created_utc", "model", "route", "prompt", "output", "params",
    "finish_reasons", "filter_decisions", "timing",
)  # fmt: skip


def parse_since(text: str) -> float:
    """A date (2026-11-01) or date and time (2026-11-01T12:30, UTC unless it says) as unix time.

    Raises:
        ValueError: naming the value and the accepted forms.
    """
    try:
        when = dt.datetime.fromisoformat(text.strip())
    except ValueError:
        raise ValueError(
            f"--since {text!r} is not a date; give YYYY-MM-DD or YYYY-MM-DDTHH:MM[:SS] (UTC unless an "
            f"offset such as +02:00 is given)"
        ) from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.timezone.utc)
    return when.timestamp()


def utc_iso(t: float) -> str:
    return dt.datetime.fromtimestamp(t, dt.timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


def export(
    store: Store, out: TextIO, *, format: str = "jsonl", what: str = "feedback", since: float | None = None
) -> int:
    """Write the rows of ``what`` to ``out``; returns how many.

    JSON Lines keeps structured values as JSON; CSV writes them as JSON text in their
    cell. Both add ``created_utc``, the ISO 8601 form of the unix time ``created``.
    """
    if format not in FORMATS:
        raise ValueError(f"unknown export format {format!r}; choose one of {', '.join(FORMATS)}")
    columns = FEEDBACK_COLUMNS if what == "feedback" else REQUEST_COLUMNS
    writer = csv.DictWriter(out, fieldnames=columns, lineterminator="\n") if format == "csv" else None
    if writer is not None:
        writer.writeheader()
    n = 0
    for row in store.rows(what, since=since):
        row["created_utc"] = utc_iso(row["created"])
        row = {c: row[c] for c in columns}
        if writer is None:
            out.write(json.dumps(row, ensure_ascii=False) + "\n")
        else:
            writer.writerow({k: _cell(v) for k, v in row.items()})
        n += 1
    return n


#: a cell starting with one of these is a formula to a spreadsheet
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def _cell(value: Any) -> Any:
    if isinstance(value, (list, dict)):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, str) and value.startswith(_FORMULA_START):
        # Comments and prompts come from users: a spreadsheet opening the export must show
        # "=HYPERLINK(...)" as text, not run it. The quote is the usual escape.
        return "'" + value
    return "" if value is None else value


class _Tally:
    """Counts by rating and label, and the mean rating, of one group of feedback."""

    def __init__(self) -> None:
        self.ratings: Counter[int] = Counter()
        self.labels: Counter[str] = Counter()

    def add(self, rating: int, labels: list[str]) -> None:
        self.ratings[rating] += 1
        self.labels.update(labels)

    def as_dict(self) -> dict[str, Any]:
        total = sum(self.ratings.values())
        mean = sum(r * n for r, n in self.ratings.items()) / total if total else None
        return {
            "total": total,
            "mean_rating": mean,
            "by_rating": {str(r): self.ratings[r] for r in range(RATING_MIN, RATING_MAX + 1)},
            "by_label": dict(sorted(self.labels.items(), key=lambda kv: (-kv[1], kv[0]))),
        }


NO_MODEL = "(unknown)"


def stats(store: Store, since: float | None = None) -> dict[str, Any]:
    """Feedback counts by rating and label: overall, per model and per UTC day.

    Returns a dict: total, mean_rating, by_rating, by_label, by_model and by_day (each a
    dict of the same counts), requests_logged and since (unix time or None).
    """
    overall, per_model, per_day = _Tally(), {}, {}
    for row in store.rows("feedback", since=since):
        day = utc_iso(row["created"])[:10]
        for tally in (
            overall,
            per_model.setdefault(row["model"] or NO_MODEL, _Tally()),
            per_day.setdefault(day, _Tally()),
        ):
            tally.add(row["rating"], row["labels"])
    return {
        **overall.as_dict(),
        "by_model": {m: t.as_dict() for m, t in sorted(per_model.items())},
        "by_day": {d: t.as_dict() for d, t in sorted(per_day.items())},
        "requests_logged": store.count("requests", since=since),
        "since": since,
    }


def format_stats(s: dict[str, Any]) -> str:
    """``stats`` as tables for a terminal."""
    since = f" since {utc_iso(s['since'])}" if s["since"] is not None else ""
    lines = [
        f"{s['total']} feedback{since}, mean rating {_mean(s['mean_rating'])}; {s['requests_logged']} requests logged"
    ]
    if not s["total"]:
        return lines[0]
    ratings = [str(r) for r in range(RATING_MIN, RATING_MAX + 1)]
    lines += ["", _table(["rating", "count"], [[r, s["by_rating"][r]] for r in ratings])]
    if s["by_label"]:
        lines += ["", _table(["label", "count"], [[k, v] for k, v in s["by_label"].items()])]
    for title, groups in (("model", s["by_model"]), ("day (UTC)", s["by_day"])):
        head = [title, "count", "mean", *(f"={r}" for r in ratings), "labels"]
        body = [
            [
                name,
                g["total"],
                _mean(g["mean_rating"]),
                *(g["by_rating"][r] for r in ratings),
                _labels(g["by_label"]),
            ]
            for name, g in groups.items()
        ]
        lines += ["", _table(head, body)]
    return "\n".join(lines)


def _mean(m: float | None) -> str:
    return "-" if m is None else f"{m:.2f}"


def _labels(counts: dict[str, int]) -> str:
    return ", ".join(f"{k} {v}" for k, v in counts.items()) or "-"


def _table(head: list[str], rows: list[list[Any]]) -> str:
    cells = [head, *[[str(c) for c in r] for r in rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(head))]
    out = []
    for i, r in enumerate(cells):
        out.append("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
        if i == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)
