"""Where the prediction log's rows go (`server.prediction_log`): SQLite or PostgreSQL,
the table's columns, and the schema's numbered migrations.

The schema is the server's: created at the first connection and migrated by numbered
steps (`MIGRATIONS`), each applied once in a transaction that also records its number
in `predictions_schema`; a database whose schema is newer than this server knows is
refused (`SchemaTooNew`)."""

from __future__ import annotations

import contextlib
import logging
import sqlite3
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

logger = logging.getLogger("microbatch.server")

COLUMNS = (
    "at", "request_id", "route", "model", "version", "shadow", "against", "position",
    "input_hash", "tokens", "input", "pair", "label", "score", "top_k", "norm", "vector",
    "agreement", "queue_ms", "compute_ms", "latency_ms", "batch_size", "batch", "cached",
    "status", "tenant",
)  # fmt: skip
"""A row's columns, in the order the writer fills them."""

MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (
        """CREATE TABLE predictions (
            id {id},
            at {float} NOT NULL,
            request_id TEXT NOT NULL,
            route TEXT NOT NULL,
            model TEXT NOT NULL,
            version TEXT NOT NULL,
            shadow {bool} NOT NULL,
            against TEXT,
            position INTEGER NOT NULL,
            input_hash TEXT,
            tokens INTEGER,
            input TEXT,
            pair TEXT,
            label TEXT,
            score {float},
            top_k TEXT,
            norm {float},
            vector {blob},
            agreement {float},
            queue_ms {float},
            compute_ms {float},
            latency_ms {float},
            batch_size INTEGER,
            batch INTEGER,
            cached {bool},
            status TEXT NOT NULL
        )""",
        "CREATE INDEX predictions_at ON predictions (at)",
        "CREATE INDEX predictions_version ON predictions (model, version, at)",
    ),
    (
        "ALTER TABLE predictions ADD COLUMN tenant TEXT",
        "CREATE INDEX predictions_tenant ON predictions (tenant, at)",
    ),
)
"""The schema's steps, in order: step N (from 1) takes a database from version N-1 to N.
A change to the table is a new step at the end, never an edit of a step."""

TYPES = {
    "sqlite": {"id": "INTEGER PRIMARY KEY AUTOINCREMENT", "float": "REAL", "bool": "INTEGER",
               "blob": "BLOB"},
    "postgresql": {"id": "BIGSERIAL PRIMARY KEY", "float": "DOUBLE PRECISION",
                   "bool": "BOOLEAN", "blob": "BYTEA"},
}  # fmt: skip


class SchemaTooNew(RuntimeError):
    """The database's log schema is newer than this server knows."""


class Sink(Protocol):
    """Where rows go: one connection, used by one thread at a time."""

    def connect(self) -> None:
        """Connect, and create or migrate the schema. Raises SchemaTooNew, or the
        driver's error."""
        ...

    def write(self, rows: Sequence[tuple[object, ...]]) -> None: ...

    def close(self) -> None: ...


def _migrate(conn: Any, dialect: str, placeholder: str) -> None:
    """Bring the schema to the newest step, each step in its own transaction."""
    cur = conn.cursor()
    cur.execute("CREATE TABLE IF NOT EXISTS predictions_schema (version INTEGER NOT NULL)")
    conn.commit()
    cur.execute("SELECT MAX(version) FROM predictions_schema")
    row = cur.fetchone()
    current = int(row[0]) if row and row[0] is not None else 0
    if current > len(MIGRATIONS):
        raise SchemaTooNew(
            f"the prediction log's schema is at version {current}, newer than this server's "
            f"{len(MIGRATIONS)}; upgrade microbatch or log to another database"
        )
    for number, statements in enumerate(MIGRATIONS[current:], start=current + 1):
        for statement in statements:
            cur.execute(statement.format(**TYPES[dialect]))
        cur.execute(f"INSERT INTO predictions_schema (version) VALUES ({placeholder})", (number,))
        conn.commit()
        logger.info("prediction log: schema migrated to version %d", number)


class SqliteSink:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._conn: sqlite3.Connection | None = None

    def connect(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(self.path, check_same_thread=False, timeout=10)
        conn.execute("PRAGMA journal_mode=WAL")  # readers (microbatch log) never block it
        conn.execute("PRAGMA synchronous=NORMAL")
        _migrate(conn, "sqlite", "?")
        self._conn = conn

    def write(self, rows: Sequence[tuple[object, ...]]) -> None:
        if self._conn is None:
            self.connect()
        assert self._conn is not None
        marks = ", ".join("?" * len(COLUMNS))
        with self._conn:
            self._conn.executemany(
                f"INSERT INTO predictions ({', '.join(COLUMNS)}) VALUES ({marks})", rows
            )

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None


class PostgresSink:
    def __init__(self, url: str) -> None:
        self.url = url
        self._conn: Any = None

    def connect(self) -> None:
        import psycopg  # the `postgres` extra

        self.close()
        conn = psycopg.connect(self.url, connect_timeout=5)
        _migrate(conn, "postgresql", "%s")
        self._conn = conn

    def write(self, rows: Sequence[tuple[object, ...]]) -> None:
        if self._conn is None or self._conn.closed:
            self.connect()
        marks = ", ".join(["%s"] * len(COLUMNS))
        try:
            with self._conn.cursor() as cur:
                cur.executemany(
                    f"INSERT INTO predictions ({', '.join(COLUMNS)}) VALUES ({marks})", rows
                )
            self._conn.commit()
        except Exception:
            self.close()  # the next write reconnects
            raise

    def close(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(Exception):
                self._conn.close()
            self._conn = None


def sink_for(url: str) -> SqliteSink | PostgresSink:
    """`sqlite:///FILE` (or a plain file path) or `postgresql://...`. Raises ValueError."""
    if url.startswith(("postgresql://", "postgres://")):
        return PostgresSink(url)
    if url.startswith("sqlite:///"):
        return SqliteSink(Path(url.removeprefix("sqlite:///")))
    if "://" in url:
        raise ValueError(f"{url!r}: give a file, sqlite:///FILE or postgresql://...")
    return SqliteSink(Path(url))


def connect_to_read(url: str) -> Any:
    """A DB-API connection to the log at `url` (as `sink_for` reads it), for reading
    (`microbatch log`). Raises ValueError for a URL that names neither,
    FileNotFoundError for a missing file."""
    sink = sink_for(url)
    if isinstance(sink, PostgresSink):
        import psycopg

        return psycopg.connect(sink.url, connect_timeout=5)
    if not sink.path.is_file():
        raise FileNotFoundError(f"no prediction log at {sink.path}")
    return sqlite3.connect(f"file:{sink.path}?mode=ro", uri=True)
