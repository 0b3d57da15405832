"""The device's private document store: folder/text ingest, exact search with DRAGON scores.

Layout of a store directory::

    store.sqlite3   source of truth: sources, passages (text, ordinal, vector BLOB), meta
    index.faiss     cache of the vectors for search; rebuilt/repaired from SQLite when stale

Scores returned by :meth:`DocumentStore.search` are exactly ``R(d)`` of
:mod:`dragon_core.retrieval`, the logits the aggregation mixes documents with.

Any folder can be ingested (issue 11): only regular files are read (``walk.py``), each up to a
size cap (``readers.py``); large documents are committed in chunks and resume (``staging.py``);
a full disk is a typed :class:`StoreFull` that leaves the store searchable.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import logging
import os
import sqlite3
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
from tqdm import tqdm

from dragon_core.passage import Passage
from dragon_core.retrieval import DEFAULT_PASSAGE_WORDS, chunk_words
from dragon_host.embedder import Embedder, default_embedder
from dragon_edge.store import db, index as ix, readers, staging, walk
from dragon_edge.store.names import display_path, source_key
from dragon_edge.store.passages import batched, count_passages, iter_passages
from dragon_edge.store.readers import DEFAULT_MAX_FILE_BYTES
from dragon_edge.store.errors import (
    DocumentError,
    EmptyDocument,
    EmptyFolder,
    FolderNotFound,
    RetrieverMismatch,
    StoreCorrupt,
    StoreError,
    StoreFull,
    StoreNotFound,
    UnknownSource,
    is_disk_full,
)

log = logging.getLogger(__name__)

DB_NAME = "store.sqlite3"
INDEX_NAME = "index.faiss"
CHECKPOINT_S = 30.0  # during long ingests, refresh the faiss cache this often
EMBED_BATCH = 64  # passages embedded per call during folder ingests
LARGE_TEXT_CHARS = 128 * 1024  # a longer document is committed in chunks (~20k words, ~7 s to embed on 2 cores)
CHUNK_PASSAGES = 256  # passages per committed chunk of a large document (~5 s of embedding on 2 cores)
PAUSE_ENV = "DRAGON_STORE_TEST_PAUSE"  # test hook "point:nth:seconds" (see _pause)


@dataclass
class IngestReport:
    added: list[str] = field(default_factory=list)
    updated: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, why)
    resumed: list[str] = field(default_factory=list)  # large documents continued from their staged chunks
    passages_added: int = 0
    passages_removed: int = 0
    seconds: float = 0.0

    def summary(self) -> str:
        """What happened, one line, then one line per skipped entry with its reason."""
        head = (f"added {len(self.added)}, updated {len(self.updated)}, unchanged {len(self.unchanged)}, "
                f"removed {len(self.removed)}, skipped {len(self.skipped)}"
                + (f", resumed {len(self.resumed)}" if self.resumed else "")
                + f"; passages +{self.passages_added} -{self.passages_removed} in {self.seconds:.1f} s")
        return "\n".join([head, *(f"skipped {path}: {why}" for path, why in self.skipped)])


@dataclass(frozen=True)
class StoreStats:
    path: str
    sources: int
    passages: int
    index_vectors: int
    dim: int
    passage_words: int
    model_fingerprint: str
    retriever_fingerprint: str
    score_function: str
    db_bytes: int
    index_bytes: int
    pdf_supported: bool
    staged_documents: int = 0  # large documents interrupted mid-ingest; the next ingest resumes them
    staged_passages: int = 0


@dataclass(frozen=True)
class _Pending:
    """A document read and chunked, waiting to be embedded and committed."""

    key: str
    kind: str
    sha: str
    size: int
    mtime: float | None
    passages: list[str]
    update: bool


@dataclass(frozen=True)
class _LargePending:
    """A document too long for one transaction: embedded and committed chunk by chunk."""

    key: str
    sha: str
    size: int
    mtime: float | None
    text: str
    update: bool


def _locked(method):
    """One operation at a time per handle (so an async SDK may call from worker threads)."""

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        with self._lock:
            return method(self, *args, **kwargs)

    return wrapper


def _disk_full_is_typed(method):
    """A full disk during a write is StoreFull, not a raw sqlite3/OSError traceback. Every
    transaction rolled back (db.transaction), so the store is as it was after its last commit."""

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        try:
            return method(self, *args, **kwargs)
        except (sqlite3.Error, OSError) as exc:
            if isinstance(exc, StoreFull) or not is_disk_full(exc):
                raise
            raise StoreFull(
                f"{self.path}: the disk is full ({exc}). Everything committed before is kept and search "
                "still works; free some space and run the same ingest again to resume."
            ) from exc

    return wrapper


class DocumentStore:
    """Open (creating if needed) the store in directory ``path``. Several processes may open
    one store: SQLite serialises writers and each handle picks up the others' commits."""

    def __init__(
        self,
        path: str | os.PathLike,
        embedder: Embedder | None = None,
        *,
        create: bool = True,
        passage_words: int | None = None,
        reembed_on_mismatch: bool = False,
    ) -> None:
        self.path = Path(path)
        self._embedder = embedder
        self._lock = threading.RLock()
        self._pause_counts: dict[str, int] = {}
        self._db_path, self._index_path = self.path / DB_NAME, self.path / INDEX_NAME
        self.large_text_chars, self.chunk_passages = LARGE_TEXT_CHARS, CHUNK_PASSAGES
        self._open_dir(create)
        self._db = db.connect(self._db_path)
        self.recovered: str | None = None  # what open had to repair, if anything
        self.passage_words = self._init_meta(passage_words)
        self._dim = int(db.get_meta(self._db, "dim"))
        self._check_model(reembed_on_mismatch)
        self._index = self._open_index()
        self._data_version = self._db_version()

    # -------------------------------------------------------------- opening
    def _open_dir(self, create: bool) -> None:
        if not self._db_path.exists():
            if self._index_path.exists():
                raise StoreCorrupt(f"{self._db_path} is missing (index.faiss alone cannot be recovered)")
            if not create:
                raise StoreNotFound(f"no document store at {self.path}")
            if self.path.exists() and not self.path.is_dir():
                raise StoreError(f"{self.path} exists and is not a directory")
            self.path.mkdir(parents=True, exist_ok=True)
        elif not os.access(self._db_path, os.R_OK | os.W_OK):
            raise StoreError(f"{self._db_path}: no read/write permission")

    def _init_meta(self, passage_words: int | None) -> int:
        stored = db.get_meta(self._db, "passage_words")
        if stored is None:
            words = passage_words or DEFAULT_PASSAGE_WORDS
            with db.transaction(self._db):
                db.set_meta(self._db, "passage_words", str(words))
                db.set_meta(self._db, "dim", str(self.embedder.dim))
                db.set_meta(self._db, "model_fingerprint", self.embedder.model_fingerprint)
            return words
        if passage_words is not None and passage_words != int(stored):
            raise StoreError(f"store was built with {stored}-word passages, not {passage_words}")
        return int(stored)

    def _check_model(self, reembed: bool) -> None:
        want, have = db.get_meta(self._db, "model_fingerprint"), self.embedder.model_fingerprint
        if self._dim != self.embedder.dim or want != have:
            if not reembed:
                raise RetrieverMismatch(
                    f"{self.path} was embedded with model {want} (dim {self._dim}); loaded model is "
                    f"{have} (dim {self.embedder.dim}). Open with reembed_on_mismatch=True to re-embed."
                )
            self._reembed_all()

    def _open_index(self):
        ix.remove_stale_tmp(self._index_path)
        try:
            index = ix.load_index(self._index_path, self._dim)
        except ix.IndexFileInvalid as e:
            index = self._rebuild_index()
            if index.ntotal or self._index_path.exists():  # a new, empty store needs no repair
                self.recovered = f"index rebuilt from SQLite ({e})"
        else:
            changed = self._sync(index)
            if changed:
                self.recovered = f"index repaired from SQLite ({changed})"
        if self.recovered:
            log.warning("%s: %s", self.path, self.recovered)
            self._save(index)
        return index

    def _rebuild_index(self):
        index = ix.new_index(self._dim)
        for ids, vecs in db.iter_vectors(self._db, self._dim):
            index.add_with_ids(vecs, ids)
        return index

    def _sync(self, index) -> str:
        """Make ``index`` hold exactly SQLite's passages; say what changed ("" if nothing)."""
        in_db, in_ix = db.passage_ids(self._db), ix.index_ids(index)
        if np.unique(in_ix).size != in_ix.size:
            index.reset()
            in_ix = in_ix[:0]
        extra, missing = np.setdiff1d(in_ix, in_db), np.setdiff1d(in_db, in_ix)
        if extra.size:
            index.remove_ids(extra)
        for ids, vecs in db.iter_vectors(self._db, self._dim, missing):
            index.add_with_ids(vecs, ids)
        return f"-{extra.size} +{missing.size} vectors" if extra.size or missing.size else ""

    def _db_version(self) -> int:
        return self._db.execute("PRAGMA data_version").fetchone()[0]

    def _refresh(self) -> None:
        """Pick up commits made by other processes since we last looked."""
        if self._db is None:
            raise StoreError(f"{self.path}: store is closed")
        v = self._db_version()
        if v != self._data_version:
            self._sync(self._index)
            self._data_version = v

    @property
    def embedder(self) -> Embedder:
        if self._embedder is None:
            self._embedder = default_embedder()
        return self._embedder

    # -------------------------------------------------------------- writing
    @_locked
    @_disk_full_is_typed
    def ingest(
        self,
        folder: str | os.PathLike,
        *,
        progress: bool | None = None,
        prune: bool = False,
        strict: bool = False,
        max_file_bytes: int = DEFAULT_MAX_FILE_BYTES,
        follow_symlinks: bool = False,
    ) -> IngestReport:
        """Ingest every supported regular file under ``folder`` (recursively). Unchanged files
        (same bytes) are skipped, changed ones replaced. FIFOs, devices, sockets, link loops,
        links out of the folder (unless ``follow_symlinks``), files over ``max_file_bytes`` and
        unreadable files are skipped and listed in the report with the reason (``strict=True``
        raises on a file that cannot be read instead). Large documents are committed in chunks,
        with a progress bar, and an interrupted ingest resumes from the last chunk.
        ``prune=True`` also deletes sources under ``folder`` whose files are gone.
        ``progress=None`` shows bars on a terminal. A full disk raises :class:`StoreFull`."""
        t0, report = time.perf_counter(), IngestReport()
        root = Path(folder)
        if not root.is_dir():
            raise FolderNotFound(f"{display_path(root)}: no such folder")
        listing = walk.list_folder(root, links_out=follow_symlinks, exclude=self.path)
        for path, why in listing.skipped:
            log.info("skipped %s: %s", path, why)
        report.skipped += listing.skipped
        files = listing.documents
        if not files:
            kinds = ", ".join(sorted(readers.supported_suffixes()))
            raise EmptyFolder(f"{display_path(root)}: no documents to ingest ({kinds}); "
                              f"{len(listing.skipped)} other files")
        self._refresh()
        bars = dict(disable=None if progress is None else not progress)
        last_save, pending = time.monotonic(), []
        for path in tqdm(files, desc="ingest", unit="file", **bars):
            try:
                item = self._prepare_file(path, report, max_file_bytes)
            except DocumentError as e:
                if strict:
                    raise
                log.info("skipped %s: %s", e.path, e.reason)
                report.skipped.append((e.path, e.reason))
                continue
            if isinstance(item, _LargePending):
                self._write(pending, report)
                pending = []
                self._write_large(item, report, bars)
            elif item is not None:
                pending.append(item)
            if sum(len(p.passages) for p in pending) >= EMBED_BATCH:
                self._write(pending, report)
                pending = []
            if time.monotonic() - last_save > CHECKPOINT_S:
                self._save()
                last_save = time.monotonic()
        self._write(pending, report)
        self._drop_stale_staging(root, files)
        if prune:
            self._prune(root, files, report)
        self._save()
        if not (report.added or report.updated or report.unchanged):
            raise EmptyFolder(f"{display_path(root)}: none of {len(files)} documents could be read: "
                              f"{report.skipped[:3]}")
        report.seconds = time.perf_counter() - t0
        return report

    @_locked
    @_disk_full_is_typed
    def add_file(self, path: str | os.PathLike, *, max_file_bytes: int = DEFAULT_MAX_FILE_BYTES) -> IngestReport:
        """Ingest one file; errors raise."""
        report = IngestReport()
        self._refresh()
        item = self._prepare_file(Path(path), report, max_file_bytes)
        if isinstance(item, _LargePending):
            self._write_large(item, report, dict(disable=None))
        elif item is not None:
            self._write([item], report)
        if item is not None:
            self._save()
        return report

    @_locked
    @_disk_full_is_typed
    def add_texts(self, texts: str | Sequence[str], source: str | None = None) -> int:
        """Add texts as one source (name defaults to a content hash). Re-adding a source name
        replaces its passages; identical content is a no-op. Returns passages added."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        sha = hashlib.sha256("\0".join(texts).encode()).hexdigest()
        source = source or f"text:{sha[:16]}"
        passages = [p for t in texts for p in chunk_words(t, self.passage_words)]
        if not passages:
            raise EmptyDocument(source, "no words to index")
        self._refresh()
        if self._source_sha(source) == sha:
            return 0
        size = sum(len(t.encode()) for t in texts)
        self._write([_Pending(source, "text", sha, size, None, passages, False)], IngestReport())
        self._save()
        return len(passages)

    def _prepare_file(self, path: Path, report: IngestReport, max_file_bytes: int) -> _Pending | _LargePending | None:
        """Read and chunk one file; None if its bytes are unchanged since the last ingest."""
        doc = readers.read_document(path, max_file_bytes)
        key = source_key(path)
        old_sha = self._source_sha(key)
        if old_sha == doc.sha256:
            report.unchanged.append(key)
            return None
        if len(doc.text) > self.large_text_chars:  # not chunked here: its word list alone can take GBs
            if not doc.text.strip():
                raise EmptyDocument(key, "no text")
            return _LargePending(key, doc.sha256, doc.size, doc.mtime, doc.text, old_sha is not None)
        passages = chunk_words(doc.text, self.passage_words)
        if not passages:
            raise EmptyDocument(key, "no text")
        return _Pending(key, "file", doc.sha256, doc.size, doc.mtime, passages, old_sha is not None)

    def _write(self, items: list[_Pending], report: IngestReport) -> None:
        """Embed several documents in one batch (much faster than one call per small file),
        then commit each document in its own transaction."""
        if not items:
            return
        vecs = self.embedder.embed([p for item in items for p in item.passages])
        start = 0
        for item in items:
            end = start + len(item.passages)
            report.passages_removed += self._replace_source(item, vecs[start:end])
            report.passages_added += len(item.passages)
            if item.kind == "file":
                (report.updated if item.update else report.added).append(item.key)
            start = end

    def _write_large(self, item: _LargePending, report: IngestReport, bars: dict) -> None:
        """Embed and commit a large document a chunk at a time (each chunk survives an
        interruption), continuing after the chunks an earlier run committed; then swap it in."""
        total = count_passages(item.text, self.passage_words)
        done = staging.staged_count(self._db, item.key, item.sha)
        if done:
            report.resumed.append(item.key)
            log.info("%s: resuming at passage %d of %d", item.key, done, total)
        else:
            with db.transaction(self._db) as c:
                staging.begin(c, item.key, item.sha, item.size, item.mtime, total)
        rest = itertools.islice(iter_passages(item.text, self.passage_words), done, None)
        name = Path(item.key).name
        with tqdm(total=total, initial=done, desc=name[:40], unit="passage", leave=False, **bars) as bar:
            for chunk in batched(rest, self.chunk_passages):
                vecs = self.embedder.embed(chunk)
                with db.transaction(self._db) as c:
                    staging.add_chunk(c, item.key, done, chunk, vecs)
                done += len(chunk)
                bar.update(len(chunk))
                self._pause("chunk")
        with db.transaction(self._db) as c:
            old, new = staging.promote(c, item.key)
        if old:
            self._index.remove_ids(np.array(old, np.int64))
        for ids, vecs in db.iter_vectors(self._db, self._dim, np.array(new, np.int64)):
            self._index.add_with_ids(vecs, ids)
        report.passages_removed += len(old)
        report.passages_added += len(new)
        (report.updated if item.update else report.added).append(item.key)

    def _drop_stale_staging(self, root: Path, files: Sequence[Path]) -> None:
        """Staged chunks of files no longer in the folder can never be finished."""
        present = {source_key(p) for p in files}
        stale = [k for k in staging.keys_under(self._db, _folder_prefix(root)) if k not in present]
        if stale:
            with db.transaction(self._db) as c:
                staging.drop(c, stale)

    def _replace_source(self, item: _Pending, vecs: np.ndarray) -> int:
        """Swap a source's passages in one transaction; returns how many were removed."""
        key = item.key
        with db.transaction(self._db) as c:
            old = db.source_passage_ids(c, key)
            c.execute("DELETE FROM sources WHERE source = ?", (key,))
            sid = c.execute(
                "INSERT INTO sources (source, kind, sha256, size, mtime, added_at) VALUES (?,?,?,?,?,?)",
                (key, item.kind, item.sha, item.size, item.mtime, time.time()),
            ).lastrowid
            new = [
                c.execute(
                    "INSERT INTO passages (source_id, ordinal, text, vector) VALUES (?,?,?,?)",
                    (sid, i, text, db.vector_blob(v)),
                ).lastrowid
                for i, (text, v) in enumerate(zip(item.passages, vecs))
            ]
            self._pause("in_txn")
        if old:
            self._index.remove_ids(np.array(old, np.int64))
        self._index.add_with_ids(vecs, np.array(new, np.int64))
        self._pause("after_commit")
        return len(old)

    @_locked
    @_disk_full_is_typed
    def delete(self, source: str | os.PathLike) -> int:
        """Delete a source (a text source's name, a file path, or a folder path: every file
        under it). Returns passages removed; raises UnknownSource if nothing matched."""
        self._refresh()
        keys = self._match_sources(source)
        if not keys:
            raise UnknownSource(f"no source {display_path(source)} in {self.path}")
        return self._delete_keys(keys)

    @_locked
    @_disk_full_is_typed
    def delete_all(self) -> int:
        """Empty the store (every source, and any staged chunks). Returns passages removed."""
        self._refresh()
        with db.transaction(self._db) as c:
            c.execute("DELETE FROM staged_sources")
        return self._delete_keys(self.sources())

    @_locked
    def sources_matching(self, source: str | os.PathLike) -> list[str]:
        """What :meth:`delete` would remove: the source itself, or every file under a folder."""
        self._refresh()
        return self._match_sources(source)

    def _delete_keys(self, keys: list[str]) -> int:
        ids: list[int] = []
        with db.transaction(self._db) as c:
            for key in keys:
                ids += db.source_passage_ids(c, key)
            c.executemany("DELETE FROM sources WHERE source = ?", [(k,) for k in keys])
            staging.drop(c, keys)  # a later ingest of the same file starts over
        if ids:
            self._index.remove_ids(np.array(ids, np.int64))
        self._save()
        return len(ids)

    def _match_sources(self, source: str | os.PathLike) -> list[str]:
        name = display_path(source)
        if self._source_sha(name) is not None:
            return [name]
        key = source_key(source)
        if self._source_sha(key) is not None:
            return [key]
        prefix = _folder_prefix(source)
        rows = self._db.execute("SELECT source FROM sources WHERE kind = 'file'").fetchall()
        return [r[0] for r in rows if r[0].startswith(prefix)]

    def _prune(self, root: Path, files: Iterable[Path], report: IngestReport) -> None:
        present = {source_key(p) for p in files}
        gone = [k for k in self._match_sources(root) if k not in present]
        if gone:
            report.passages_removed += self.delete_many(gone)
            report.removed += gone

    @_locked
    def delete_many(self, sources: Sequence[str]) -> int:
        return sum(self.delete(s) for s in sources)

    def _reembed_all(self) -> None:
        """Re-embed every passage with the loaded model (after a model change)."""
        rows = self._db.execute("SELECT id, text FROM passages ORDER BY id").fetchall()
        vecs = self.embedder.embed([r[1] for r in rows]) if rows else []
        with db.transaction(self._db) as c:
            c.executemany("UPDATE passages SET vector = ? WHERE id = ?",
                          [(db.vector_blob(v), r[0]) for r, v in zip(rows, vecs)])
            db.set_meta(c, "dim", str(self.embedder.dim))
            db.set_meta(c, "model_fingerprint", self.embedder.model_fingerprint)
        self._dim = self.embedder.dim
        self._index_path.unlink(missing_ok=True)  # vectors changed under the same ids

    def _source_sha(self, key: str) -> str | None:
        row = self._db.execute("SELECT sha256 FROM sources WHERE source = ?", (key,)).fetchone()
        return row[0] if row else None

    def _save(self, index=None) -> None:
        """Write the faiss cache. On a full disk that is a warning, not an error: SQLite holds
        every vector and the next open rebuilds the cache, so reads must not fail over it."""
        try:
            ix.save_index(self._index if index is None else index, self._index_path, self._pause)
        except OSError as exc:
            if not is_disk_full(exc):
                raise
            log.warning("%s: disk full, the search index cache was not written (%s); it is rebuilt "
                        "from the database when the store is next opened", self.path, exc)

    def _pause(self, point: str) -> None:
        """Test hook: with DRAGON_STORE_TEST_PAUSE="point:nth:seconds", announce on stderr and
        sleep at the nth time ``point`` is reached, so a test can kill -9 the process there."""
        spec = os.environ.get(PAUSE_ENV)
        if not spec or not spec.startswith(point + ":"):
            return
        _, nth, seconds = spec.split(":")
        self._pause_counts[point] = self._pause_counts.get(point, 0) + 1
        if self._pause_counts[point] == int(nth):
            print(f"DRAGON_STORE_PAUSED {point} {nth}", file=sys.stderr, flush=True)
            time.sleep(float(seconds))

    # -------------------------------------------------------------- reading
    @_locked
    def search(self, query: str, k: int = 4) -> list[Passage]:
        """Top-``k`` passages by ``R(d)``, best first."""
        self._refresh()
        n = min(k, self._index.ntotal)
        if n <= 0:
            return []
        q = self.embedder.embed_query(query)[None, :]
        ip, ids = self._index.search(q, n)
        scores = self.embedder.score.from_inner_product(ip[0])
        rows = self._passages_by_id([int(i) for i in ids[0] if i >= 0])
        hits = []
        for i, score in zip(ids[0].tolist(), scores.tolist()):
            if i in rows:  # -1 (fewer hits) or deleted by another process since the last refresh
                text, source, ordinal = rows[i]
                hits.append(Passage(i, text, score, source=source, ordinal=ordinal))
        return hits

    def _passages_by_id(self, ids: list[int]) -> dict[int, tuple[str, str, int]]:
        if not ids:
            return {}
        marks = ",".join("?" * len(ids))
        q = (f"SELECT p.id, p.text, s.source, p.ordinal FROM passages p JOIN sources s "
             f"ON p.source_id = s.id WHERE p.id IN ({marks})")
        return {r[0]: (r[1], r[2], r[3]) for r in self._db.execute(q, ids)}

    @_locked
    def sources(self) -> list[str]:
        return [r[0] for r in self._db.execute("SELECT source FROM sources ORDER BY source")]

    @_locked
    def stats(self) -> StoreStats:
        self._refresh()
        count = lambda table: self._db.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0]  # noqa: E731
        size = lambda p: p.stat().st_size if p.exists() else 0  # noqa: E731
        wal = self._db_path.with_name(DB_NAME + "-wal")
        staged_documents, staged_passages = staging.totals(self._db)
        return StoreStats(
            path=str(self.path),
            sources=count("sources"),
            passages=count("passages"),
            index_vectors=int(self._index.ntotal),
            dim=self._dim,
            passage_words=self.passage_words,
            model_fingerprint=db.get_meta(self._db, "model_fingerprint") or "",
            retriever_fingerprint=self.embedder.fingerprint,
            score_function=self.embedder.score.id(),
            db_bytes=size(self._db_path) + size(wal),
            index_bytes=size(self._index_path),
            pdf_supported=readers.pdf_supported(),
            staged_documents=staged_documents,
            staged_passages=staged_passages,
        )

    # -------------------------------------------------------------- lifecycle
    @_locked
    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None

    def __enter__(self) -> DocumentStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _folder_prefix(folder: str | os.PathLike) -> str:
    """Source keys of files under ``folder`` start with this."""
    return source_key(folder).rstrip(os.sep) + os.sep


__all__ = ["DocumentStore", "Passage", "IngestReport", "StoreStats"]
