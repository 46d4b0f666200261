"""Tables of the feedback store and the versioned migrations that create them.

The schema's version lives in our own ``schema_version`` table, one row per applied
migration. ``migrate`` runs at every open, in one transaction that first takes a lock
(an advisory lock on PostgreSQL, ``BEGIN IMMEDIATE`` on SQLite), so two processes
opening an empty database at once apply each migration exactly once.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from sqlalchemy import Column, Float, Index, Integer, MetaData, String, Table, Text, select, text
from sqlalchemy.engine import Connection

from tokenmill.feedback.errors import StoreError

metadata = MetaData()

schema_version = Table(
    "schema_version",
    metadata,
    Column("version", Integer, primary_key=True, autoincrement=False),
    Column("description", Text, nullable=False),
    Column("applied", Float, nullable=False),  # unix time
)

# JSON values are stored as JSON text: the same column type on SQLite and PostgreSQL,
# and the store only ever reads them back whole.
feedback = Table(
    "feedback",
    metadata,
    Column("id", String(64), primary_key=True),
    Column("request_id", String(200), nullable=False),
    Column("created", Float, nullable=False),  # unix time
    Column("model", String(200)),
    Column("rating", Integer, nullable=False),
    Column("labels", Text, nullable=False),  # JSON list of strings
    Column("comment", Text),
    Index("ix_feedback_request_id", "request_id"),
    Index("ix_feedback_created", "created"),
)

request_log = Table(
    "request_log",
    metadata,
    Column("id", String(200), primary_key=True),
    Column("created", Float, nullable=False),  # unix time
    Column("model", String(200)),
    Column("route", String(100), nullable=False),
    Column("prompt", Text),
    Column("output", Text),  # JSON list, one string per choice
    Column("params", Text),  # JSON object
    Column("finish_reasons", Text),  # JSON list
    Column("filter_decisions", Text),  # JSON list of objects
    Column("timing", Text),  # JSON object
    Index("ix_request_log_created", "created"),
)


def _v1(conn: Connection) -> None:
    feedback.create(conn)
    request_log.create(conn)


#: (version, description, apply); versions count up from 1 and are never renumbered.
MIGRATIONS: list[tuple[int, str, Callable[[Connection], None]]] = [
    (1, "feedback and request_log tables", _v1),
]

# Any fixed 64-bit number: the key of the advisory lock that serializes migrations.
_PG_LOCK_KEY = 0x746F6B656E6D696C


def latest_version() -> int:
    return MIGRATIONS[-1][0] if MIGRATIONS else 0


def migrate(conn: Connection) -> list[int]:
    """Apply the migrations ``conn``'s database lacks, inside the caller's transaction.

    Returns the versions applied (empty when the schema was current).

    Raises:
        StoreError: the database was written by a newer tokenmill (a higher version).
    """
    if conn.dialect.name == "postgresql":
        conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _PG_LOCK_KEY})
    schema_version.create(conn, checkfirst=True)
    have = set(conn.execute(select(schema_version.c.version)).scalars())
    newest = max(have, default=0)
    if newest > latest_version():
        raise StoreError(
            f"the feedback database has schema version {newest}, newer than this tokenmill "
            f"understands ({latest_version()}); upgrade tokenmill"
        )
    applied = []
    for version, description, apply in MIGRATIONS:
        if version in have:
            continue
        apply(conn)
        conn.execute(
            schema_version.insert().values(version=version, description=description, applied=time.time())
        )
        applied.append(version)
    return applied


def current_version(conn: Connection) -> int:
    row: Any = conn.execute(select(schema_version.c.version).order_by(schema_version.c.version.desc()))
    return int(row.scalar() or 0)
