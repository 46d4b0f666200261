"""`tokenmill feedback export|stats` on a database with known contents; numbers checked by hand."""

from __future__ import annotations

import csv
import io
import json
import types

import pytest

from tokenmill.cli.main import main
from tokenmill.feedback import open_store, records

DAY1 = 1793527200.0  # 2026-11-01T10:00:00Z
DAY2 = 1793610000.0  # 2026-11-02T09:00:00Z

# (created, model, rating, labels, comment)
FEEDBACK = [
    (DAY1, "m1", 5, ["helpful"], "spot on"),
    (DAY1 + 60, "m1", 1, ["wrong", "rude"], 'said "no", then, left'),
    (DAY2, "m1", 4, ["helpful"], None),
    (DAY2 + 60, "m2", 2, ["wrong"], "line one\nline two"),
    (DAY2 + 120, None, 5, [], None),
]


@pytest.fixture
def filled(db_url, monkeypatch) -> str:
    clock = iter(row[0] for row in FEEDBACK)
    monkeypatch.setattr(records, "time", types.SimpleNamespace(time=lambda: next(clock)))
    store = open_store(db_url, request_log=True)
    for i, (_, model, rating, labels, comment) in enumerate(FEEDBACK):
        store.add_feedback(f"cmpl-{i}", rating, labels, comment, model)
    store.log_request(
        {
            "id": "cmpl-0",
            "created": DAY1 - 5,
            "model": "m1",
            "route": "completions",
            "prompt": 'a, "b"\nc',
            "output": ["x"],
            "params": {"max_tokens": 3},
            "finish_reasons": ["length"],
            "filter_decisions": [{"choice": 0, "filter": "email", "action": "mask", "count": 1}],
            "timing": {"ttft_s": 0.5, "total_s": 1.0, "prompt_tokens": 4, "completion_tokens": 3},
        }
    )
    assert store.flush(10)
    store.close()
    return db_url


def _run(capsys, *argv: str) -> str:
    assert main(["feedback", *argv]) == 0
    return capsys.readouterr().out


def _tally(total, mean, by_rating, by_label):
    return {"total": total, "mean_rating": mean, "by_rating": by_rating, "by_label": by_label}


def test_stats_json(filled, capsys):
    got = json.loads(_run(capsys, "stats", "--db", filled, "--json"))
    r = lambda a, b, c, d, e: {"1": a, "2": b, "3": c, "4": d, "5": e}  # noqa: E731
    assert got == {
        **_tally(5, 17 / 5, r(1, 1, 0, 1, 2), {"helpful": 2, "wrong": 2, "rude": 1}),
        "by_model": {
            "(unknown)": _tally(1, 5.0, r(0, 0, 0, 0, 1), {}),
            "m1": _tally(3, 10 / 3, r(1, 0, 0, 1, 1), {"helpful": 2, "rude": 1, "wrong": 1}),
            "m2": _tally(1, 2.0, r(0, 1, 0, 0, 0), {"wrong": 1}),
        },
        "by_day": {
            "2026-11-01": _tally(2, 3.0, r(1, 0, 0, 0, 1), {"helpful": 1, "rude": 1, "wrong": 1}),
            "2026-11-02": _tally(3, 11 / 3, r(0, 1, 0, 1, 1), {"helpful": 1, "wrong": 1}),
        },
        "requests_logged": 1,
        "since": None,
    }
    since = json.loads(_run(capsys, "stats", "--db", filled, "--json", "--since", "2026-11-02"))
    assert (since["total"], since["mean_rating"], since["requests_logged"]) == (3, 11 / 3, 0)
    assert since["since"] == DAY2 - 9 * 3600


def test_stats_table(filled, capsys):
    out = _run(capsys, "stats", "--db", filled)
    lines = out.splitlines()
    assert lines[0] == "5 feedback, mean rating 3.40; 1 requests logged"
    assert "rating  count" in out and "5       2" in out
    assert "helpful  2" in out and "rude     1" in out
    head = next(x for x in lines if x.startswith("model"))
    assert head.split() == ["model", "count", "mean", "=1", "=2", "=3", "=4", "=5", "labels"]
    m1 = next(x for x in lines if x.startswith("m1 "))
    assert m1.split() == [
        "m1",
        "3",
        "3.33",
        "1",
        "0",
        "0",
        "1",
        "1",
        "helpful",
        "2,",
        "rude",
        "1,",
        "wrong",
        "1",
    ]
    day2 = next(x for x in lines if x.startswith("2026-11-02"))
    assert day2.split()[:8] == ["2026-11-02", "3", "3.67", "0", "1", "0", "1", "1"]


def test_export_jsonl(filled, capsys):
    rows = [json.loads(x) for x in _run(capsys, "export", "--db", filled).splitlines()]
    assert [(x["created"], x["model"], x["rating"], x["labels"], x["comment"]) for x in rows] == FEEDBACK
    assert [x["request_id"] for x in rows] == [f"cmpl-{i}" for i in range(5)]
    assert rows[0]["created_utc"] == "2026-11-01T10:00:00Z"
    assert list(rows[0]) == [
        "id",
        "request_id",
        "created",
        "created_utc",
        "model",
        "rating",
        "labels",
        "comment",
    ]
    later = _run(capsys, "export", "--db", filled, "--since", "2026-11-02T09:01")
    assert [json.loads(x)["request_id"] for x in later.splitlines()] == ["cmpl-3", "cmpl-4"]


