"""Large documents, committed in bounded chunks so that an interrupted ingest resumes.

A 50 MB file used to be one transaction of about 90 minutes, lost whole if interrupted. Now a
large document is embedded and committed a chunk of passages at a time into the staging tables
(schema in ``db.py``). A re-run finds the chunks already there for the same file bytes (same
sha256) and goes on from the next passage; a changed file starts over. When the last chunk is
in, :func:`promote` moves the passages into ``passages`` in one transaction, so search sees the
old version or the whole new one, never half a document, as for small documents.
"""

from __future__ import annotations

import sqlite3
import time
from typing import Sequence

import numpy as np

from dragon_edge.store import db


def staged_count(conn: sqlite3.Connection, key: str, sha: str) -> int:
    """Passages already staged for this version of ``key`` (0 if none, or another version)."""
    row = conn.execute("SELECT sha256 FROM staged_sources WHERE source = ?", (key,)).fetchone()
    if row is None or row[0] != sha:
        return 0
    return conn.execute("SELECT COUNT(*) FROM staged_passages WHERE source = ?", (key,)).fetchone()[0]


def begin(conn: sqlite3.Connection, key: str, sha: str, size: int, mtime: float | None, total: int) -> None:
    """Start staging a version of ``key``, dropping what an older version left."""
    conn.execute("DELETE FROM staged_sources WHERE source = ?", (key,))
    conn.execute(
        "INSERT INTO staged_sources (source, sha256, size, mtime, passages_total, started_at) VALUES (?,?,?,?,?,?)",
        (key, sha, size, mtime, total, time.time()),
    )


def add_chunk(conn: sqlite3.Connection, key: str, first_ordinal: int, texts: Sequence[str], vecs: np.ndarray) -> None:
    conn.executemany(
        "INSERT INTO staged_passages (source, ordinal, text, vector) VALUES (?,?,?,?)",
        [(key, first_ordinal + i, text, db.vector_blob(v)) for i, (text, v) in enumerate(zip(texts, vecs))],
    )


def promote(conn: sqlite3.Connection, key: str) -> tuple[list[int], list[int]]:
    """Swap the staged version in for ``key`` (inside the caller's transaction).
    Returns (passage ids removed, passage ids added)."""
    sha, size, mtime = conn.execute(
        "SELECT sha256, size, mtime FROM staged_sources WHERE source = ?", (key,)).fetchone()
    old = db.source_passage_ids(conn, key)
    conn.execute("DELETE FROM sources WHERE source = ?", (key,))
    sid = conn.execute(
        "INSERT INTO sources (source, kind, sha256, size, mtime, added_at) VALUES (?, 'file', ?, ?, ?, ?)",
        (key, sha, size, mtime, time.time()),
    ).lastrowid
    conn.execute(
        "INSERT INTO passages (source_id, ordinal, text, vector) "
        "SELECT ?, ordinal, text, vector FROM staged_passages WHERE source = ? ORDER BY ordinal",
        (sid, key),
    )
    new = [r[0] for r in conn.execute("SELECT id FROM passages WHERE source_id = ? ORDER BY id", (sid,))]
    conn.execute("DELETE FROM staged_sources WHERE source = ?", (key,))  # cascades to its passages
    return old, new


def drop(conn: sqlite3.Connection, keys: Sequence[str]) -> None:
    conn.executemany("DELETE FROM staged_sources WHERE source = ?", [(k,) for k in keys])


def keys_under(conn: sqlite3.Connection, prefix: str) -> list[str]:
    rows = conn.execute("SELECT source FROM staged_sources").fetchall()
    return [r[0] for r in rows if r[0].startswith(prefix)]


def totals(conn: sqlite3.Connection) -> tuple[int, int]:
    """(documents being staged, passages staged)."""
    docs = conn.execute("SELECT COUNT(*) FROM staged_sources").fetchone()[0]
    return docs, conn.execute("SELECT COUNT(*) FROM staged_passages").fetchone()[0]
