"""A built public index, opened read-only: load (with its checks) and search.

Scores are ``R(d)`` of the shared score function, so the device can mix cloud and private
documents in one softmax (the handshake compares ``retriever_fingerprint``; :meth:`PublicIndex.load`
refuses an index built by another retriever).
"""

from __future__ import annotations

import os
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from dragon_core.passage import Passage
from dragon_host.embedder import Embedder, default_embedder
from dragon_host.files import file_sha256
from dragon_vllm.corpus.build import build_index
from dragon_vllm.corpus.errors import CorpusCorrupt, CorpusError, CorpusRetrieverMismatch
from dragon_vllm.corpus.ivf import check_index_info
from dragon_vllm.corpus.layout import INDEX_FILE, PASSAGES_FILE, read_manifest


class PublicIndex:
    """A built index, opened read-only. ``search`` is thread-safe (the cloud calls it from
    ``asyncio.to_thread``)."""

    def __init__(self, path: Path, manifest: dict, index, conn: sqlite3.Connection, embedder: Embedder,
                 searcher=None) -> None:
        self.path, self.manifest, self.index, self.embedder = path, manifest, index, embedder
        # what answers a batch of query vectors: the faiss index itself, or (IVF, lookahead=True)
        # a LookaheadSearcher whose results are the same, id for id
        self.searcher = searcher
        self._timing = RetrievalCounters()
        self._conn = conn
        self._db_lock = threading.Lock()  # one sqlite connection shared by threads
        self._embed_lock = threading.Lock()  # HF fast tokenizers fail when used by two threads at once

    # ---------------------------------------------------------- build
    @classmethod
    def build(cls, inputs: Sequence[str | os.PathLike], out_dir: str | os.PathLike, **options) -> "PublicIndex":
        """Build an index of ``inputs`` in ``out_dir`` and open it (options: see
        :func:`dragon_vllm.corpus.build.build_index`)."""
        out, embedder = build_index(inputs, out_dir, **options)
        return cls.load(out, embedder=embedder)

    # ---------------------------------------------------------- load
    @classmethod
    def load(cls, path: str | os.PathLike, *, embedder: Embedder | None = None, nprobe: int | None = None,
             verify: bool = False, lookahead: bool = False, **lookahead_options) -> "PublicIndex":
        """Open a built index. Raises :class:`CorpusNotFound`, :class:`CorpusCorrupt` (missing,
        truncated or — with ``verify`` — altered files, a bad index entry in the manifest) or
        :class:`CorpusRetrieverMismatch`. The manifest's kind picks the searcher; its nprobe is the
        default (``nprobe`` overrides it). ``lookahead`` (IVF kinds): search through the cluster
        cache (``lookahead.py``; options: ``budget_bytes``, ``decay``, ``store``)."""
        root = Path(path)
        manifest = read_manifest(root)
        manifest["index"] = check_index_info(manifest["index"], str(root))
        embedder = embedder or default_embedder()
        _check_retriever(manifest, embedder, root)
        for name in (INDEX_FILE, PASSAGES_FILE):
            _check_file(root, name, manifest, verify)
        index = _read_faiss(root / INDEX_FILE, manifest)
        searcher = _searcher(index, manifest["index"], nprobe, lookahead, lookahead_options)
        conn = _open_passages(root / PASSAGES_FILE, manifest)
        return cls(root, manifest, index, conn, embedder, searcher)

    # ---------------------------------------------------------- search
    def __len__(self) -> int:
        return int(self.index.ntotal)

    @property
    def fingerprint(self) -> str:
        return self.manifest["retriever_fingerprint"]

    @property
    def nprobe(self) -> int | None:
        if self.kind == "flat":
            return None
        import faiss

        return int(faiss.extract_index_ivf(self.index).nprobe)

    def search(self, query: str, k: int = 4) -> list[Passage]:
        """Top-``k`` passages by ``R(d)``, best first."""
        return self.search_many([query], k)[0]

    def search_many(self, queries: Sequence[str], k: int = 4) -> list[list[Passage]]:
        """Batched :meth:`search`: one embedding call, one faiss search, one SQLite read."""
        if k <= 0 or not queries:
            return [[] for _ in queries]
        t0 = time.perf_counter()
        with self._embed_lock:
            q = self.embedder.embed(list(queries))
        ip, ids = self.searcher.search(q, min(k, len(self)))
        found = self._passages(ip, ids)
        self._count(len(queries), time.perf_counter() - t0)
        return found

    # ---------------------------------------------------------- in two steps (TeleRAG's lookahead)
    @property
    def lookahead(self):
        """The :class:`~dragon_vllm.corpus.lookahead.LookaheadSearcher` (loaded with
        ``lookahead=True``), else None: then :meth:`open_queries` is not available."""
        return getattr(self.searcher, "lookahead", None)

    def open_queries(self, queries: Sequence[str]) -> list["OpenedQuery"]:
        """Embed the queries and open each on the lookahead searcher: their probed clusters start
        copying into the cache now, for a :meth:`search_opened` later. Each must end in
        ``search_opened`` or :meth:`release` (it pins its clusters until then)."""
        if self.lookahead is None:
            raise CorpusError(f"{self.path} was loaded without lookahead=True: nothing to open")
        t0 = time.perf_counter()
        with self._embed_lock:
            q = self.embedder.embed(list(queries))
        return [OpenedQuery(la, t0) for la in self.lookahead.open_each(q)]

    def search_opened(self, opened: Sequence["OpenedQuery"], k: int) -> list[list[Passage] | None]:
        """The top-``k`` passages of opened queries, exactly as :meth:`search_many` finds them (one
        scan for all); None for a query released before (its request is gone)."""
        if k <= 0:
            for o in opened:
                self.release(o)
            return [[] for _ in opened]
        found = self.lookahead.search_many([o.lookahead for o in opened], min(k, len(self)))
        live = [(o, f) for o, f in zip(opened, found) if f is not None]
        if not live:
            return [None] * len(opened)
        ip, ids = np.vstack([f[0] for _, f in live]), np.vstack([f[1] for _, f in live])
        passages = iter(self._passages(ip, ids))
        self._count(len(live), time.perf_counter() - min(o.arrived for o, _ in live))
        return [next(passages) if f is not None else None for f in found]

    def release(self, opened: "OpenedQuery") -> None:
        """Abandon an opened query (no search will come): its clusters are unpinned. Idempotent,
        and a no-op once its search has begun (the search unpins them)."""
        self.lookahead.release(opened.lookahead)

    def _passages(self, ip: np.ndarray, ids: np.ndarray) -> list[list[Passage]]:
        """faiss's (inner products, ids) rows as passages, best first, with ``R(d)`` scores."""
        # Missing hits (id -1, an IVF probing too few lists) carry -FLT_MAX: zero them before scaling.
        scores = self.embedder.score.from_inner_product(np.where(ids >= 0, ip, 0.0))
        rows = self._rows({int(i) for i in ids.ravel() if i >= 0})
        return [[_passage(int(i), rows[int(i)], float(s)) for i, s in zip(ids_q, sc_q) if i >= 0]
                for ids_q, sc_q in zip(ids.tolist(), scores.tolist())]

    # ---------------------------------------------------------- by vector (RaLMSpec, iterative retrieval)
    def embed_query(self, query: str) -> np.ndarray:
        """The query's embedding (1 x d), exactly as ``search`` makes it."""
        with self._embed_lock:
            return self.embedder.embed([query])

    def search_vector(self, q: np.ndarray, k: int) -> list[Passage]:
        """``search`` for an embedded query, its hits re-scored with the canonical kernel
        (``score_vectors``) and ranked by ``canonical_order``: the scores a speculation from
        cached vectors reproduces bitwise. (faiss's own scores differ in the last bits once a
        flat scan is large enough to take another code path: 300k vectors here.)"""
        return self.search_vectors(np.asarray(q, dtype=np.float32).reshape(1, -1), k)[0]

    def search_vectors(self, queries: np.ndarray, k: int) -> list[list[Passage]]:
        """``search_vector`` for several embedded queries (n x d) in one faiss search: RaLMSpec's
        batched verification (a flat scan reads the vectors once for all of them)."""
        t0 = time.perf_counter()
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        _, ids = self.searcher.search(queries, min(k, len(self)))
        hits = canonical_hits(self, queries, ids)
        rows = self._rows({i for h in hits for i, _ in h})
        self._count(len(queries), time.perf_counter() - t0)
        return [[_passage(i, rows[i], score) for i, score in h] for h in hits]

    def vectors(self, ids: Sequence[int]) -> np.ndarray:
        """The stored vectors of passages (len(ids) x d, float32): what the index scores."""
        import faiss

        if self.kind != "flat":
            ivf = faiss.extract_index_ivf(self.index)
            with self._db_lock:  # once: an id -> list position map, 8 bytes per passage
                if ivf.direct_map.type == faiss.DirectMap.NoMap:
                    ivf.make_direct_map()
        return np.ascontiguousarray(self.index.reconstruct_batch(np.asarray(ids, dtype=np.int64)), dtype=np.float32)

    def score_vectors(self, q: np.ndarray, vectors: np.ndarray) -> np.ndarray:
        """``R`` of ``vectors`` for the embedded query, bitwise as ``search_vector`` scores them
        (faiss's own inner-product kernel, the one its flat and IVF-Flat scans use)."""
        import faiss

        q = np.ascontiguousarray(q, dtype=np.float32).reshape(-1)
        out = np.empty(len(vectors), dtype=np.float32)
        if len(vectors):
            faiss.fvec_inner_products_ny(faiss.swig_ptr(out), faiss.swig_ptr(q), faiss.swig_ptr(vectors),
                                         q.size, len(vectors))
        return self.embedder.score.from_inner_product(out)

    def passage(self, pid: int) -> tuple[str, str]:
        """(title, text) of one passage id."""
        if not 0 <= pid < len(self):
            raise KeyError(pid)
        return self._rows({pid})[pid]

    def _rows(self, ids: Iterable[int]) -> dict[int, tuple[str, str]]:
        ids = sorted(ids)
        if not ids:
            return {}
        marks = ",".join("?" * len(ids))
        with self._db_lock:
            found = self._conn.execute(f"SELECT id, title, text FROM passages WHERE id IN ({marks})", ids).fetchall()
        rows = {r[0]: (r[1], r[2]) for r in found}
        if len(rows) != len(ids):
            raise CorpusCorrupt(f"{self.path}: passages {sorted(set(ids) - set(rows))[:5]} are in the faiss "
                                f"index but not in {PASSAGES_FILE}; rebuild the index")
        return rows

    @property
    def kind(self) -> str:
        return self.manifest["index"]["kind"]

    def _count(self, queries: int, seconds: float) -> None:
        self._timing.count(queries, seconds)

    def retrieval_stats(self) -> dict:
        """Cumulative retrieval counters for ``/metrics``: searches, queries and seconds (embedding
        + faiss + passages: query arrival -> top-k ready), plus, on the lookahead path, the cluster
        cache's (``cache_hits``, ``cache_misses``, ``cache_hit_rate``, ``cache_used_bytes``, ...)."""
        out = self._timing.snapshot()
        snapshot = getattr(self.searcher, "snapshot", None)
        if snapshot is not None:
            out.update({f"cache_{k}": v for k, v in snapshot().items() if not k.startswith("retrieval_")})
        return out

    def close(self) -> None:
        with self._db_lock:
            self._conn.close()
        if hasattr(self.searcher, "close"):
            self.searcher.close()

    def __enter__(self) -> "PublicIndex":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class RetrievalCounters:
    """What ``/metrics`` reads of a retriever: searches, queries, and seconds from query arrival
    to top-k ready. Plain adds under the GIL: metrics, not accounting."""

    def __init__(self) -> None:
        self._counts = {"retrieval_searches": 0, "retrieval_queries": 0, "retrieval_seconds": 0.0}

    def count(self, queries: int, seconds: float) -> None:
        c = self._counts
        c["retrieval_searches"] += 1
        c["retrieval_queries"] += queries
        c["retrieval_seconds"] += seconds

    def snapshot(self) -> dict:
        return dict(self._counts)


