"""The SQLite half of the store: the source of truth (text, metadata *and* vectors).

One transaction per document, so a killed ingest leaves every document either fully old or
fully new. Passage ids use AUTOINCREMENT and are never reused, and passages are immutable
(a changed document gets new rows), so "same id set" in the faiss cache means "same content".
Large documents are built up chunk by chunk in the staging tables (``staging.py``) and reach
``passages`` in one final transaction, so the rule above holds for them too.
"""

from __future__ import annotations

import sqlite3
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np

from dragon_edge.store.errors import StoreCorrupt, StoreFull, StoreVersionError, is_disk_full

SCHEMA_VERSION = 2

_SCHEMA = f"""
BEGIN IMMEDIATE;
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS sources (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    source TEXT NOT NULL UNIQUE,      -- absolute file path, or a caller-given name for texts
    kind TEXT NOT NULL CHECK (kind IN ('file', 'text')),
    sha256 TEXT NOT NULL,
    size INTEGER NOT NULL,
    mtime REAL,
    added_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS passages (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    source_id INTEGER NOT NULL REFERENCES sources(id) ON DELETE CASCADE,
    ordinal INTEGER NOT NULL,
    text TEXT NOT NULL,
    vector BLOB NOT NULL              -- float32 little-endian, L2-normalised
);
CREATE INDEX IF NOT EXISTS passages_by_source ON passages(source_id);
{{staging}}
INSERT OR IGNORE INTO meta (key, value) VALUES ('schema_version', '{SCHEMA_VERSION}');
COMMIT;
"""

# v2: a large document's passages wait here, one committed chunk at a time, until it is whole
_STAGING = """
CREATE TABLE IF NOT EXISTS staged_sources (
    source TEXT PRIMARY KEY,          -- the key the document will have in sources
    sha256 TEXT NOT NULL,             -- the version being staged; another version starts over
    size INTEGER NOT NULL,
    mtime REAL,
    passages_total INTEGER NOT NULL,
    started_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS staged_passages (
    source TEXT NOT NULL REFERENCES staged_sources(source) ON DELETE CASCADE,
    ordinal INTEGER NOT NULL,
    text TEXT NOT NULL,
    vector BLOB NOT NULL,
    PRIMARY KEY (source, ordinal)
);
"""
_SCHEMA = _SCHEMA.replace("{staging}", _STAGING)
_MIGRATE_1_TO_2 = f"BEGIN IMMEDIATE;{_STAGING}UPDATE meta SET value = '2' WHERE key = 'schema_version';COMMIT;"


def connect(path: Path) -> sqlite3.Connection:
    """Open (or create) the database and check it is ours and intact."""
    try:
        # explicit transactions; the store's lock (not sqlite3's thread check) serialises use
        conn = sqlite3.connect(path, isolation_level=None, timeout=30.0, check_same_thread=False)
        conn.execute("PRAGMA foreign_keys = ON")
        conn.execute("PRAGMA journal_mode = WAL")  # readers (search) never block the ingest
        conn.execute("PRAGMA synchronous = NORMAL")  # WAL+NORMAL: consistent after a crash
        ok = conn.execute("PRAGMA quick_check").fetchone()[0]
        if ok != "ok":
            raise StoreCorrupt(f"{path}: SQLite integrity check failed: {ok}")
        if not _tables(conn):  # new, or killed before its schema committed: nothing to lose
            conn.executescript(_SCHEMA)  # one transaction, so never half a schema
        elif "meta" in _tables(conn) and get_meta(conn, "schema_version") == "1":
            conn.executescript(_MIGRATE_1_TO_2)  # adds the (empty) staging tables; data untouched
        _check_version(conn, path)
    except sqlite3.DatabaseError as e:
        if is_disk_full(e):
            raise StoreFull(f"{path}: the disk is full; free some space and retry") from e
        raise StoreCorrupt(f"{path}: not a readable store database ({e})") from e
    return conn


def _tables(conn: sqlite3.Connection) -> set[str]:
    return {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}


def _check_version(conn: sqlite3.Connection, path: Path) -> None:
    tables = _tables(conn)
    if not {"meta", "sources", "passages"} <= tables:
        raise StoreCorrupt(f"{path}: not a document store (tables: {sorted(tables)})")
    got = get_meta(conn, "schema_version")
    if got != str(SCHEMA_VERSION):
        raise StoreVersionError(f"{path}: schema version {got}, this code reads {SCHEMA_VERSION}")


@contextmanager
def transaction(conn: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    conn.execute("BEGIN IMMEDIATE")  # take the write lock now, not at the first write
    try:
        yield conn
        conn.execute("COMMIT")  # inside the try: a COMMIT that fails (disk full) must roll back too
    except BaseException:
        _rollback(conn)
        raise


def _rollback(conn: sqlite3.Connection) -> None:
    """Leave no transaction open, or every later statement (even a search) would fail or hold
    the write lock. SQLite may already have rolled back by itself after SQLITE_FULL."""
    if conn.in_transaction:
        try:
            conn.execute("ROLLBACK")
        except sqlite3.OperationalError:
            pass  # "no transaction is active": it was rolled back already


def get_meta(conn: sqlite3.Connection, key: str) -> str | None:
    row = conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
    return row[0] if row else None


def set_meta(conn: sqlite3.Connection, key: str, value: str) -> None:
    conn.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, value))


def vector_blob(vec: np.ndarray) -> bytes:
    return np.ascontiguousarray(vec, dtype="<f4").tobytes()


def blob_vectors(blobs: list[bytes], dim: int) -> np.ndarray:
    if any(len(b) != 4 * dim for b in blobs):
        raise StoreCorrupt(f"a stored vector is not {dim} float32 values")
    return np.frombuffer(b"".join(blobs), dtype="<f4").reshape(-1, dim).astype(np.float32)


def passage_ids(conn: sqlite3.Connection) -> np.ndarray:
    rows = conn.execute("SELECT id FROM passages ORDER BY id").fetchall()
    return np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))


def iter_vectors(
    conn: sqlite3.Connection, dim: int, ids: np.ndarray | None = None, batch: int = 4096
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(ids, vectors) in batches: all passages, or only ``ids``."""
    if ids is None:
        cur = conn.execute("SELECT id, vector FROM passages ORDER BY id")
        while rows := cur.fetchmany(batch):
            yield np.array([r[0] for r in rows], np.int64), blob_vectors([r[1] for r in rows], dim)
        return
    for i in range(0, len(ids), 500):  # stay under SQLite's bound-parameter limit
        part = [int(x) for x in ids[i : i + 500]]
        q = f"SELECT id, vector FROM passages WHERE id IN ({','.join('?' * len(part))})"
        rows = conn.execute(q, part).fetchall()
        if rows:
            yield np.array([r[0] for r in rows], np.int64), blob_vectors([r[1] for r in rows], dim)


def source_passage_ids(conn: sqlite3.Connection, key: str) -> list[int]:
    q = "SELECT p.id FROM passages p JOIN sources s ON p.source_id = s.id WHERE s.source = ?"
    return [r[0] for r in conn.execute(q, (key,))]
