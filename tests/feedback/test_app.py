"""POST /v1/feedback through the real app and uvicorn, and a database lost while serving."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import shutil
import threading
import time
from collections.abc import Iterator

import httpx
import pytest

from tokenmill.feedback import open_store

MODEL = "tiny-llama"


class ServerThread:
    """uvicorn serving ``app`` on a free port of 127.0.0.1 from a daemon thread."""

    def __init__(self, app) -> None:
        import uvicorn

        config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="on")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=lambda: asyncio.run(self.server.serve()), daemon=True)

    def __enter__(self) -> httpx.Client:
        self.thread.start()
        end = time.monotonic() + 60
        while not self.server.started:
            assert self.thread.is_alive() and time.monotonic() < end, "the test server did not start"
            time.sleep(0.01)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60)
        return self.client

    def __exit__(self, *exc) -> None:
        self.client.close()
        self.server.should_exit = True
        self.thread.join(30)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    import tiny

    return tiny.save_tiny_dir("llama", str(tmp_path_factory.mktemp("feedback-model")))


@contextlib.contextmanager
def serving(model_dir: str, store) -> Iterator[httpx.Client]:
    from tokenmill.generation.async_engine import AsyncEngine
    from tokenmill.generation.engine import EngineConfig
    from tokenmill.server.app import create_app

    config = EngineConfig(model=model_dir, dtype="float32", device="cpu", kv_cache_memory=16 * 2**20)
    app = create_app(
        AsyncEngine.from_config(config), served_model_name=MODEL, store=store, shutdown_timeout=2
    )
    with ServerThread(app) as client:
        yield client


def complete(client: httpx.Client) -> dict:
    r = client.post("/v1/completions", json={"model": MODEL, "prompt": "hello there", "max_tokens": 4})
    assert r.status_code == 200, r.text
    return r.json()


def failures(client: httpx.Client, table: str) -> float:
    text = client.get("/metrics").text
    m = re.search(rf'^tokenmill:store_write_failures_total\{{table="{table}"\}} (\S+)$', text, re.M)
    assert m, text
    return float(m.group(1))


def test_feedback_round_trip(model_dir, db_url):
    store = open_store(db_url)
    with serving(model_dir, store) as client:
        body = {
            "request_id": "chatcmpl-abc",
            "rating": 4,
            "labels": ["helpful"],
            "comment": "fine",
            "extra": 1,
        }
        r = client.post("/v1/feedback", json=body)
        assert r.status_code == 200, r.text
        got = r.json()
        assert got["object"] == "feedback" and got["id"].startswith("fb-")
        assert {k: got[k] for k in ("request_id", "rating", "labels", "comment", "model")} == {
            "request_id": "chatcmpl-abc",
            "rating": 4,
            "labels": ["helpful"],
            "comment": "fine",
            "model": None,
        }
        r = client.post("/v1/feedback", json={"request_id": "cmpl-2", "rating": 1, "model": MODEL})
        assert r.status_code == 200 and r.json()["labels"] == [] and r.json()["model"] == MODEL
        assert failures(client, "feedback") == 0
    # the lifespan closed the store; what the server stored is in the database
    store = open_store(db_url)
    rows = list(store.rows())
    store.close()
    assert [(x["request_id"], x["rating"], x["labels"]) for x in rows] == [
        ("chatcmpl-abc", 4, ["helpful"]),
        ("cmpl-2", 1, []),
    ]
    assert rows[0]["id"] == got["id"] and rows[0]["created"] == got["created"]


@pytest.mark.parametrize(
    "body, status, param, code, message",
    [
        ({"rating": 5}, 400, "request_id", "missing_required_parameter", "'request_id' is required"),
        ({"request_id": "x"}, 400, "rating", "missing_required_parameter", "'rating' is required"),
        (
            {"request_id": "x", "rating": 0},
            400,
            "rating",
            "invalid_value",
            "'rating' must be a whole number from 1 (worst) to 5 (best), got 0",
        ),
        ({"request_id": "x", "rating": "5"}, 400, "rating", "invalid_value", "got '5'"),
        ({"request_id": 7, "rating": 5}, 400, "request_id", "invalid_value", "'request_id' must be the id"),
        (
            {"request_id": "x", "rating": 5, "labels": "a,b"},
            400,
            "labels",
            "invalid_value",
            "a list of strings",
        ),
        ({"request_id": "x", "rating": 5, "labels": ["a", 3]}, 400, "labels[1]", "invalid_value", "got 3"),
        (
            {"request_id": "x", "rating": 5, "comment": "c" * 5000},
            400,
            "comment",
            "invalid_value",
            "'comment' has 5000 characters; at most 4000 are allowed",
        ),
        ([1, 2], 400, None, None, "the request body must be a JSON object"),
    ],
)
def test_bad_feedback(model_dir, tmp_path, body, status, param, code, message):
    store = open_store(str(tmp_path / "f.db"))
    with serving(model_dir, store) as client:
        r = client.post("/v1/feedback", json=body)
        bad_json = client.post(
            "/v1/feedback", content=b"{not json", headers={"content-type": "application/json"}
        )
    assert r.status_code == status
    err = r.json()["error"]
    assert message in err["message"]
    assert (err["param"], err["code"], err["type"]) == (param, code, "invalid_request_error")
    assert (
        bad_json.status_code == 400
        and "the request body is not valid JSON" in bad_json.json()["error"]["message"]
    )


def test_no_store(model_dir):
    with serving(model_dir, None) as client:
        r = client.post("/v1/feedback", json={"request_id": "x", "rating": 5})
        assert "store_write_failures" not in client.get("/metrics").text
    assert r.status_code == 404
    assert r.json()["error"]["message"] == (
        "this server stores no feedback; start tokenmill serve with --feedback-db PATH_OR_URL"
    )
    assert r.json()["error"]["code"] == "feedback_not_enabled"


@contextlib.contextmanager
def db_lost(db_url: str, request) -> Iterator[None]:
    """The database goes away inside the block and comes back after it."""
    if db_url.startswith("postgresql"):
        pg = request.getfixturevalue("pg")
        pg.stop()
        try:
            yield
        finally:
            pg.start()
    else:
        # a deleted directory: SQLite cannot open the file again (root ignores file modes)
        folder = db_url.rsplit("/", 1)[0]
        shutil.rmtree(folder)
        try:
            yield
        finally:
            import os

            os.makedirs(folder)


@pytest.fixture
def lost_url(db_url, tmp_path) -> str:
    """``db_url``, with a SQLite file in a directory of its own that the test may delete."""
    if db_url.startswith("postgresql"):
        return db_url
    (tmp_path / "db").mkdir()
    return str(tmp_path / "db" / "feedback.db")


def test_feedback_while_the_database_is_lost(model_dir, lost_url, request, caplog):
    store = open_store(lost_url)
    caplog.set_level(logging.ERROR, logger="tokenmill.feedback")
    with serving(model_dir, store) as client:
        assert client.post("/v1/feedback", json={"request_id": "a", "rating": 5}).status_code == 200
        with db_lost(lost_url, request):
            assert complete(client)["choices"][0]["text"]  # serving goes on
            r = client.post("/v1/feedback", json={"request_id": "b", "rating": 2})
            assert r.status_code == 503
            assert r.headers["retry-after"] == "5"
            err = r.json()["error"]
            assert err["code"] == "store_unavailable" and err["type"] == "server_error"
            assert err["message"].startswith("the feedback database is unavailable: ")
            assert err["message"].endswith("; retry later")
            assert failures(client, "feedback") == 1
            assert client.get("/health").status_code == 200
        assert f"could not write 1 feedback row(s) to {store.where}" in caplog.text
        r = client.post("/v1/feedback", json={"request_id": "c", "rating": 4})
        assert r.status_code == 200, r.text  # writes resume once the database is back
    store = open_store(lost_url)
    kept = [x["request_id"] for x in store.rows()]
    store.close()
    # PostgreSQL kept its data; the SQLite file was deleted with its directory
    assert kept == (["a", "c"] if lost_url.startswith("postgresql") else ["c"])


def test_request_log_while_the_database_is_lost(model_dir, lost_url, request, caplog):
    store = open_store(lost_url, request_log=True)
    store.retry_delays = (0.05,)
    caplog.set_level(logging.ERROR, logger="tokenmill.feedback")
    with serving(model_dir, store) as client:
        first = complete(client)
        assert store.flush(10)
        (row,) = store.rows("requests")
        assert (row["id"], row["route"], row["model"], row["prompt"]) == (
            first["id"],
            "completions",
            MODEL,
            "hello there",
        )
        assert row["output"] == [first["choices"][0]["text"]]
        assert row["finish_reasons"] == [first["choices"][0]["finish_reason"]]
        assert row["params"]["max_tokens"] == 4
        assert row["timing"]["completion_tokens"] == first["usage"]["completion_tokens"]
        with db_lost(lost_url, request):
            lost = [complete(client) for _ in range(3)]  # every request still succeeds
            assert store.flush(30)
            assert failures(client, "request_log") == 3
            assert store.failed_writes == 3
        assert f"request_log row(s) to {store.where}" in caplog.text
        after = complete(client)
        assert store.flush(30)
        assert failures(client, "request_log") == 3
    store = open_store(lost_url)
    ids = [x["id"] for x in store.rows("requests")]
    store.close()
    assert not {r["id"] for r in lost} & set(ids)
    assert ids == ([first["id"], after["id"]] if lost_url.startswith("postgresql") else [after["id"]])
