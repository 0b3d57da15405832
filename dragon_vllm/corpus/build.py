"""Building an index: inputs -> passages in SQLite -> vectors -> faiss, in a temporary folder
that is renamed into place only when complete (``dragon_host.files.install``).

Passages are 64-word chunks (``dragon_core.retrieval.chunk_words``, as on the device) embedded
with the shared :class:`~dragon_host.embedder.Embedder`, so their scores are ``R(d)`` of the
score function the device uses.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sqlite3
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from dragon_core.retrieval import DEFAULT_PASSAGE_WORDS, chunk_words
from dragon_host.embedder import Embedder, default_embedder
from dragon_host.files import file_sha256, fsync_path, install
from dragon_vllm.corpus.errors import CorpusError, CorpusInputError, EmptyCorpus
from dragon_vllm.corpus.ivf import MIN_NPROBE, IndexSpec, build_faiss_index, default_nprobe, ivf_nlist  # noqa: F401
from dragon_vllm.corpus.layout import FORMAT, FORMAT_VERSION, INDEX_FILE, MANIFEST, PASSAGES_FILE
from dragon_vllm.corpus.readers import TEXT_FIELDS, read_records, resolve_format

DEFAULT_IVF_THRESHOLD = IndexSpec.ivf_threshold
EMBED_BLOCK = 256  # passages per embed call: bounds memory, and the progress bar moves often


def build_index(inputs: Sequence[str | os.PathLike], out_dir: str | os.PathLike, *,
                passage_words: int = DEFAULT_PASSAGE_WORDS, ivf_threshold: int = DEFAULT_IVF_THRESHOLD,
                nprobe: int | None = None, limit: int | None = None, input_format: str = "auto",
                embedder: Embedder | None = None, progress: bool = True, overwrite: bool = False,
                kind: str = "auto", nlist: int | None = None, pq_m: int = IndexSpec.pq_m) -> tuple[Path, Embedder]:
    """Build an index of ``inputs`` in ``out_dir``; returns the folder and the embedder used.
    ``kind``: auto (flat under ``ivf_threshold`` passages, else IVF-Flat), flat, ivf-flat, ivf-pq."""
    if not inputs:
        raise CorpusInputError("no input files")
    spec = IndexSpec(kind=kind, nlist=nlist, nprobe=nprobe, pq_m=pq_m, ivf_threshold=ivf_threshold)
    out = Path(out_dir).absolute()
    check_target(out, overwrite)  # before the expensive part (loading the embedder included)
    embedder = embedder or default_embedder()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        params = {"passage_words": passage_words, "ivf_threshold": ivf_threshold, "limit": limit,
                  "input_format": input_format, "kind": kind, "nlist": nlist, "pq_m": pq_m}
        manifest = _build_files(tmp, [Path(p) for p in inputs], params, spec, embedder, progress)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        for name in (INDEX_FILE, PASSAGES_FILE, MANIFEST):
            fsync_path(tmp / name)
        _install(tmp, out, overwrite)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out, embedder


def _build_files(tmp: Path, inputs: list[Path], params: dict, spec: IndexSpec, embedder: Embedder,
                 progress: bool) -> dict:
    """Write the passages and the faiss index into ``tmp``; return the manifest describing them."""
    t0 = time.perf_counter()
    n, sources = _write_passages(tmp / PASSAGES_FILE, inputs, params["input_format"], params["passage_words"],
                                 params["limit"], progress)
    if n == 0:
        raise EmptyCorpus(f"no passages in {', '.join(map(str, inputs))} (records need one of "
                          f"{'/'.join(TEXT_FIELDS)} in JSON lines)")
    t1 = time.perf_counter()
    vecs = _embed_all(tmp / PASSAGES_FILE, tmp / "vectors.npy", n, embedder, progress)
    t2 = time.perf_counter()
    index, info = build_faiss_index(vecs, spec)
    del vecs
    (tmp / "vectors.npy").unlink()
    import faiss

    faiss.write_index(index, str(tmp / INDEX_FILE))
    t3 = time.perf_counter()
    return {
        "format": FORMAT, "version": FORMAT_VERSION,
        "retriever_fingerprint": embedder.fingerprint, "model_fingerprint": embedder.model_fingerprint,
        "score_function": embedder.score.id(), "dim": embedder.dim,
        "passages": n, "documents": sum(s["documents"] for s in sources),
        "index": info,
        "build": {**params, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                  "seconds": {"read": round(t1 - t0, 3), "embed": round(t2 - t1, 3), "index": round(t3 - t2, 3)}},
        "sources": sources,
        "files": {name: {"bytes": (tmp / name).stat().st_size, "sha256": file_sha256(tmp / name)}
                  for name in (INDEX_FILE, PASSAGES_FILE)},
    }


def _progress(*, enabled: bool, **kw):
    from tqdm.auto import tqdm

    return tqdm(disable=not enabled, dynamic_ncols=True, **kw)


def _write_passages(db_path: Path, inputs: Sequence[Path], fmt: str, passage_words: int,
                    limit: int | None, progress: bool) -> tuple[int, list[dict]]:
    """Pass 1: parse every input into SQLite (before any embedding, so bad input fails fast)."""
    conn = sqlite3.connect(db_path)
    conn.executescript("PRAGMA journal_mode=OFF; PRAGMA synchronous=OFF;"
                       "CREATE TABLE passages (id INTEGER PRIMARY KEY, title TEXT NOT NULL, text TEXT NOT NULL);")
    n, sources, seen = 0, [], set()
    bar = _progress(enabled=progress, desc="reading", unit=" passages")
    try:
        for path in inputs:
            path = Path(path)
            src = {"path": str(path.resolve()), "format": resolve_format(path, fmt), "bytes": path.stat().st_size,
                   "documents": 0, "duplicates": 0, "skipped": 0, "passages": 0}
            for doc in read_records(path, src["format"]):
                if doc is None:
                    src["skipped"] += 1
                    continue
                key = hashlib.sha1(f"{doc.title}\0{doc.text}".encode()).digest()
                if key in seen:  # e.g. the same gold passage of several NQ questions
                    src["duplicates"] += 1
                    continue
                seen.add(key)
                chunks = chunk_words(doc.text, passage_words)
                if limit is not None:
                    chunks = chunks[: max(0, limit - n)]
                conn.executemany("INSERT INTO passages (id, title, text) VALUES (?, ?, ?)",
                                 [(n + i, doc.title, c) for i, c in enumerate(chunks)])
                n += len(chunks)
                src["documents"] += 1
                src["passages"] += len(chunks)
                bar.update(len(chunks))
                if limit is not None and n >= limit:
                    break
            src["sha256"] = file_sha256(path)
            sources.append(src)
            if limit is not None and n >= limit:
                break
        conn.commit()
    finally:
        bar.close()
        conn.close()
    return n, sources


def _embed_all(db_path: Path, vec_path: Path, n: int, embedder: Embedder, progress: bool) -> np.ndarray:
    """Pass 2: embed in blocks into a memory-mapped ``.npy`` (the corpus may exceed RAM)."""
    vecs = np.lib.format.open_memmap(vec_path, mode="w+", dtype=np.float32, shape=(n, embedder.dim))
    conn = sqlite3.connect(db_path)
    bar = _progress(total=n, enabled=progress, desc="embedding", unit=" passages")
    try:
        for start in range(0, n, EMBED_BLOCK):
            rows = conn.execute("SELECT text FROM passages WHERE id >= ? AND id < ? ORDER BY id",
                                (start, start + EMBED_BLOCK)).fetchall()
            vecs[start : start + len(rows)] = embedder.embed([r[0] for r in rows], batch_size=64)
            bar.update(len(rows))
    finally:
        bar.close()
        conn.close()
    vecs.flush()
    return vecs


def check_target(out: Path, overwrite: bool) -> None:
    """Only an empty directory or (with ``overwrite``) a previous index may be replaced."""
    if not out.exists() or (out.is_dir() and not any(out.iterdir())):
        return
    if not out.is_dir() or not (out / MANIFEST).is_file():
        raise CorpusError(f"{out} exists and is not a public index; refusing to replace it")
    if not overwrite:
        raise CorpusError(f"{out} already holds an index; pass overwrite=True (CLI: --force) to replace it")


def _install(tmp: Path, out: Path, overwrite: bool) -> None:
    """Rename the finished tmp dir into place (checked again: another build may have finished
    in the meantime). An empty ``out`` is removed, so the new index is renamed, not swapped."""
    check_target(out, overwrite)
    if out.is_dir() and not any(out.iterdir()):
        out.rmdir()
    install(tmp, out)
