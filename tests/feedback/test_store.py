"""The feedback store on SQLite and PostgreSQL: round trips, migrations, retention."""

from __future__ import annotations

import time

import pytest
import sqlalchemy as sa

from tokenmill.feedback import InvalidFeedback, StoreError, open_store
from tokenmill.feedback import schema as schema_mod


def _record(i: int, created: float | None = None, **over) -> dict:
    rec = {
        "id": f"chatcmpl-{i}",
        "created": time.time() if created is None else created,
        "model": "tiny-llama",
        "route": "chat.completions",
        "prompt": '[{"role": "user", "content": "héllo, \\"quoted\\"\\nline"}]',
        "output": [f"answer {i} ✓", "second choice"],
        "params": {"temperature": 0.7, "max_tokens": 16, "stop": ["\n"]},
        "finish_reasons": ["stop", "length"],
        "filter_decisions": [{"choice": 0, "filter": "email", "action": "mask", "count": 2}],
        "timing": {"ttft_s": 0.012, "total_s": 0.25, "prompt_tokens": 9, "completion_tokens": 16},
    }
    rec.update(over)
    return rec


def _engine(url: str) -> sa.Engine:
    from tokenmill.feedback.errors import resolve_url

    return sa.create_engine(resolve_url(url))


def test_feedback_round_trip(db_url):
    store = open_store(db_url)
    try:
        a = store.add_feedback("cmpl-1", 5, ["helpful", "ünïcode"], "great, thanks\nreally", "m1")
        b = store.add_feedback("cmpl-2", 1)
        assert a["id"].startswith("fb-") and a["id"] != b["id"]
        assert a["created"] <= b["created"] <= time.time()
        rows = list(store.rows("feedback"))
        assert rows == [a, b]
        assert rows[0] == {
            "id": a["id"],
            "request_id": "cmpl-1",
            "created": a["created"],
            "model": "m1",
            "rating": 5,
            "labels": ["helpful", "ünïcode"],
            "comment": "great, thanks\nreally",
        }
        assert rows[1]["labels"] == [] and rows[1]["comment"] is None and rows[1]["model"] is None
    finally:
        store.close()


def test_request_log_round_trip(db_url):
    store = open_store(db_url, request_log=True)
    try:
        recs = [_record(i) for i in range(3)]
        # a chat prompt given as messages is stored as its JSON text
        recs.append(_record(3, prompt=[{"role": "user", "content": "hi"}]))
        for r in recs:
            store.log_request(r)
        assert store.flush(10)
        rows = list(store.rows("requests"))
        assert store.failed_writes == 0
    finally:
        store.close()
    assert [r["id"] for r in rows] == [r["id"] for r in recs]
    for got, want in zip(rows[:3], recs[:3], strict=True):
        assert got == want
    assert rows[3]["prompt"] == '[{"role": "user", "content": "hi"}]'


def test_request_log_is_opt_in(db_url):
    store = open_store(db_url)
    try:
        store.log_request(_record(0))
        assert store.flush(5)
        assert store.count("requests") == 0
    finally:
        store.close()


def test_nul_characters(db_url):
    """PostgreSQL's text type cannot hold NUL: free text gets U+FFFD there, JSON keeps it escaped."""
    store = open_store(db_url, request_log=True)
    try:
        store.log_request(_record(0, prompt="a\x00b", output=["c\x00d"]))
        assert store.flush(10)
        (row,) = store.rows("requests")
        fb = store.add_feedback("r", 3, None, "x\x00y")
    finally:
        store.close()
    nul = "\ufffd" if store.dialect == "postgresql" else "\x00"
    assert row["prompt"] == f"a{nul}b"
    assert row["output"] == ["c\x00d"]
    assert fb["comment"] == f"x{nul}y"
    assert store.failed_writes == 0


def test_a_nul_in_the_request_id_or_model_is_a_bad_field_not_a_lost_database(db_url):
    """PostgreSQL refuses NUL in text; a client sending one gets a 400 naming the field, not a
    503 saying the database is unavailable (and no failed write is counted)."""
    store = open_store(db_url)
    try:
        for args, param in (
            (("chatcmpl-1\x00", 4), "request_id"),
            (("chatcmpl-1", 4, None, None, "m\x00"), "model"),
        ):
            with pytest.raises(InvalidFeedback) as e:
                store.add_feedback(*args)
            assert e.value.param == param
            assert f"'{param}' must not contain the NUL character" in str(e.value)
        assert store.count("feedback") == 0 and store.failed_writes == 0
    finally:
        store.close()


