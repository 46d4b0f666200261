"""Every way the feedback database can be misconfigured gets a message that says what and how to fix it."""

from __future__ import annotations

import socket

import pytest

from tokenmill.cli.main import main
from tokenmill.feedback import StoreError, open_store

FORMS = "postgresql://USER:PASSWORD@HOST:PORT/DATABASE"


@pytest.mark.parametrize(
    "url, message",
    [
        ("", "the feedback database is empty; give a file path"),
        ("mysql://root@localhost/fb", "unsupported database URL scheme 'mysql://'; give a file path"),
        ("http://example.com/db", "unsupported database URL scheme 'http://'"),
        (
            "postgresql+asyncpg://u@h/db",
            "unsupported PostgreSQL driver 'postgresql+asyncpg://' (tokenmill uses psycopg 3)",
        ),
        ("sqlite+aiosqlite:///x.db", "unsupported SQLite driver in 'sqlite+aiosqlite:///x.db'"),
        ("postgresql://u@localhost:port/db", "malformed database URL 'postgresql://u@localhost:port/db'"),
        ("postgresql://u@localhost:5432", "names no database; add it after the host"),
        ("postgresql://u@localhost:5432/", "names no database"),
        ("sqlite://", "'sqlite://' names no database file (an in-memory database would lose everything"),
        ("sqlite:///:memory:", "names no database file"),
        (":memory:", "an in-memory database would lose everything at exit"),
        ("/no/such/dir/feedback.db", "the directory /no/such/dir does not exist; create it first"),
    ],
)
def test_bad_url(url, message):
    with pytest.raises(StoreError) as e:
        open_store(url)
    assert message in str(e.value)
    if "give" in message:  # the accepted forms are listed
        assert "sqlite:///relative/path.db" in str(e.value) and FORMS in str(e.value)


def test_the_password_is_never_shown():
    with pytest.raises(StoreError) as e:
        open_store("postgresql://alice:s3cret@localhost:port/db")
    assert "s3cret" not in str(e.value) and "alice:***@localhost" in str(e.value)


def test_a_directory_is_no_database(tmp_path):
    with pytest.raises(
        StoreError, match=f"the feedback database {tmp_path} is a directory; give a file path"
    ):
        open_store(str(tmp_path))


def test_a_file_that_is_not_sqlite(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_bytes(b"this is not a database, just text\n" * 100)
    with pytest.raises(StoreError) as e:
        open_store(str(path))
    assert f"cannot open the SQLite database {path}: file is not a database" in str(e.value)
    assert "Check that the file is writable and is a SQLite database" in str(e.value)


def test_sqlite_url_forms(tmp_path, monkeypatch):
    store = open_store(f"sqlite:///{tmp_path}/a.db")  # four slashes: an absolute path
    assert store.where == f"the SQLite database {tmp_path}/a.db"
    store.close()
    monkeypatch.chdir(tmp_path)
    store = open_store("sqlite:///b.db")
    assert store.where == f"the SQLite database {tmp_path}/b.db"
    store.close()


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens there once the socket is closed


def test_unreachable_postgresql_at_start():
    port = _closed_port()
    with pytest.raises(StoreError) as e:
        open_store(f"postgresql://bob:pw@127.0.0.1:{port}/feedback", connect_timeout=2)
    msg = str(e.value)
    assert msg.startswith(
        f"cannot open the PostgreSQL database 'feedback' at 127.0.0.1:{port} as user 'bob': "
    )
    assert "Connection refused" in msg
    assert "Check that the PostgreSQL server is running and reachable" in msg
    assert "pw@" not in msg


def test_missing_postgresql_database(pg):
    with pytest.raises(StoreError) as e:
        open_store(pg.url("no_such_db"))
    assert (
        f"cannot open the PostgreSQL database 'no_such_db' at 127.0.0.1:{pg.port} as user 'tokenmill'"
        in str(e.value)
    )
    assert 'database "no_such_db" does not exist' in str(e.value)


def test_serve_flags(capsys):
    assert main(["serve", "--request-log"]) == 2
    assert (
        "--request-log needs a database to write to: add --feedback-db PATH_OR_URL" in capsys.readouterr().err
    )
    assert main(["serve", "--feedback-db", "x.db", "--request-log-retention", "0"]) == 2
    assert "--request-log-retention must be > 0 days, got 0.0" in capsys.readouterr().err


def test_serve_fails_fast_on_an_unreachable_database(capsys):
    """The database is opened before any model loads: the error comes at once, as one line."""
    port = _closed_port()
    assert (
        main(["serve", "--model", "/no/model/needed", "--feedback-db", f"postgresql://u@127.0.0.1:{port}/fb"])
        == 2
    )
    err = capsys.readouterr().err
    assert err.startswith(
        f"tokenmill serve: error: cannot open the PostgreSQL database 'fb' at 127.0.0.1:{port}"
    )
    assert "Traceback" not in err
