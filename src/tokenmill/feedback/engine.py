"""Engines for the two databases: SQLite tuned for many writers, PostgreSQL through psycopg 3."""

from __future__ import annotations

import os
import time
from typing import Any

from sqlalchemy import event
from sqlalchemy.engine import Engine

from tokenmill.feedback.errors import StoreError

#: seconds a SQLite writer waits for another process's write lock before failing
SQLITE_BUSY_TIMEOUT = 30.0


def make_engine(url: Any, connect_timeout: float) -> Engine:
    from sqlalchemy import create_engine
    from sqlalchemy.exc import DisconnectionError

    if url.get_backend_name() == "sqlite":
        path = url.database
        engine = create_engine(url, connect_args={"timeout": SQLITE_BUSY_TIMEOUT, "check_same_thread": False})

        @event.listens_for(engine, "connect")
        def _on_connect(dbapi_conn: Any, record: Any) -> None:
            dbapi_conn.isolation_level = None  # SQLAlchemy's begin event issues BEGIN itself
            cur = dbapi_conn.cursor()
            cur.execute(f"PRAGMA busy_timeout={int(SQLITE_BUSY_TIMEOUT * 1000)}")
            set_wal(cur, time.monotonic() + SQLITE_BUSY_TIMEOUT)  # readers never block the writer
            cur.execute("PRAGMA synchronous=NORMAL")  # durable at each checkpoint in WAL mode
            cur.close()
            record.info["inode"] = _inode(path)

        @event.listens_for(engine, "checkout")
        def _on_checkout(_dbapi_conn: Any, record: Any, _proxy: Any) -> None:
            # A pooled connection to a file that was deleted or replaced while serving would
            # go on writing to the old file; the pool replaces it, and opening the path again
            # fails loudly when its directory is gone.
            if _inode(path) != record.info.get("inode"):
                raise DisconnectionError(f"{path} was deleted or replaced")

        @event.listens_for(engine, "begin")
        def _on_begin(conn: Any) -> None:
            # IMMEDIATE takes the write lock up front, waiting up to the busy timeout; a
            # deferred transaction that reads and then writes could fail at once instead.
            read = conn.get_execution_options().get("tokenmill_read")
            conn.exec_driver_sql("BEGIN" if read else "BEGIN IMMEDIATE")

        return engine
    try:
        import psycopg  # noqa: F401
    except ImportError:
        raise StoreError(
            "a PostgreSQL feedback database needs psycopg 3: pip install 'tokenmill[postgres]'"
        ) from None
    return create_engine(
        url,
        pool_pre_ping=True,  # a connection the server closed (restart) is replaced, not used
        pool_size=4,
        max_overflow=4,
        connect_args={"connect_timeout": max(1, round(connect_timeout))},
    )


def set_wal(cur: Any, deadline: float) -> None:
    """Switch a SQLite connection to write-ahead logging. Processes that open a new database
    at the same moment race for this switch, and SQLite answers the losers "database is
    locked" at once, without waiting out the busy timeout (seen in about one of ten runs of
    four processes): retry until ``deadline``."""
    import sqlite3

    pause = 0.005
    while True:
        try:
            cur.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as e:
            if "locked" not in str(e) or time.monotonic() + pause > deadline:
                raise
        time.sleep(pause)
        pause = min(pause * 2, 0.1)


def _inode(path: str) -> int | None:
    try:
        return os.stat(path).st_ino
    except OSError:
        return None


def db_reason(e: Exception | None) -> str:
    orig = getattr(e, "orig", None) or e
    return " ".join(str(orig).split()) or type(orig).__name__


def hint(url: Any) -> str:
    if url.get_backend_name() == "sqlite":
        return "Check that the file is writable and is a SQLite database"
    return (
        "Check that the PostgreSQL server is running and reachable, and that the user, "
        "password and database in the URL are right (postgresql://USER:PASSWORD@HOST:PORT/DATABASE)"
    )
