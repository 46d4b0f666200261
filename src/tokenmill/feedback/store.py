"""The feedback store: one data layer over SQLite and PostgreSQL (SQLAlchemy Core).

Feedback is written synchronously (the server calls ``add_feedback`` on a worker
thread and tells the client whether it was stored). Request-log records go through a
bounded queue to one writer thread, so serving never waits on the database; when the
database is gone the writer logs and counts what it could not write, and starts
writing again once the database is back.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.engine import Engine
from sqlalchemy.exc import DataError, IntegrityError, SQLAlchemyError

from tokenmill.feedback import records
from tokenmill.feedback.engine import db_reason, hint, make_engine
from tokenmill.feedback.errors import StoreError, StoreUnavailable, describe, resolve_url
from tokenmill.feedback.schema import feedback, migrate, request_log

logger = logging.getLogger("tokenmill.feedback")

#: request-log records that may wait for the writer; more are dropped (and counted)
QUEUE_SIZE = 10_000
#: records written in one transaction
BATCH_SIZE = 256
_STOP = object()


class Store:
    """A feedback database, opened by ``open_store``.

    Attributes:
        url: the SQLAlchemy URL (its password is never shown in messages).
        dialect: "sqlite" or "postgresql".
        request_log: whether ``log_request`` records anything.
        retention_days: request-log rows older than this are deleted (None: kept).
        failed_writes: rows that could not be written (database gone, queue full).
        retry_delays: seconds between a failed request-log batch's further attempts.
        purge_interval: seconds between two retention passes of the writer thread.
    """

    def __init__(self, engine: Engine, *, request_log: bool, retention_days: float | None) -> None:
        self.engine = engine
        self.url = engine.url
        self.dialect = engine.dialect.name
        self.where = describe(engine.url)
        self.request_log = request_log
        self.retention_days = retention_days
        self.failed_writes = 0
        self.retry_delays: tuple[float, ...] = (0.2, 1.0)
        self.purge_interval = 3600.0
        self._listeners: list[Callable[[str, int], None]] = []
        self._queue: queue.Queue[Any] = queue.Queue(QUEUE_SIZE)
        self._pending = 0
        self._idle = threading.Condition()
        self._failing = False  # the last write failed; the next success is logged
        self._closed = False
        self._writer: threading.Thread | None = None
        if request_log or retention_days is not None:
            self._writer = threading.Thread(target=self._run, name="tokenmill-feedback-writer", daemon=True)
            self._writer.start()

    # ---- writing -------------------------------------------------------------------------

    def add_failure_listener(self, listener: Callable[[str, int], None]) -> None:
        """Call ``listener(table, rows)`` for every write that fails (from any thread)."""
        self._listeners.append(listener)

    def log_request(self, record: dict[str, Any]) -> None:
        """Queue one request-log record; never raises, never waits on the database.

        ``record`` holds: id, created (unix time), model, route, prompt, output (list of
        str), params (dict), finish_reasons (list), filter_decisions (list of dict),
        timing (dict). Nothing happens when the store was opened without the request log.
        """
        if not self.request_log or self._closed:
            return
        with self._idle:
            self._pending += 1
        try:
            self._queue.put_nowait(record)
        except queue.Full:
            self._done(1)
            self._fail(
                "request_log", 1, f"the queue of {QUEUE_SIZE} records waiting for the database is full"
            )

    def add_feedback(
        self,
        request_id: str,
        rating: int,
        labels: list[str] | None = None,
        comment: str | None = None,
        model: str | None = None,
    ) -> dict[str, Any]:
        """Store one feedback and return the stored row (with its ``id`` and ``created``).

        Without ``model``, the model of the logged request ``request_id`` is used when
        the request log holds it.

        Raises:
            InvalidFeedback: a bad field, named.
            StoreUnavailable: the database could not be written.
        """
        request_id, rating, labels, comment, model = records.check_feedback(
            request_id, rating, labels, comment, model
        )
        if comment is not None and self.dialect == "postgresql":
            comment = comment.replace("\x00", "\ufffd")  # PostgreSQL text cannot hold NUL
        row = records.feedback_row(request_id, rating, labels, comment, model)
        last: Exception | None = None
        for attempt in range(2):
            try:
                with self.engine.begin() as conn:
                    if attempt:  # a database recreated while serving needs its tables again
                        migrate(conn)
                    if row["model"] is None:
                        q = select(request_log.c.model).where(request_log.c.id == request_id)
                        row["model"] = conn.execute(q).scalar()
                    conn.execute(feedback.insert().values(**row))
                self._succeeded()
                return records.decode_feedback(row)
            except SQLAlchemyError as e:
                last = e
        why = db_reason(last)
        self._fail("feedback", 1, why)
        raise StoreUnavailable(f"the feedback database is unavailable: {why}")

    def purge_expired(self, now: float | None = None) -> int:
        """Delete request-log rows older than ``retention_days``; returns how many."""
        if self.retention_days is None:
            return 0
        cutoff = (time.time() if now is None else now) - self.retention_days * 86400.0
        with self.engine.begin() as conn:
            n = conn.execute(request_log.delete().where(request_log.c.created < cutoff)).rowcount
        if n:
            logger.info("deleted %d request-log rows older than %g days", n, self.retention_days)
        return int(n or 0)

    def flush(self, timeout: float = 30.0) -> bool:
        """Wait until every queued record was written (or failed); False on timeout."""
        end = time.monotonic() + timeout
        with self._idle:
            while self._pending:
                left = end - time.monotonic()
                if left <= 0:
                    return False
                self._idle.wait(left)
        return True

    def close(self, timeout: float = 30.0) -> None:
        """Write what is queued (no retries), stop the writer, release the connections."""
        if self._closed:
            return
        self._closed = True
        if self._writer is not None:
            self._queue.put(_STOP)
            self._writer.join(timeout)
            if self._writer.is_alive():
                logger.warning("the request-log writer did not finish within %g s", timeout)
        self.engine.dispose()

    # ---- reading -------------------------------------------------------------------------

    def rows(self, what: str = "feedback", since: float | None = None) -> Iterator[dict[str, Any]]:
        """Rows of ``what`` ("feedback" or "requests"), oldest first, JSON columns decoded.

        Args:
            since: only rows created at or after this unix time.
        """
        if what not in ("feedback", "requests"):
            raise ValueError(f"what must be 'feedback' or 'requests', got {what!r}")
        table = feedback if what == "feedback" else request_log
        decode = records.decode_feedback if what == "feedback" else records.decode_log
        q = select(table).order_by(table.c.created, table.c.id)
        if since is not None:
            q = q.where(table.c.created >= since)
        with self.engine.connect() as conn:
            # a plain BEGIN: on SQLite a long export must not hold the write lock
            conn = conn.execution_options(tokenmill_read=True, yield_per=1000)
            for row in conn.execute(q).mappings():
                yield decode(dict(row))

    def count(self, what: str = "feedback", since: float | None = None) -> int:
        """How many rows ``what`` ("feedback" or "requests") holds."""
        if what not in ("feedback", "requests"):
            raise ValueError(f"what must be 'feedback' or 'requests', got {what!r}")
        table = feedback if what == "feedback" else request_log
        q = select(func.count()).select_from(table)
        if since is not None:
            q = q.where(table.c.created >= since)
        with self.engine.connect() as conn:
            return int(conn.execution_options(tokenmill_read=True).execute(q).scalar() or 0)

    # ---- the writer thread ---------------------------------------------------------------

    def _run(self) -> None:
        last_purge = time.monotonic()  # open_store has just purged
        while True:
            # purge_interval is read each time round, so a test can shorten it
            next_purge = last_purge + self.purge_interval
            wait = max(0.0, next_purge - time.monotonic()) if self.retention_days is not None else None
            try:
                item = self._queue.get(timeout=wait)
            except queue.Empty:
                item = None
            stop = item is _STOP
            batch = [] if item is None or stop else [item]
            while not stop and len(batch) < BATCH_SIZE:
                try:
                    more = self._queue.get_nowait()
                except queue.Empty:
                    break
                stop = more is _STOP
                if not stop:
                    batch.append(more)
            if batch:
                try:
                    self._write(batch)
                except Exception:  # a bug here must not end the writer and silently fill the queue
                    logger.exception("the request-log writer failed")
                    self._fail("request_log", len(batch), None)
                self._done(len(batch))
            if self.retention_days is not None and time.monotonic() >= next_purge and not stop:
                last_purge = time.monotonic()
                try:
                    self.purge_expired()
                except SQLAlchemyError as e:
                    logger.warning(
                        "could not delete expired request-log rows from %s: %s", self.where, db_reason(e)
                    )
            if stop:
                return

    def _write(self, batch: list[dict[str, Any]]) -> None:
        rows = []
        for record in batch:
            try:
                rows.append(records.log_row(record, nul_free=self.dialect == "postgresql"))
            except (KeyError, TypeError, ValueError) as e:
                logger.error("dropped a malformed request-log record (%s: %s)", type(e).__name__, e)
                self._fail("request_log", 1, None)
        if not rows:
            return
        delays = () if self._closed else self.retry_delays
        last: Exception | None = None
        for attempt, delay in enumerate((0.0, *delays)):
            time.sleep(delay)
            try:
                with self.engine.begin() as conn:
                    if attempt or self._failing:  # the database may be new: give it its tables
                        migrate(conn)
                    conn.execute(request_log.insert(), rows)
                self._succeeded()
                return
            except (IntegrityError, DataError):  # one bad row must not take the batch with it
                return self._write_one_by_one(rows)
            except SQLAlchemyError as e:
                last = e
        self._fail("request_log", len(rows), db_reason(last))

    def _write_one_by_one(self, rows: list[dict[str, Any]]) -> None:
        # a repeated id (or a value a column cannot hold) fails the whole batch; write the
        # others and drop only it
        for row in rows:
            try:
                with self.engine.begin() as conn:
                    conn.execute(request_log.insert().values(**row))
            except IntegrityError:
                logger.error("request-log id %r is already logged; the new record was dropped", row["id"])
                self._fail("request_log", 1, None)
            except SQLAlchemyError as e:
                self._fail("request_log", 1, db_reason(e))

    def _done(self, n: int) -> None:
        with self._idle:
            self._pending -= n
            if not self._pending:
                self._idle.notify_all()

    def _succeeded(self) -> None:
        if self._failing:
            self._failing = False
            logger.warning("writing to %s again", self.where)

    def _fail(self, table: str, n: int, reason: str | None) -> None:
        self.failed_writes += n
        if reason is not None:
            self._failing = True
            logger.error("could not write %d %s row(s) to %s: %s", n, table, self.where, reason)
        for listener in self._listeners:
            try:
                listener(table, n)
            except Exception:  # a metrics bug must not stop the writer
                logger.exception("feedback store failure listener failed")


def open_store(
    url_or_path: str,
    *,
    request_log: bool = False,
    retention_days: float | None = None,
    connect_timeout: float = 5.0,
) -> Store:
    """Open (and create or migrate) the feedback database.

    Args:
        url_or_path: a file path or ``sqlite:///path`` (SQLite), or
            ``postgresql://USER:PASSWORD@HOST:PORT/DATABASE``.
        request_log: record requests given to ``Store.log_request`` (opt-in: prompts and
            outputs are personal data).
        retention_days: delete request-log rows older than this many days, now and
            every hour; None keeps them.
        connect_timeout: seconds to wait for a PostgreSQL server.

    Raises:
        StoreError: a bad URL, a database that cannot be reached or opened, or one
            written by a newer tokenmill; the message says which and what to do.
    """
    if retention_days is not None and not retention_days > 0:
        raise StoreError(f"the request-log retention must be > 0 days, got {retention_days}")
    url = resolve_url(url_or_path)
    engine = make_engine(url, connect_timeout)
    try:
        with engine.begin() as conn:
            applied = migrate(conn)
    except StoreError:
        engine.dispose()
        raise
    except SQLAlchemyError as e:
        engine.dispose()
        why = db_reason(e)
        stop = "" if why.endswith((".", "?", "!")) else "."
        raise StoreError(f"cannot open {describe(url)}: {why}{stop} {hint(url)}") from None
    if applied:
        logger.info("%s: applied schema migrations %s", describe(url), applied)
    store = Store(engine, request_log=request_log, retention_days=retention_days)
    try:
        store.purge_expired()
    except SQLAlchemyError as e:
        store.close()
        raise StoreError(f"cannot delete expired rows in {describe(url)}: {db_reason(e)}") from None
    return store
