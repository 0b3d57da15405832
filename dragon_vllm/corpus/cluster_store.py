"""Where cached clusters live, and how a part of a query's probed lists is scanned.

:class:`HostLists` scans the index's own inverted lists (host memory, the misses).
:class:`CpuClusterStore` is the CPU stand-in for TeleRAG's GPU cluster buffer: a second IVF
index sharing the coarse quantizer (and PQ codebooks) whose ``ArrayInvertedLists`` hold
copies of the cached lists only. Copying a list in is the "prefetch" (on the GPU machine: a
host-to-device copy on a side stream, ``gpu_store.py``); scanning it goes through faiss's own
``search_preassigned`` with the uncached lists masked out (list number -1 is skipped by faiss).
"""

from __future__ import annotations

import threading

import numpy as np

PAIR_SHIFT = 32  # faiss's store_pairs labels: list number << 32 | offset in the list


def ivf_of(index):
    import faiss

    return faiss.extract_index_ivf(index)


def list_bytes(index) -> np.ndarray:
    """Bytes of each inverted list (codes + 8-byte ids): what a copy moves."""
    ivf = ivf_of(index)
    il = ivf.invlists
    sizes = np.array([il.list_size(c) for c in range(ivf.nlist)], dtype=np.int64)
    return sizes * (ivf.code_size + 8)


def scan(ivf, x: np.ndarray, probes: np.ndarray, coarse: np.ndarray, k: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per query: every candidate of the lists ``probes`` (-1 = skip) scoring at least the
    query's k-th score (ties included: k is widened until the last score is below the k-th),
    as (scores, store_pairs labels)."""
    out: list = [None] * len(x)
    todo, kk = np.arange(len(x)), k
    while todo.size:
        D, L = _search_pairs(ivf, x[todo], probes[todo], coarse[todo], kk)
        valid = L >= 0
        # incomplete: kk results came back and the last still ties the k-th (rare: widen, rescan)
        more = valid[:, -1] & (D[:, -1] >= D[:, k - 1])
        if more.any():
            more[more] = [kk < _scanned(ivf, probes[q]) for q in todo[more]]
        for row in np.flatnonzero(~more):
            out[todo[row]] = (D[row][valid[row]], L[row][valid[row]])
        todo, kk = todo[more], kk * 2
    return out


def scan_ids(ivf, x: np.ndarray, probes: np.ndarray, coarse: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """faiss's own top-``k`` (scores, ids) over the lists ``probes`` only (-1 = skip)."""
    return _search_pairs(ivf, x, probes, coarse, k, store_pairs=False)


def _scanned(ivf, probes_row: np.ndarray) -> int:
    return sum(ivf.invlists.list_size(int(c)) for c in probes_row if c >= 0)


def _search_pairs(ivf, x: np.ndarray, probes: np.ndarray, coarse: np.ndarray, k: int, store_pairs: bool = True):
    import faiss

    n = len(x)
    D = np.empty((n, k), dtype=np.float32)
    L = np.empty((n, k), dtype=np.int64)
    x = np.ascontiguousarray(x, dtype=np.float32)
    probes = np.ascontiguousarray(probes, dtype=np.int64)
    coarse = np.ascontiguousarray(coarse, dtype=np.float32)
    params = faiss.SearchParametersIVF()
    params.nprobe = probes.shape[1]  # the width of the assignment, whatever the index's own nprobe
    # store_pairs=True: labels say where a candidate sits, which the merge needs for faiss's scan order
    ivf.search_preassigned_c(n, faiss.swig_ptr(x), k, faiss.swig_ptr(probes), faiss.swig_ptr(coarse),
                             faiss.swig_ptr(D), faiss.swig_ptr(L), store_pairs, params)
    return D, L


def split_queries_over_threads(ivf) -> None:
    """Make faiss's ``search_preassigned`` use every OpenMP thread for a batch of queries.

    Under ``parallel_mode`` 0 (the default) faiss parallelises only ``search()``, by slicing the
    queries; ``search_preassigned`` called directly then runs on ONE thread (measured on the
    H200 machine's 16 cores: 755 ms for 64 queries against 87 ms for ``search``). Mode 3 splits
    the queries over threads inside ``search_preassigned`` too. Each query is still scanned by
    one thread, in probe order, into its own heap, so the results (ties included) are the same."""
    if ivf.parallel_mode == 0:
        ivf.parallel_mode = 3


class HostLists:
    """The index's own lists in host memory: where misses are scanned."""

    def __init__(self, index) -> None:
        self.ivf = ivf_of(index)
        split_queries_over_threads(self.ivf)

    def scan(self, x, probes, coarse, k):
        return scan(self.ivf, x, probes, coarse, k)

    def scan_ids(self, x, probes, coarse, k):
        return scan_ids(self.ivf, x, probes, coarse, k)


class CpuClusterStore:
    """Copies of cached lists in a sibling IVF index (CPU stand-in for the GPU buffer)."""

    def __init__(self, index) -> None:
        self.source = ivf_of(index)
        self.ivf = _empty_sibling(self.source)
        split_queries_over_threads(self.ivf)
        self._lock = threading.Lock()  # copies are serialised; scans of pinned lists run beside them

    def copy_in(self, clusters: list[int]) -> None:
        src, dst = self.source.invlists, self.ivf.invlists
        with self._lock:
            for c in clusters:
                n = src.list_size(c)
                dst.resize(c, 0)
                if n:
                    dst.add_entries(c, n, src.get_ids(c), src.get_codes(c))  # one memcpy of codes, one of ids

    def drop(self, clusters: list[int]) -> None:
        with self._lock:
            for c in clusters:
                self.ivf.invlists.resize(c, 0)

    def scan(self, x, probes, coarse, k):
        return scan(self.ivf, x, probes, coarse, k)

    def scan_ids(self, x, probes, coarse, k):
        return scan_ids(self.ivf, x, probes, coarse, k)


def _empty_sibling(ivf):
    """A clone of ``ivf`` with empty lists: the quantizer and codebooks are cloned (small),
    the lists are not (cloning them would double the index in memory)."""
    import faiss

    empty = faiss.ArrayInvertedLists(ivf.nlist, ivf.code_size)
    orig, owned = ivf.invlists, ivf.own_invlists
    ivf.own_invlists = False  # so replace_invlists does not free the real lists
    ivf.replace_invlists(empty, False)
    try:
        sibling = faiss.clone_index(ivf)
    finally:
        ivf.replace_invlists(orig, owned)
    sibling.ntotal = 0
    return sibling