@dataclass
class OpenedQuery:
    """A query embedded and opened on the lookahead searcher (its clusters being copied), from
    its arrival (``arrived``, perf_counter: the retrieval time counted runs from there)."""

    lookahead: object  # dragon_vllm.corpus.lookahead.Lookahead
    arrived: float


def canonical_order(ids: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """Rank order of scored passages: score descending, then id ascending (one rule for the real
    retrieval and the speculation from the cache)."""
    return np.lexsort((np.asarray(ids), -np.asarray(scores)))


def canonical_hits(index, queries: np.ndarray, ids: np.ndarray) -> list[list[tuple[int, float]]]:
    """Per query row, the ids a faiss search found (-1: none) as ``(id, R)``, re-scored with
    ``index.score_vectors`` over ``index.vectors`` and in ``canonical_order``: the bits and the
    order a speculation from cached vectors reproduces, whatever path faiss's scan took."""
    out = []
    for q, row in zip(queries, ids):
        found = np.asarray([i for i in row.tolist() if i >= 0], dtype=np.int64)
        scores = index.score_vectors(q, index.vectors(found)) if found.size else np.zeros(0, np.float32)
        out.append([(int(found[j]), float(scores[j])) for j in canonical_order(found, scores)])
    return out


def _passage(pid: int, row: tuple[str, str], score: float) -> Passage:
    title, text = row
    return Passage(pid, text, score, title=title)


class _FaissSearcher:
    """The faiss index's own search (flat exact, or IVF with its nprobe)."""

    def __init__(self, index) -> None:
        self.index = index

    def search(self, q: np.ndarray, k: int):
        return self.index.search(q, k)


class _LookaheadAdapter:
    """``search(q, k)`` through a :class:`LookaheadSearcher` (open + search at once; the cloud's
    Open-time prefetch calls ``lookahead.open`` itself)."""

    def __init__(self, lookahead) -> None:
        self.lookahead = lookahead

    def search(self, q: np.ndarray, k: int):
        return self.lookahead.search_now(q, k)

    def snapshot(self) -> dict:
        return self.lookahead.snapshot()

    def close(self) -> None:
        self.lookahead.close()


def _searcher(index, info: dict, nprobe: int | None, lookahead: bool, options: dict):
    if info["kind"] == "flat":
        if lookahead:
            raise CorpusError("lookahead search needs an IVF index (build with --kind ivf-flat or ivf-pq)")
        return _FaissSearcher(index)
    import faiss

    faiss.extract_index_ivf(index).nprobe = max(1, int(nprobe if nprobe is not None else info["nprobe"]))
    if not lookahead:
        return _FaissSearcher(index)
    from dragon_vllm.corpus.lookahead import LookaheadSearcher

    return _LookaheadAdapter(LookaheadSearcher(index, **options))


# ------------------------------------------------------------------ load checks
def _check_retriever(manifest: dict, embedder: Embedder, root: Path) -> None:
    if manifest["score_function"] != embedder.score.id():
        raise CorpusRetrieverMismatch(f"{root} was built for score function {manifest['score_function']}, "
                                      f"running {embedder.score.id()}; rebuild the index")
    if manifest["retriever_fingerprint"] != embedder.fingerprint:
        raise CorpusRetrieverMismatch(f"{root} was built with retriever {manifest['retriever_fingerprint']}, "
                                      f"running {embedder.fingerprint} (other model files); rebuild the index")


def _check_file(root: Path, name: str, manifest: dict, verify: bool) -> None:
    p, want = root / name, manifest["files"].get(name, {})
    if not p.is_file():
        raise CorpusCorrupt(f"{root}: {name} is missing; rebuild the index")
    size = p.stat().st_size
    if size != want.get("bytes"):
        raise CorpusCorrupt(f"{root}: {name} has {size} bytes, the manifest says {want.get('bytes')}; rebuild")
    if verify and file_sha256(p) != want.get("sha256"):
        raise CorpusCorrupt(f"{root}: {name} checksum differs from the manifest; rebuild the index")


def _read_faiss(path: Path, manifest: dict):
    import faiss

    try:
        index = faiss.read_index(str(path))
    except RuntimeError as e:
        raise CorpusCorrupt(f"faiss cannot read {path}: {str(e).strip().splitlines()[-1]}") from e
    if index.d != manifest["dim"] or index.ntotal != manifest["passages"] or \
            index.metric_type != faiss.METRIC_INNER_PRODUCT:
        raise CorpusCorrupt(f"{path}: {index.ntotal} vectors of dim {index.d}, the manifest says "
                            f"{manifest['passages']} of dim {manifest['dim']} (inner product)")
    return index


def _open_passages(path: Path, manifest: dict) -> sqlite3.Connection:
    # immutable=1: the file never changes in place (a rebuild swaps the directory), so no locking.
    conn = sqlite3.connect(f"file:{path}?mode=ro&immutable=1", uri=True, check_same_thread=False)
    try:
        n, lo, hi = conn.execute("SELECT count(*), min(id), max(id) FROM passages").fetchone()
    except sqlite3.DatabaseError as e:
        conn.close()
        raise CorpusCorrupt(f"{path} is not a readable passage database: {e}") from e
    if (n, lo, hi) != (manifest["passages"], 0, manifest["passages"] - 1):
        conn.close()
        raise CorpusCorrupt(f"{path} holds {n} passages (ids {lo}..{hi}), the manifest says {manifest['passages']}")
    return conn