def test_export_csv(filled, capsys, tmp_path):
    out = tmp_path / "fb.csv"
    assert main(["feedback", "export", "--db", filled, "--format", "csv", "--out", str(out)]) == 0
    assert capsys.readouterr().err == f"wrote 5 feedback rows to {out}\n"
    rows = list(csv.DictReader(io.StringIO(out.read_text(encoding="utf-8"), newline="")))
    assert [
        (float(x["created"]), x["model"], int(x["rating"]), json.loads(x["labels"]), x["comment"])
        for x in rows
    ] == [(c, m or "", r, lab, com or "") for c, m, r, lab, com in FEEDBACK]


def test_export_requests(filled, capsys):
    (row,) = [
        json.loads(x) for x in _run(capsys, "export", "--db", filled, "--what", "requests").splitlines()
    ]
    assert row["prompt"] == 'a, "b"\nc' and row["output"] == ["x"] and row["timing"]["ttft_s"] == 0.5
    assert row["filter_decisions"] == [{"choice": 0, "filter": "email", "action": "mask", "count": 1}]
    text = _run(capsys, "export", "--db", filled, "--what", "requests", "--format", "csv")
    (cells,) = list(csv.DictReader(io.StringIO(text)))
    assert cells["prompt"] == 'a, "b"\nc'
    assert json.loads(cells["params"]) == {"max_tokens": 3} and json.loads(cells["finish_reasons"]) == [
        "length"
    ]


def test_cli_errors(tmp_path, capsys):
    assert main(["feedback", "stats", "--db", str(tmp_path / "none.db")]) == 2
    err = capsys.readouterr().err
    assert f"tokenmill feedback: error: no feedback database at {tmp_path}/none.db" in err
    assert not (tmp_path / "none.db").exists()  # reading never creates an empty database
    db = str(tmp_path / "f.db")
    open_store(db).close()
    assert main(["feedback", "export", "--db", db, "--since", "last week"]) == 2
    assert (
        "--since 'last week' is not a date; give YYYY-MM-DD or YYYY-MM-DDTHH:MM[:SS]"
        in capsys.readouterr().err
    )
    assert main(["feedback", "export", "--db", db, "--out", str(tmp_path / "no" / "x.jsonl")]) == 2
    assert f"cannot write --out {tmp_path}/no/x.jsonl: No such file or directory" in capsys.readouterr().err
    assert main(["feedback", "stats", "--db", "mysql://h/db"]) == 2
    assert "unsupported database URL scheme 'mysql://'" in capsys.readouterr().err
    assert main(["feedback", "stats", "--db", db]) == 0
    assert capsys.readouterr().out == "0 feedback, mean rating -; 0 requests logged\n"


def test_export_into_a_closed_pipe_stops_quietly(tmp_path):
    """`tokenmill feedback export | head -1`: the reader leaves early; no traceback."""
    import subprocess
    import sys

    db = tmp_path / "many.db"
    store = open_store(str(db))
    for i in range(3000):  # well over a pipe's 64 KiB buffer
        store.add_feedback(f"cmpl-{i}", 1 + i % 5, comment="x" * 40)
    store.close()
    proc = subprocess.Popen(
        [sys.executable, "-m", "tokenmill.cli.main", "feedback", "export", "--db", str(db)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    first = proc.stdout.readline()
    proc.stdout.close()  # as `head -1` does after its line
    err = proc.stderr.read().decode()
    assert proc.wait(60) == 141, err
    assert json.loads(first)["request_id"] == "cmpl-0"
    assert "Traceback" not in err and "BrokenPipe" not in err, err


def test_csv_cells_are_never_formulas(tmp_path, capsys):
    db = tmp_path / "f.db"
    store = open_store(str(db))
    comments = ['=HYPERLINK("http://x")', "+1", "-2", "@SUM(A1)", "fine", "a = b"]
    for i, c in enumerate(comments):
        store.add_feedback(f"cmpl-{i}", 3, comment=c, model="=cmd|' /C calc'!A0")
    store.close()
    out = tmp_path / "fb.csv"
    assert main(["feedback", "export", "--db", str(db), "--format", "csv", "--out", str(out)]) == 0
    rows = list(csv.DictReader(io.StringIO(out.read_text(encoding="utf-8"), newline="")))
    assert [r["comment"] for r in rows] == [
        '\'=HYPERLINK("http://x")',
        "'+1",
        "'-2",
        "'@SUM(A1)",
        "fine",
        "a = b",
    ]
    assert {r["model"] for r in rows} == {"'=cmd|' /C calc'!A0"}
    assert all(r["rating"] == "3" for r in rows)  # numbers are numbers, not text
    # JSON Lines keeps the stored text
    assert main(["feedback", "export", "--db", str(db)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [json.loads(x)["comment"] for x in lines] == comments
