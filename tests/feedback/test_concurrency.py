"""Many writers at once lose nothing: threads sharing a store, processes each with their own."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections import Counter

from tokenmill.feedback import open_store

# Each process waits for the go file, so all of them open the empty database (and run its
# migrations) at the same moment, then write.
WRITER = """
import os, sys, time
from tokenmill.feedback import open_store
url, tag, n, go = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
while not os.path.exists(go):
    time.sleep(0.005)
store = open_store(url, request_log=True)
for i in range(n):
    store.add_feedback(f"{tag}-{i}", 1 + i % 5, [tag], None, "m")
    store.log_request({"id": f"{tag}-{i}", "created": time.time(), "model": "m", "route": "completions",
                       "prompt": "p", "output": ["o"]})
store.close()
print(store.failed_writes)
"""


def test_processes(db_url, tmp_path):
    procs, n = 4, 40
    go = str(tmp_path / "go")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    running = [
        subprocess.Popen(
            [sys.executable, "-c", WRITER, db_url, f"p{k}", str(n), go],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for k in range(procs)
    ]
    time.sleep(1.0)  # let every process import and wait at the go file
    open(go, "w").close()
    for p in running:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
        assert out.strip() == "0"
    store = open_store(db_url)
    try:
        feedback = list(store.rows("feedback"))
        requests = list(store.rows("requests"))
    finally:
        store.close()
    want = {f"p{k}-{i}" for k in range(procs) for i in range(n)}
    assert len(feedback) == procs * n and {r["request_id"] for r in feedback} == want
    assert len(requests) == procs * n and {r["id"] for r in requests} == want
    assert Counter(r["labels"][0] for r in feedback) == {f"p{k}": n for k in range(procs)}
    import sqlalchemy as sa

    from tokenmill.feedback.errors import resolve_url

    engine = sa.create_engine(resolve_url(db_url))
    with engine.connect() as c:  # the migration ran once, though four processes raced to run it
        assert c.execute(sa.text("SELECT version FROM schema_version")).scalars().all() == [1]
    engine.dispose()


def test_threads(db_url):
    threads, n = 8, 25
    store = open_store(db_url, request_log=True)
    errors = []

    def work(k: int) -> None:
        try:
            for i in range(n):
                store.add_feedback(f"t{k}-{i}", 5, None, None)
                store.log_request({"id": f"t{k}-{i}", "created": time.time(), "route": "completions"})
        except Exception as e:  # reported below; a thread's exception is otherwise lost
            errors.append(e)

    try:
        ts = [threading.Thread(target=work, args=(k,)) for k in range(threads)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        assert not errors
        assert store.flush(30)
        want = {f"t{k}-{i}" for k in range(threads) for i in range(n)}
        assert sorted(r["request_id"] for r in store.rows("feedback")) == sorted(want)
        assert sorted(r["id"] for r in store.rows("requests")) == sorted(want)
        assert store.failed_writes == 0
    finally:
        store.close()
