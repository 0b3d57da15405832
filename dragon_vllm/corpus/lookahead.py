"""TeleRAG's lookahead retrieval over an IVF index: prefetch a query's clusters at once, search later.

    la = searcher.open(q)        # at Open: coarse quantizer now, copies of the probed clusters start
    ...                          # the link round trip, the device's retrieval, prefills
    D, I = searcher.search(la, k)  # scan the cached clusters in the store, the misses in host memory, merge

A handle pins its clusters in the cache (no other request evicts them) until its search ends or
``release(la)`` abandons it (a request cancelled between open and search): every handle ends in
exactly one of the two, and a second call is a no-op. ``open_each`` / ``search_many`` are the
same steps for several requests at once (one quantizer call, one scan), each with its own handle.

The result equals ``index.search(q, k)`` with the same nprobe, id for id and score for score
(``merge.py`` explains the tie rule). The store decides where the cache lives:
:class:`~dragon_vllm.corpus.cluster_store.CpuClusterStore` (this machine: copies into a sibling
index in host memory, so on CPU the prefetch buys nothing and costs a copy) or
:class:`~dragon_vllm.corpus.gpu_store.GpuClusterStore` (the GPU machine).
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from dragon_vllm.corpus.cluster_cache import ClusterCache
from dragon_vllm.corpus.cluster_store import PAIR_SHIFT, CpuClusterStore, HostLists, ivf_of, list_bytes
from dragon_vllm.corpus.errors import LookaheadSpent
from dragon_vllm.corpus.merge import replay

DEFAULT_BUDGET_FRACTION = 0.15  # of the lists' bytes: the issue's GPU-memory goal (<= 15%)


@dataclass
class Lookahead:
    """One request's prefetch: its queries, their probed clusters (nearest first) and the copy."""

    x: np.ndarray
    coarse: np.ndarray  # (n, nprobe) centroid scores, as faiss passes them to the list scan
    probes: np.ndarray  # (n, nprobe) list numbers
    copied: Future
    opened: float = field(default_factory=time.perf_counter)
    state: str = "open"  # open -> searching -> released, or open -> released (abandoned)


@dataclass
class RetrievalStats:
    searches: int = 0
    queries: int = 0
    seconds: float = 0.0  # open -> top-k ready, summed over searches
    tie_rows: int = 0  # queries merged by the exact replay (a tie at the k-th place across parts)


