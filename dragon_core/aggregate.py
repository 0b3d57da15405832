"""Output aggregation (docs/ALGORITHMS.md §2) and the transformed targets of §3.

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


def canonical_side_dist(doc_dists: Sequence[Dist], scores: Sequence[float], top_k: int = 0) -> Dist:
    """The ``Dist`` a side drafts from and sends: the mixture of its per-document
    distributions, full or top-K (see dist.py).

    When every document's distribution is itself top-K (vLLM's logprobs) and the result is
    top-K, the mixture is computed on the union of the listed ids only: an id no document
    lists has the same probability ``Σ w_d · fill_d`` everywhere, so one number stands for
    the other ~49k. Same values as the dense path up to float64 rounding, in ~1/50 of the time;
    the rule depends only on the inputs, so every caller (driver, centralized reference) that
    gets the same distributions gets the same ``Dist``.

    A single top-K distribution of at most ``top_k`` ids (the mixture a vLLM gang reports,
    already in canonical form) is returned as it is: listing unlisted ids at the tail's even
    share would describe the same law.
    """
    if top_k and len(doc_dists) == 1 and doc_dists[0].ids is not None and doc_dists[0].ids.size <= top_k:
        return doc_dists[0]  # one canonical top-K distribution (an engine's own mixture) is its own form
    if top_k and all(d.ids is not None for d in doc_dists):
        return _sparse_top_k(doc_dists, scores, top_k)
    mixed, _ = side_mixture(stack_logprobs(doc_dists), scores)
    return Dist.top_k(mixed, top_k) if top_k else Dist.full(mixed)


def stack_logprobs(dists: Sequence[Dist]) -> np.ndarray:
    """(k, V) float64 log-prob matrix of per-document distributions (dense)."""
    with np.errstate(divide="ignore"):
        return np.log(np.stack([d.probs() for d in dists]))


def _sparse_top_k(doc_dists: Sequence[Dist], scores: Sequence[float], top_k: int) -> Dist:
    vocab = doc_dists[0].vocab_size
    if any(d.vocab_size != vocab for d in doc_dists) or len(doc_dists) != len(scores) or not doc_dists:
        raise ValueError(f"{len(doc_dists)} document distributions, {len(scores)} scores, or mixed vocabularies")
    r = np.asarray(scores, dtype=np.float64)
    w = np.exp(r - _logsumexp(r))
    union = np.unique(np.concatenate([d.ids for d in doc_dists]))
    mixed = np.zeros(union.size)
    outside = 0.0  # probability of any id that no document lists
    for wd, d in zip(w, doc_dists):
        listed = np.exp(d.logprobs.astype(np.float64))
        unseen = vocab - d.ids.size
        fill = d.tail_mass / unseen if unseen > 0 else 0.0
        row = np.full(union.size, fill)
        row[np.searchsorted(union, d.ids)] = listed / max(1.0, listed.sum())
        mixed += wd * row
        outside += wd * fill
    # candidates: the union plus the smallest unlisted ids (ties go to the smallest id, as in
    # Dist.top_k), enough to fill top_k whatever ``outside`` is
    n_out = min(top_k, vocab - union.size)
    extra = _smallest_ids_not_in(union, n_out)
    ids = np.concatenate([union, extra])
    probs = np.concatenate([mixed, np.full(extra.size, outside)])
    total = mixed.sum() + outside * (vocab - union.size)
    with np.errstate(divide="ignore"):
        lp = np.log(probs) - math.log(total)
    order = np.lexsort((ids, -lp))[:min(top_k, vocab)]
    return Dist.from_top_k(vocab, ids[order], lp[order])


def _smallest_ids_not_in(sorted_ids: np.ndarray, n: int) -> np.ndarray:
    """The ``n`` smallest non-negative integers missing from ``sorted_ids`` (sorted, unique)."""
    candidates = np.arange(sorted_ids.size + n, dtype=sorted_ids.dtype)
    return candidates[~np.isin(candidates, sorted_ids)][:n]
