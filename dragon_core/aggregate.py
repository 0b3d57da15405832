"""Output aggregation (ALGORITHMS.md §2) and the transformed targets of §3.

Per side ``s``: ``log p^s = logsumexp_d(log_softmax(R)_d + log p_d)`` and ``log h^s = logsumexp(R)``.
Across sides: ``η^s = h^s / (h^l + h^r)`` and ``p = η^l p^l + η^r p^r`` — the same distribution
as one softmax-weighted mixture over the documents of both sides.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from dragon_core.dist import Dist
from dragon_core.messages import Sampling


def side_mixture(doc_logprobs: np.ndarray, scores: Sequence[float]) -> tuple[np.ndarray, float]:
    """Mix one side's per-document log-prob rows ``(k, V)`` by retrieval scores ``R``.

    Returns ``(log p^s, log h^s)``. Computed in log space so tiny probabilities survive.
    """
    rows = np.atleast_2d(np.asarray(doc_logprobs, dtype=np.float64))
    r = np.asarray(scores, dtype=np.float64)
    if rows.shape[0] != r.size or r.size == 0:
        raise ValueError(f"{rows.shape[0]} document rows but {r.size} scores")
    log_h = _logsumexp(r)
    log_w = r - log_h
    mixed = _logsumexp_rows(rows + log_w[:, None])
    return mixed, log_h


def log_mass(scores: Sequence[float]) -> float:
    """``log h = logsumexp(R)``: a side's retrieval mass, the only score that leaves the side."""
    return _logsumexp(np.asarray(scores, dtype=np.float64))


def cross_side_weights(log_h_local: float, log_h_remote: float) -> tuple[float, float]:
    """``(η^local, η^remote)``, computed stably from the two ``log h``."""
    m = max(log_h_local, log_h_remote)
    a, b = math.exp(log_h_local - m), math.exp(log_h_remote - m)
    return a / (a + b), b / (a + b)


def target_probs(p_a: Dist, p_b: Dist, eta_b: float) -> np.ndarray:
    """``p = (1-η_b) p_a + η_b p_b`` as a dense vector."""
    return (1.0 - eta_b) * p_a.probs() + eta_b * p_b.probs()


def transform(p: np.ndarray, sampling: Sampling) -> np.ndarray:
    """The distribution tokens are actually drawn from: one-hot argmax for greedy, else the
    renormalised top-k / top-p truncation of ``p`` (temperature is already inside ``p``)."""
    if sampling.greedy:
        out = np.zeros_like(p)
        out[int(np.argmax(p))] = 1.0
        return out
    q = p.copy()
    if sampling.top_k and sampling.top_k < q.size:
        kth = np.partition(q, -sampling.top_k)[-sampling.top_k]
        q[q < kth] = 0.0
    if sampling.top_p < 1.0:
        order = np.argsort(-q, kind="stable")
        cum = np.cumsum(q[order])
        # keep the smallest prefix whose mass reaches top_p (the token crossing it included)
        cut = int(np.searchsorted(cum, sampling.top_p * cum[-1])) + 1
        q[order[cut:]] = 0.0
    return q / q.sum()


def _logsumexp(x: np.ndarray) -> float:
    m = float(np.max(x))
    return m + math.log(float(np.exp(x - m).sum()))


def _logsumexp_rows(x: np.ndarray) -> np.ndarray:
    m = np.max(x, axis=0)
    m_safe = np.where(np.isfinite(m), m, 0.0)
    with np.errstate(divide="ignore"):
        return m_safe + np.log(np.exp(x - m_safe).sum(axis=0))


def canonical_side_dist(doc_logprobs: np.ndarray, scores: Sequence[float], top_k: int = 0) -> Dist:
    """The ``Dist`` a side drafts from and sends: its mixture, full or top-K (see dist.py)."""
    mixed, _ = side_mixture(doc_logprobs, scores)
    return Dist.top_k(mixed, top_k) if top_k else Dist.full(mixed)