class LookaheadSearcher:
    """Search an IVF index through a cluster cache; thread-safe."""

    def __init__(self, index, *, store=None, budget_bytes: int | None = None, decay: float = 0.9,
                 nprobe: int | None = None, budget_fraction: float = DEFAULT_BUDGET_FRACTION) -> None:
        self.index, self.ivf = index, ivf_of(index)
        self.nprobe = int(nprobe or self.ivf.nprobe)
        sizes = list_bytes(index)
        budget = int(sizes.sum() * budget_fraction) if budget_bytes is None else int(budget_bytes)
        self.store = _make_store(store, index, budget)
        if hasattr(self.store, "list_cost_bytes"):  # the GPU store's pages: what it admits always fits its carve
            sizes = self.store.list_cost_bytes()
        self.cache = ClusterCache(sizes, budget, decay=decay)
        self.host = HostLists(index)
        self.stats = RetrievalStats()
        # ONE copier: copies run in plan order, so when a request's own copy is done, every cluster
        # an earlier request admitted (which this one may count as a hit) is in the store too
        self._copier = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cluster-prefetch")
        self._states = threading.Lock()  # handles' states: a pin is released exactly once

    # ------------------------------------------------------------------ the two steps
    def open(self, x: np.ndarray) -> Lookahead:
        """Assign the queries to their clusters and start copying the missing ones."""
        x = np.ascontiguousarray(np.atleast_2d(x), dtype=np.float32)
        coarse, probes = self.ivf.quantizer.search(x, self.nprobe)
        to_copy, to_drop = self.cache.plan(probes)
        return Lookahead(x, coarse, probes, self._copier.submit(self._copy, to_copy, to_drop))

    def open_each(self, x: np.ndarray) -> list[Lookahead]:
        """``open`` for several requests at once: one quantizer call, one handle (and pins) per row."""
        x = np.ascontiguousarray(np.atleast_2d(x), dtype=np.float32)
        coarse, probes = self.ivf.quantizer.search(x, self.nprobe)
        handles: list[Lookahead] = []
        try:
            for row in range(len(x)):  # a plan per request: hotness decays once per request, as with open()
                one = probes[row : row + 1]
                to_copy, to_drop = self.cache.plan(one)
                try:
                    copied = self._copier.submit(self._copy, to_copy, to_drop)
                except BaseException:  # the copier is shut down (closing): this row's pins go too
                    self.cache.release(one)
                    raise
                handles.append(Lookahead(x[row : row + 1], coarse[row : row + 1], one, copied))
        except BaseException:
            for la in handles:  # nobody will hold them: no pin may outlive this call
                self.release(la)
            raise
        return handles

    def search(self, la: Lookahead, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` (scores, ids) of the opened queries; releases the request's pins."""
        found = self.search_many([la], k)[0]
        if found is None:
            raise LookaheadSpent("this lookahead handle was searched or released already")
        return found

    def search_many(self, las: Sequence[Lookahead], k: int) -> list[tuple[np.ndarray, np.ndarray] | None]:
        """``search`` of several handles in one scan; each handle's (scores, ids), or None for a
        handle released (abandoned) or searched before: its request is gone, nothing to scan."""
        mine = self._claim(las)
        if not mine:
            return [None] * len(las)
        try:
            for la in mine:
                la.copied.result()  # normally done: the round trip since open() covers the copy
            D, I = self._search_rows(np.vstack([la.x for la in mine]), np.vstack([la.coarse for la in mine]),
                                     np.vstack([la.probes for la in mine]), k)
        finally:
            for la in mine:
                self._unpin(la)
        self._count(len(D), time.perf_counter() - min(la.opened for la in mine))
        rows = np.cumsum([0] + [len(la.x) for la in mine])
        found = {id(la): (D[a:b], I[a:b]) for la, a, b in zip(mine, rows[:-1], rows[1:])}
        return [found.get(id(la)) for la in las]

    def release(self, la: Lookahead) -> None:
        """Abandon a handle that will not be searched (its request ended first): its pins go.
        A no-op for a handle being searched (the search releases it) or released already."""
        with self._states:
            if la.state != "open":
                return
            la.state = "released"
        self.cache.release(la.probes)

    def _claim(self, las: Sequence[Lookahead]) -> list[Lookahead]:
        """The open handles among ``las``, now marked as being searched (once each)."""
        with self._states:
            mine = list({id(la): la for la in las if la.state == "open"}.values())
            for la in mine:
                la.state = "searching"
        return mine

    def _unpin(self, la: Lookahead) -> None:
        with self._states:
            la.state = "released"
        self.cache.release(la.probes)

    def _search_rows(self, x: np.ndarray, coarse: np.ndarray, probes: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Scan the queries' cached clusters in the store and the misses in host memory; merge."""
        hit = self.cache.split(probes)
        parts = [(where, part, where.scan_ids(x, part, coarse, k)) for where, part in _parts(probes, hit, self.store,
                 self.host)]
        D, I = _merge_sorted([res for _, _, res in parts], k)
        ties = np.flatnonzero(_boundary_ties(D, I, k)) if len(parts) > 1 else np.empty(0, np.int64)
        D, I = np.ascontiguousarray(D[:, :k]), np.ascontiguousarray(I[:, :k])
        if ties.size:  # rare: equal scores at the k-th place, resolved as faiss's own scan would
            self.stats.tie_rows += int(ties.size)
            D[ties], I[ties] = self._merge_exact(x[ties], coarse[ties], probes[ties],
                                                 [(where, part[ties]) for where, part, _ in parts], k)
        return D, I

    def search_now(self, x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """``open`` then ``search``: the faiss ``index.search`` interface (no time to overlap)."""
        return self.search(self.open(x), k)

    # ------------------------------------------------------------------ internals
    def _copy(self, to_copy: list[int], to_drop: list[int]) -> None:
        self.store.drop(to_drop)
        self.store.copy_in(to_copy)

    def _merge_exact(self, x, coarse, probes, parts, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Every candidate at or above each part's k-th score, replayed in faiss's scan order."""
        scanned = [where.scan(x, part_probes, coarse, k) for where, part_probes in parts]
        D = np.full((len(x), k), -np.inf, dtype=np.float32)
        I = np.full((len(x), k), -1, dtype=np.int64)
        for q in range(len(x)):
            scores = np.concatenate([p[q][0] for p in scanned])
            labels = np.concatenate([p[q][1] for p in scanned])
            lists, offsets = labels >> PAIR_SHIFT, labels & ((1 << PAIR_SHIFT) - 1)
            rank = _probe_rank(probes[q], lists)
            ids = np.array([self.ivf.invlists.get_single_id(int(c), int(o)) for c, o in zip(lists, offsets)],
                           dtype=np.int64)
            D[q], I[q] = replay(scores, ids, rank * (1 << PAIR_SHIFT) + offsets, k)
        return D, I

    def _count(self, n: int, seconds: float) -> None:
        s = self.stats  # plain adds under the GIL: these are metrics, not accounting
        s.searches += 1
        s.queries += n
        s.seconds += seconds

    def snapshot(self) -> dict:
        """Counters for /metrics and /health: retrieval time and the cache's hits and misses."""
        return {"retrieval_searches": self.stats.searches, "retrieval_queries": self.stats.queries,
                "retrieval_seconds": self.stats.seconds, "tie_rows": self.stats.tie_rows, **self.cache.snapshot()}

    def close(self) -> None:
        self._copier.shutdown(wait=True)
        if hasattr(self.store, "close"):
            self.store.close()


def _make_store(store, index, budget: int):
    """``store``: None or "cpu" (a host-memory copy), "gpu" (TeleRAG's GPU buffer, IVF-Flat),
    or a store object."""
    if store is None or store == "cpu":
        return CpuClusterStore(index)
    if store == "gpu":
        from dragon_vllm.corpus.gpu_store import GpuClusterStore

        return GpuClusterStore(index, budget)
    return store


def _parts(probes: np.ndarray, hit: np.ndarray, store, host) -> list[tuple[object, np.ndarray]]:
    """(where to scan, the probes with the other part's lists masked to -1), non-empty parts only.
    A query whose probed lists are all in one part gets faiss's own result from that part."""
    parts = []
    if hit.any():
        parts.append((store, np.where(hit, probes, -1)))
    if (~hit & (probes >= 0)).any():
        parts.append((host, np.where(hit, -1, probes)))
    return parts


def _merge_sorted(results: list[tuple[np.ndarray, np.ndarray]], k: int) -> tuple[np.ndarray, np.ndarray]:
    """The parts' top-k lists merged by (score desc, id desc), faiss's output order; k + 1 columns
    kept so the caller can see a tie at the k-th place."""
    D = np.concatenate([d for d, _ in results], axis=1)
    I = np.concatenate([i for _, i in results], axis=1)
    order = np.lexsort((-I, -D), axis=-1)[:, : k + 1]
    return np.take_along_axis(D, order, axis=1), np.take_along_axis(I, order, axis=1)


def _boundary_ties(D: np.ndarray, I: np.ndarray, k: int) -> np.ndarray:
    """Rows whose k-th and (k+1)-th merged candidates score the same: which of them faiss keeps
    depends on its scan order (``merge.py``). Without such a tie the merged top-k is faiss's:
    a part that dropped an equal-scoring candidate at its own k-th place either shows the tie
    here or supplies the whole top-k alone, exactly as the global scan would have chosen."""
    if D.shape[1] <= k:
        return np.zeros(len(D), dtype=bool)
    return (I[:, k - 1] >= 0) & (I[:, k] >= 0) & (D[:, k - 1] == D[:, k])


def _probe_rank(probes_row: np.ndarray, lists: np.ndarray) -> np.ndarray:
    """Position of each list in the query's probe order (faiss scans nearest centroid first)."""
    where = {int(c): r for r, c in enumerate(probes_row) if c >= 0}
    return np.array([where[int(c)] for c in lists], dtype=np.int64)