def test_a_long_model_name_does_not_lose_the_request_log(db_url):
    """A served model named by a long directory path: PostgreSQL's model column holds 200
    characters, and a longer value would fail every batch of the log."""
    long = "/srv/models/" + "m" * 300
    store = open_store(db_url, request_log=True)
    try:
        store.log_request(_record(1, model=long))
        store.log_request(_record(2))
        assert store.flush(30)
        rows = list(store.rows("requests"))
    finally:
        store.close()
    assert store.failed_writes == 0
    assert [r["id"] for r in rows] == ["chatcmpl-1", "chatcmpl-2"]
    assert rows[0]["model"] == long[:200]


def test_a_row_a_column_cannot_hold_drops_only_that_row(db_url):
    store = open_store(db_url, request_log=True)
    try:
        store.log_request(_record(1, id="x" * 300))  # over the id column's 200 characters
        store.log_request(_record(2))
        assert store.flush(30)
        ids = [r["id"] for r in store.rows("requests")]
    finally:
        store.close()
    assert "chatcmpl-2" in ids
    # SQLite does not enforce the length; PostgreSQL refuses that row, and only it
    assert store.failed_writes == (1 if store.dialect == "postgresql" else 0)


def test_feedback_takes_the_model_of_the_logged_request(db_url):
    store = open_store(db_url, request_log=True)
    try:
        store.log_request(_record(7, model="served-model"))
        assert store.flush(10)
        assert store.add_feedback("chatcmpl-7", 4)["model"] == "served-model"
        assert store.add_feedback("chatcmpl-7", 4, model="given")["model"] == "given"
        assert store.add_feedback("not-logged", 4)["model"] is None
    finally:
        store.close()


@pytest.mark.parametrize(
    "args, param, message",
    [
        (("", 5), "request_id", "'request_id' must be the id of a response"),
        (("r" * 201, 5), "request_id", "'request_id' is longer than 200 characters"),
        (("r", 0), "rating", "'rating' must be a whole number from 1 (worst) to 5 (best), got 0"),
        (("r", 6), "rating", "got 6"),
        (("r", 4.5), "rating", "got 4.5"),
        (("r", True), "rating", "got true"),
        (("r", "5"), "rating", "got '5'"),
        (("r", 5, "rude"), "labels", "'labels' must be a list of strings, got 'rude'"),
        (("r", 5, ["ok", ""]), "labels[1]", "'labels[1]' must be a non-empty string of at most 64"),
        (("r", 5, ["x"] * 21), "labels", "'labels' has 21 labels; at most 20 are allowed"),
        (("r", 5, None, "c" * 4001), "comment", "'comment' has 4001 characters; at most 4000 are allowed"),
        (("r", 5, None, 3), "comment", "'comment' must be a string, got 3"),
        (("r", 5, None, None, 7), "model", "'model' must be a string of at most 200 characters"),
    ],
)
def test_bad_feedback_fields(tmp_path, args, param, message):
    store = open_store(str(tmp_path / "f.db"))
    try:
        with pytest.raises(InvalidFeedback) as e:
            store.add_feedback(*args)
        assert e.value.param == param
        assert message in str(e.value)
        assert store.count("feedback") == 0
    finally:
        store.close()


def test_migrations_from_empty_and_reopen(db_url):
    store = open_store(db_url)
    fb = store.add_feedback("r", 2)
    store.close()
    engine = _engine(db_url)
    with engine.connect() as c:
        tables = set(sa.inspect(c).get_table_names())
        versions = c.execute(sa.text("SELECT version, description FROM schema_version")).all()
        indexes = {i["name"] for i in sa.inspect(c).get_indexes("request_log")}
    assert {"feedback", "request_log", "schema_version"} <= tables
    assert [tuple(v) for v in versions] == [(1, "feedback and request_log tables")]
    assert "ix_request_log_created" in indexes
    for _ in range(2):  # re-opening changes nothing and keeps the data
        store = open_store(db_url)
        assert list(store.rows()) == [fb]
        store.close()
    with engine.connect() as c:
        assert c.execute(sa.text("SELECT count(*) FROM schema_version")).scalar() == 1
    engine.dispose()


