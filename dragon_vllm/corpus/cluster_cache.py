"""Which IVF lists (clusters) live in the fast buffer: a hotness-decayed cache with a byte budget.

TeleRAG keeps the inverted lists in host memory and copies the clusters a query will probe
into a fixed GPU buffer ahead of the search. Across requests the buffer should hold the
clusters that are probed often *lately*: every request multiplies every hotness by ``decay``
and adds 1 to the clusters it probes, so a cluster's hotness is an exponentially weighted count
of recent probes. When a needed cluster does not fit, the coldest residents that are not
pinned by a request in flight make room, but only if they are colder than the newcomer (a
one-off query must not flush a hot working set).

This class only decides; the copies are done by a cluster store (``lookahead.py``). It is
thread-safe: requests open and search from several threads.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

import numpy as np


@dataclass
class CacheStats:
    """Cumulative counts; the hit rate over an interval is d(hits) / (d(hits) + d(misses))."""

    hits: int = 0  # probed clusters found resident at search time
    misses: int = 0  # probed clusters scanned from host memory instead
    admitted: int = 0  # clusters copied in
    evicted: int = 0
    rejected: int = 0  # needed but not admitted (budget full of hotter or pinned clusters)

    def hit_rate(self) -> float:
        total = self.hits + self.misses
        return self.hits / total if total else 0.0


@dataclass
class ClusterCache:
    """Residency decisions for ``nlist`` clusters of ``sizes[c]`` bytes under ``budget_bytes``."""

    sizes: np.ndarray  # bytes of each cluster (codes + ids)
    budget_bytes: int
    decay: float = 0.9  # per request: hotness halves in ~6.6 requests
    stats: CacheStats = field(default_factory=CacheStats)

    def __post_init__(self) -> None:
        if not 0.0 < self.decay <= 1.0:
            raise ValueError(f"decay must be in (0, 1], got {self.decay}")
        nlist = len(self.sizes)
        self.sizes = np.asarray(self.sizes, dtype=np.int64)
        self.hotness = np.zeros(nlist, dtype=np.float64)
        self.resident = np.zeros(nlist, dtype=bool)
        self.pins = np.zeros(nlist, dtype=np.int32)
        self.used_bytes = 0
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ requests
    def plan(self, probes: np.ndarray) -> tuple[list[int], list[int]]:
        """One request's probed clusters (nearest first): update hotness, pin the residents and
        the admitted, return (to_copy, to_drop) for the store. The caller copies ``to_copy``
        and must :meth:`release` the same ``probes`` after its search."""
        wanted = list(dict.fromkeys(int(c) for c in np.asarray(probes).ravel() if c >= 0))
        with self._lock:
            self.hotness *= self.decay
            self.hotness[wanted] += 1.0
            self.pins[wanted] += 1  # first: this request's own clusters are never its victims
            to_copy, to_drop = [], []
            victims = _Victims(self)
            for c in wanted:  # nearest first: under a tight budget the likeliest hits win
                if not self.resident[c] and self._make_room(c, to_drop, victims):
                    self.resident[c] = True
                    self.used_bytes += int(self.sizes[c])
                    to_copy.append(c)
            self.stats.admitted += len(to_copy)
            self.stats.evicted += len(to_drop)
        return to_copy, to_drop

    def split(self, probes: np.ndarray) -> np.ndarray:
        """Which of ``probes`` are resident now (a boolean mask of its shape); counts hits/misses."""
        probes = np.asarray(probes)
        with self._lock:
            mask = (probes >= 0) & self.resident[np.maximum(probes, 0)]
            self.stats.hits += int(mask.sum())
            self.stats.misses += int(((probes >= 0) & ~mask).sum())
        return mask

    def release(self, probes: np.ndarray) -> None:
        wanted = list(dict.fromkeys(int(c) for c in np.asarray(probes).ravel() if c >= 0))
        with self._lock:
            self.pins[wanted] -= 1

    # ------------------------------------------------------------------ eviction
    def _make_room(self, c: int, to_drop: list[int], victims: "_Victims") -> bool:
        need = int(self.sizes[c])
        if need > self.budget_bytes:
            self.stats.rejected += 1
            return False
        while self.used_bytes + need > self.budget_bytes:
            victim = victims.peek()
            if victim is None or self.hotness[victim] >= self.hotness[c]:
                self.stats.rejected += 1
                return False
            victims.take()
            self.resident[victim] = False
            self.used_bytes -= int(self.sizes[victim])
            to_drop.append(victim)
        return True

    def snapshot(self) -> dict:
        with self._lock:
            return {"resident_clusters": int(self.resident.sum()), "used_bytes": int(self.used_bytes),
                    "budget_bytes": int(self.budget_bytes), "hit_rate": self.stats.hit_rate(),
                    **vars(self.stats)}


class _Victims:
    """The unpinned residents of one plan, coldest first (the lowest list number among equals),
    sorted once when the first eviction needs them: a plan evicts up to nprobe lists, and a scan
    of every list per eviction cost more than the rest of the plan. Within one plan the order
    cannot change: hotness was updated before, and the lists it admits are pinned by it."""

    def __init__(self, cache: ClusterCache) -> None:
        self._cache, self._order, self._next = cache, None, 0

    def peek(self) -> int | None:
        if self._order is None:
            c = self._cache
            candidates = np.flatnonzero(c.resident & (c.pins == 0))
            self._order = candidates[np.argsort(c.hotness[candidates], kind="stable")]
        return int(self._order[self._next]) if self._next < len(self._order) else None

    def take(self) -> None:
        self._next += 1
