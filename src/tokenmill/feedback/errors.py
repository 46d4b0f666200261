"""The one error the feedback store raises at its caller, and how a database URL is read."""

from __future__ import annotations

import os
from typing import Any

ACCEPTED_FORMS = (
    "a file path (feedback.db, /var/lib/tokenmill/feedback.db: SQLite), "
    "sqlite:///relative/path.db, sqlite:////absolute/path.db, "
    "or postgresql://USER:PASSWORD@HOST:PORT/DATABASE"
)


class StoreError(ValueError):
    """The feedback database cannot be used as configured: a bad URL, or a database that
    cannot be reached or opened. The message says which database, why, and what to do.

    It is a ValueError because it is a configuration error the user fixes; the command
    line prints it as one line instead of a traceback.
    """


class StoreUnavailable(RuntimeError):
    """A write failed while serving (the database went away); the caller decides what the
    client sees. Raised only by the synchronous ``add_feedback``."""


def resolve_url(url_or_path: str) -> Any:
    """``url_or_path`` as a SQLAlchemy URL: a bare path means SQLite, ``postgresql://`` and
    ``postgres://`` mean PostgreSQL through psycopg 3.

    Raises:
        StoreError: an empty value, an unknown scheme or a malformed URL, naming the
            accepted forms.
    """
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    text = (url_or_path or "").strip()
    if not text:
        raise StoreError(f"the feedback database is empty; give {ACCEPTED_FORMS}")
    if "://" not in text:
        return _sqlite_url(text, make_url)
    scheme = text.split("://", 1)[0].lower()
    backend = scheme.split("+", 1)[0]
    if backend == "sqlite":
        if scheme not in ("sqlite", "sqlite+pysqlite"):
            raise StoreError(f"unsupported SQLite driver in '{_safe(text)}'; give {ACCEPTED_FORMS}")
        path = text.split("://", 1)[1]
        if not path.startswith("/") or path in ("/", "/:memory:"):
            raise StoreError(
                f"'{_safe(text)}' names no database file (an in-memory database would lose "
                f"everything at exit); give {ACCEPTED_FORMS}"
            )
        return _sqlite_url(path[1:], make_url)
    if backend not in ("postgresql", "postgres"):
        raise StoreError(f"unsupported database URL scheme '{scheme}://'; give {ACCEPTED_FORMS}")
    if scheme not in ("postgresql", "postgres", "postgresql+psycopg"):
        raise StoreError(
            f"unsupported PostgreSQL driver '{scheme}://' (tokenmill uses psycopg 3); "
            f"write postgresql://... instead"
        )
    try:
        url = make_url("postgresql+psycopg://" + text.split("://", 1)[1])
        url.port  # noqa: B018 - make_url only parses the port when asked
    except (ArgumentError, ValueError) as e:
        raise StoreError(f"malformed database URL '{_safe(text)}' ({e}); give {ACCEPTED_FORMS}") from None
    if not url.database:
        raise StoreError(
            f"the database URL '{_safe(text)}' names no database; add it after the host: "
            f"postgresql://USER:PASSWORD@HOST:PORT/DATABASE"
        )
    return url


def _sqlite_url(path: str, make_url: Any) -> Any:
    if path == ":memory:":
        raise StoreError(f"an in-memory database would lose everything at exit; give {ACCEPTED_FORMS}")
    path = os.path.abspath(os.path.expanduser(path))
    if os.path.isdir(path):
        raise StoreError(
            f"the feedback database {path} is a directory; give a file path such as {path}/feedback.db"
        )
    parent = os.path.dirname(path)
    if not os.path.isdir(parent):
        raise StoreError(
            f"cannot create the SQLite database {path}: the directory {parent} does not exist; create it first"
        )
    return make_url("sqlite://").set(database=path)


def _safe(text: str) -> str:
    """A URL as it may be shown: without its password."""
    if "://" in text and "@" in text:
        scheme, rest = text.split("://", 1)
        creds, host = rest.rsplit("@", 1)
        if ":" in creds:
            creds = creds.split(":", 1)[0] + ":***"
        text = f"{scheme}://{creds}@{host}"
    return text[:200]


def describe(url: Any) -> str:
    """Which database a URL points at, for messages: never with its password."""
    if url.get_backend_name() == "sqlite":
        return f"the SQLite database {url.database}"
    host = url.host or url.query.get("host") or "localhost"
    port = url.port or 5432
    user = f" as user '{url.username}'" if url.username else ""
    return f"the PostgreSQL database '{url.database}' at {host}:{port}{user}"


class InvalidFeedback(ValueError):
    """A feedback field with a bad value; ``param`` names the field."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param