def test_a_new_migration_is_applied_once(db_url, monkeypatch):
    open_store(db_url).close()

    def v2(conn):
        conn.execute(sa.text("ALTER TABLE feedback ADD COLUMN source VARCHAR(20)"))

    monkeypatch.setattr(schema_mod, "MIGRATIONS", [*schema_mod.MIGRATIONS, (2, "feedback.source", v2)])
    for _ in range(2):
        store = open_store(db_url)
        store.add_feedback("r", 3)
        store.close()
    engine = _engine(db_url)
    with engine.connect() as c:
        assert c.execute(sa.text("SELECT version FROM schema_version ORDER BY version")).scalars().all() == [
            1,
            2,
        ]
        assert "source" in {col["name"] for col in sa.inspect(c).get_columns("feedback")}
    engine.dispose()


def test_a_newer_schema_is_refused(db_url):
    open_store(db_url).close()
    engine = _engine(db_url)
    with engine.begin() as c:
        c.execute(sa.text("INSERT INTO schema_version VALUES (99, 'from the future', 0)"))
    engine.dispose()
    with pytest.raises(StoreError) as e:
        open_store(db_url)
    assert "schema version 99, newer than this tokenmill understands (1); upgrade tokenmill" in str(e.value)


def test_retention_at_open_and_on_demand(db_url):
    now = time.time()
    day = 86400.0
    store = open_store(db_url, request_log=True)
    for i, age in enumerate([10 * day, 3 * day, 1.5 * day, 0.5 * day, 0.0]):
        store.log_request(_record(i, created=now - age))
    assert store.flush(10)
    store.close()
    store = open_store(db_url, request_log=True, retention_days=5)  # deletes the 10-day-old row
    try:
        assert [r["id"] for r in store.rows("requests")] == [f"chatcmpl-{i}" for i in (1, 2, 3, 4)]
        store.retention_days = 1
        assert store.purge_expired(now=now) == 2
        assert [r["id"] for r in store.rows("requests")] == ["chatcmpl-3", "chatcmpl-4"]
        assert store.count("feedback") == 0  # feedback is kept: retention is for the request log
    finally:
        store.close()


def test_retention_runs_periodically(db_url):
    store = open_store(db_url, request_log=True, retention_days=1)
    try:
        store.purge_interval = 0.2
        time.sleep(0.3)
        store.log_request(_record(0, created=time.time() - 2 * 86400))
        store.log_request(_record(1))
        end = time.monotonic() + 10
        while store.count("requests") != 1 and time.monotonic() < end:
            time.sleep(0.05)
        assert [r["id"] for r in store.rows("requests")] == ["chatcmpl-1"]
    finally:
        store.close()


def test_bad_retention(tmp_path):
    with pytest.raises(StoreError, match=r"the request-log retention must be > 0 days, got 0"):
        open_store(str(tmp_path / "f.db"), retention_days=0)


def test_duplicate_request_ids_drop_only_the_repeat(db_url):
    store = open_store(db_url, request_log=True)
    try:
        for i in (0, 1, 1, 2):
            store.log_request(_record(i))
        assert store.flush(10)
        assert [r["id"] for r in store.rows("requests")] == ["chatcmpl-0", "chatcmpl-1", "chatcmpl-2"]
        assert store.failed_writes == 1
    finally:
        store.close()


def test_a_full_queue_drops_and_counts(tmp_path, monkeypatch, caplog):
    """A writer that cannot keep up never makes log_request wait: what does not fit is counted."""
    import threading

    from tokenmill.feedback import store as store_mod

    monkeypatch.setattr(store_mod, "QUEUE_SIZE", 3)
    store = open_store(str(tmp_path / "f.db"), request_log=True)
    release = threading.Event()
    write = store._write
    monkeypatch.setattr(store, "_write", lambda batch: (release.wait(10), write(batch)))
    try:
        store.log_request(_record(0))
        end = time.monotonic() + 5
        while not store._queue.empty() and time.monotonic() < end:  # the writer holds record 0
            time.sleep(0.01)
        t = time.perf_counter()
        for i in range(1, 10):
            store.log_request(_record(i))
        assert time.perf_counter() - t < 0.5
        assert store.failed_writes == 6
        assert "could not write 1 request_log row(s)" in caplog.text
        assert "the queue of 3 records waiting for the database is full" in caplog.text
        release.set()
        assert store.flush(10)
        assert [r["id"] for r in store.rows("requests")] == [f"chatcmpl-{i}" for i in range(4)]
    finally:
        release.set()
        store.close()
