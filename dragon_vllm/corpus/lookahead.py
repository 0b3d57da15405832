"""TeleRAG's lookahead retrieval over an IVF index: prefetch a query's clusters at once, search later.

    la = searcher.open(q)        # at Open: coarse quantizer now, copies of the probed clusters start
    ...                          # the link round trip, the device's retrieval, prefills
    D, I = searcher.search(la, k)  # scan the cached clusters in the store, the misses in host memory, merge

The result equals ``index.search(q, k)`` with the same nprobe, id for id and score for score
(``merge.py`` explains the tie rule). The store decides where the cache lives:
:class:`~dragon_vllm.corpus.cluster_store.CpuClusterStore` (this machine: copies into a sibling
index in host memory, so on CPU the prefetch buys nothing and costs a copy) or
:class:`~dragon_vllm.corpus.gpu_store.GpuClusterStore` (the GPU machine).
"""

from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from dragon_vllm.corpus.cluster_cache import ClusterCache
from dragon_vllm.corpus.cluster_store import PAIR_SHIFT, CpuClusterStore, HostLists, ivf_of, list_bytes
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


@dataclass
class RetrievalStats:
    searches: int = 0
    queries: int = 0
    seconds: float = 0.0  # open -> top-k ready, summed over searches


class LookaheadSearcher:
    """Search an IVF index through a cluster cache; thread-safe."""

    def __init__(self, index, *, store=None, budget_bytes: int | None = None, decay: float = 0.9,
                 nprobe: int | None = None) -> None:
        self.index, self.ivf = index, ivf_of(index)
        self.nprobe = int(nprobe or self.ivf.nprobe)
        sizes = list_bytes(index)
        budget = int(sizes.sum() * DEFAULT_BUDGET_FRACTION) if budget_bytes is None else int(budget_bytes)
        self.cache = ClusterCache(sizes, budget, decay=decay)
        self.store = store if store is not None else CpuClusterStore(index)
        self.host = HostLists(index)
        self.stats = RetrievalStats()
        # ONE copier: copies run in plan order, so when a request's own copy is done, every cluster
        # an earlier request admitted (which this one may count as a hit) is in the store too
        self._copier = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cluster-prefetch")

    # ------------------------------------------------------------------ the two steps
    def open(self, x: np.ndarray) -> Lookahead:
        """Assign the queries to their clusters and start copying the missing ones."""
        x = np.ascontiguousarray(np.atleast_2d(x), dtype=np.float32)
        coarse, probes = self.ivf.quantizer.search(x, self.nprobe)
        to_copy, to_drop = self.cache.plan(probes)
        return Lookahead(x, coarse, probes, self._copier.submit(self._copy, to_copy, to_drop))

    def search(self, la: Lookahead, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` (scores, ids) of the opened queries; releases the request's pins."""
        try:
            la.copied.result()  # normally done: the round trip since open() covers the copy
            hit = self.cache.split(la.probes)
            parts = []
            if hit.any():
                parts.append(self.store.scan(la.x, np.where(hit, la.probes, -1), la.coarse, k))
            if (~hit & (la.probes >= 0)).any():
                parts.append(self.host.scan(la.x, np.where(hit, -1, la.probes), la.coarse, k))
            D, I = self._merge(la.probes, parts, k)
        finally:
            self.cache.release(la.probes)
        self._count(len(la.x), time.perf_counter() - la.opened)
        return D, I

    def search_now(self, x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """``open`` then ``search``: the faiss ``index.search`` interface (no time to overlap)."""
        return self.search(self.open(x), k)

    # ------------------------------------------------------------------ internals
    def _copy(self, to_copy: list[int], to_drop: list[int]) -> None:
        self.store.drop(to_drop)
        self.store.copy_in(to_copy)

    def _merge(self, probes: np.ndarray, parts: list, k: int) -> tuple[np.ndarray, np.ndarray]:
        n = len(probes)
        D = np.full((n, k), -np.inf, dtype=np.float32)
        I = np.full((n, k), -1, dtype=np.int64)
        for q in range(n):
            scores = np.concatenate([p[q][0] for p in parts]) if parts else np.empty(0, np.float32)
            labels = np.concatenate([p[q][1] for p in parts]) if parts else np.empty(0, np.int64)
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
                "retrieval_seconds": self.stats.seconds, **self.cache.snapshot()}

    def close(self) -> None:
        self._copier.shutdown(wait=True)


def _probe_rank(probes_row: np.ndarray, lists: np.ndarray) -> np.ndarray:
    """Position of each list in the query's probe order (faiss scans nearest centroid first)."""
    where = {int(c): r for r, c in enumerate(probes_row) if c >= 0}
    return np.array([where[int(c)] for c in lists], dtype=np.int64)
