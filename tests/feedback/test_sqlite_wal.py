"""Switching SQLite to WAL retries a lost race instead of failing the open."""

from __future__ import annotations

import sqlite3
import time

import pytest

from tokenmill.feedback.engine import set_wal


class _Cursor:
    """Answers "database is locked" ``fails`` times, as a process that lost the race does."""

    def __init__(self, fails: int, message: str = "database is locked") -> None:
        self.fails, self.message, self.calls = fails, message, 0

    def execute(self, sql: str) -> None:
        assert sql == "PRAGMA journal_mode=WAL"
        self.calls += 1
        if self.calls <= self.fails:
            raise sqlite3.OperationalError(self.message)


def test_a_locked_switch_is_retried_until_it_succeeds():
    cur = _Cursor(fails=3)
    set_wal(cur, time.monotonic() + 5)
    assert cur.calls == 4


def test_it_gives_up_at_the_deadline_with_sqlites_error():
    cur = _Cursor(fails=10**9)
    t0 = time.monotonic()
    with pytest.raises(sqlite3.OperationalError, match="database is locked"):
        set_wal(cur, t0 + 0.3)
    assert 0.2 < time.monotonic() - t0 < 2 and cur.calls > 2


def test_other_errors_are_not_retried():
    cur = _Cursor(fails=1, message="disk I/O error")
    with pytest.raises(sqlite3.OperationalError, match="disk I/O error"):
        set_wal(cur, time.monotonic() + 5)
    assert cur.calls == 1


def test_a_real_connection_ends_in_wal(tmp_path):
    conn = sqlite3.connect(tmp_path / "f.db", isolation_level=None)
    set_wal(conn.cursor(), time.monotonic() + 5)
    assert conn.execute("PRAGMA journal_mode").fetchone() == ("wal",)
