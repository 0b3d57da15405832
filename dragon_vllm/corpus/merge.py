"""Merging the partial scans of one IVF query so the result is the one faiss's own search gives.

A plain ``IndexIVF.search`` scans the probed lists nearest-centroid first, each list in
stored order, into a k-heap (``faiss/utils/Heap.h``, ``CMin`` for inner product):

* a candidate enters only if its score is *strictly* greater than the heap's worst (so among
  equal scores at the boundary, the one scanned first is in);
* the element evicted is the worst by (score, then smaller id) (``CMin::cmp2``);
* the output is sorted by score descending, equal scores by id *descending* (faiss pops the
  worst first and fills the result from its end).

Splitting the probed lists into cached and missed and merging two top-k lists by score alone
would differ from that in ties at the k-th score. So each part returns every candidate scoring
at least its own k-th score (the part search widens k until it has them all), tagged with its
scan position (probe rank, offset in the list), and :func:`replay` runs faiss's heap rule over
them in faiss's scan order. Only candidates scoring >= the global k-th score can influence the
outcome, and every part's list holds all of those, so the result equals faiss's id for id.
"""

from __future__ import annotations

import heapq

import numpy as np


def replay(scores: np.ndarray, ids: np.ndarray, order: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top ``k`` of one query's candidates (``order``: scan position, smaller first) under
    faiss's heap rule. Returns (scores, ids) padded with (-inf, -1), as faiss pads."""
    heap: list[tuple[float, int]] = []  # (score, id): heap[0] is faiss's top (the worst)
    for j in np.argsort(order, kind="stable"):
        s, i = float(scores[j]), int(ids[j])
        if len(heap) < k:
            heapq.heappush(heap, (s, i))
        elif s > heap[0][0]:
            heapq.heapreplace(heap, (s, i))
    best = sorted(heap, reverse=True)
    out_s = np.full(k, -np.inf, dtype=np.float32)
    out_i = np.full(k, -1, dtype=np.int64)
    out_s[: len(best)] = [e[0] for e in best]
    out_i[: len(best)] = [e[1] for e in best]
    return out_s, out_i
