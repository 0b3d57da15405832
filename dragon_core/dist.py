"""Next-token distributions as they travel between the two sides.

A side computes its mixture ``p^s`` as a full log-prob vector, then *canonicalises* it into a
``Dist`` before doing anything else with it: it drafts from the canonical ``Dist`` and sends the
same ``Dist`` to its peer. Both sides therefore use bit-identical distributions, and the target
``p = η^l p^l + η^r p^r`` does not depend on which side aggregates.

Two forms:

* **full** (exact mode): the whole float32 log-prob vector.
* **top-K**: the K most likely ids (int32), their log-probs rounded to float16, and the tail
  mass. **Unseen-id rule** (identical on both sides): the tail mass ``1 - Σ top-K`` is spread
  uniformly over the ``V - K`` ids not listed. If rounding makes the listed mass exceed 1, the
  listed probabilities are renormalised and the tail is 0.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from dragon_core.errors import InvalidDistribution


@dataclass(frozen=True, eq=False)
class Dist:
    """A canonical next-token distribution over a vocabulary of ``vocab_size`` ids."""

    vocab_size: int
    # full form: float32 log-probs, shape (V,); ids is None
    # top-K form: ids int32 (K,), logprobs float16 (K,), tail mass float
    logprobs: np.ndarray
    ids: np.ndarray | None = None
    tail_mass: float = 0.0
    _probs: np.ndarray | None = field(default=None, repr=False, compare=False)

    # ---------------------------------------------------------------- constructors
    @staticmethod
    def full(logprobs: np.ndarray) -> "Dist":
        """Exact form from a (possibly unnormalised) log-prob vector."""
        lp = np.asarray(logprobs, dtype=np.float64)
        if lp.ndim != 1 or lp.size == 0:
            raise InvalidDistribution(f"expected a 1-D log-prob vector, got shape {lp.shape}")
        lp = lp - _logsumexp(lp)
        return Dist(vocab_size=int(lp.size), logprobs=lp.astype(np.float32))

    @staticmethod
    def from_full_wire(logprobs: np.ndarray) -> "Dist":
        """Rebuild a full ``Dist`` received from a peer, bit for bit (no renormalisation)."""
        lp = np.asarray(logprobs, dtype=np.float32)
        if lp.ndim != 1 or lp.size == 0:
            raise InvalidDistribution(f"expected a 1-D log-prob vector, got shape {lp.shape}")
        if np.any(np.isnan(lp)) or np.any(lp > 0) or not np.any(np.isfinite(lp)):
            raise InvalidDistribution("log-probs must be <= 0, not NaN, and not all -inf")
        return Dist(vocab_size=int(lp.size), logprobs=lp)

    @staticmethod
    def top_k(logprobs: np.ndarray, k: int) -> "Dist":
        """Compressed form: the ``k`` most likely ids of a full log-prob vector."""
        lp = np.asarray(logprobs, dtype=np.float64)
        lp = lp - _logsumexp(lp)
        k = min(int(k), lp.size)
        # stable, deterministic order: by descending log-prob, ties by ascending id
        idx = np.lexsort((np.arange(lp.size), -lp))[:k].astype(np.int32)
        return Dist.from_top_k(lp.size, idx, lp[idx])

    @staticmethod
    def from_top_k(vocab_size: int, ids: np.ndarray, logprobs: np.ndarray) -> "Dist":
        """Canonicalise top-K (id, log-prob) pairs: fp16 rounding, then tail mass."""
        ids = np.asarray(ids, dtype=np.int32)
        lp16 = np.asarray(logprobs, dtype=np.float64).astype(np.float16)
        _validate_top_k(vocab_size, ids, lp16)
        listed = float(np.exp(lp16.astype(np.float64)).sum())
        tail = max(0.0, 1.0 - listed) if ids.size < vocab_size else 0.0
        return Dist(vocab_size=int(vocab_size), logprobs=lp16, ids=ids, tail_mass=tail)

    # ---------------------------------------------------------------- views
    @property
    def is_full(self) -> bool:
        return self.ids is None

    def probs(self) -> np.ndarray:
        """Dense float64 probability vector (cached), following the unseen-id rule."""
        if self._probs is not None:
            return self._probs
        if self.ids is None:
            p = np.exp(self.logprobs.astype(np.float64))
            p /= p.sum()
        else:
            listed = np.exp(self.logprobs.astype(np.float64))
            total = listed.sum()
            unseen = self.vocab_size - self.ids.size
            fill = self.tail_mass / unseen if unseen > 0 else 0.0
            p = np.full(self.vocab_size, fill, dtype=np.float64)
            p[self.ids] = listed / max(1.0, total)
        object.__setattr__(self, "_probs", p)
        return p

    def argmax(self) -> int:
        """Most likely id; ties go to the smallest id (same rule everywhere)."""
        if self.ids is None or self._probs is not None:
            return int(np.argmax(self.probs()))
        # top-K without the dense vector: the same numbers probs() would hold, compared the same way
        listed = np.exp(self.logprobs.astype(np.float64))
        listed = listed / max(1.0, listed.sum())
        unseen = self.vocab_size - self.ids.size
        fill = self.tail_mass / unseen if unseen > 0 else 0.0
        best = listed.max()
        candidates = [int(self.ids[listed == best].min())] if best >= fill else []
        if unseen > 0 and fill >= best:
            candidates.append(_smallest_missing(self.ids))
        return min(candidates)

    def nbytes(self) -> int:
        """Payload size of the distribution itself (without framing)."""
        size = self.logprobs.nbytes + 8
        return size + (self.ids.nbytes if self.ids is not None else 0)


def _smallest_missing(ids: np.ndarray) -> int:
    """The smallest non-negative integer not in ``ids`` (unique)."""
    present = np.zeros(ids.size + 1, dtype=bool)
    present[ids[ids <= ids.size]] = True
    return int(np.argmin(present))


def _validate_top_k(vocab_size: int, ids: np.ndarray, lp16: np.ndarray) -> None:
    if vocab_size <= 0:
        raise InvalidDistribution(f"vocab_size must be positive, got {vocab_size}")
    if ids.ndim != 1 or ids.shape != lp16.shape or ids.size == 0:
        raise InvalidDistribution("ids and logprobs must be 1-D, non-empty and of equal length")
    if ids.size > vocab_size:
        raise InvalidDistribution(f"{ids.size} ids for a vocabulary of {vocab_size}")
    if ids.min() < 0 or ids.max() >= vocab_size:
        raise InvalidDistribution("token id out of vocabulary range")
    if np.unique(ids).size != ids.size:
        raise InvalidDistribution("duplicate token ids")
    if not np.all(np.isfinite(lp16) | np.isneginf(lp16)) or np.any(lp16 > 0):
        raise InvalidDistribution("log-probs must be finite and <= 0")


def _logsumexp(x: np.ndarray) -> float:
    m = float(np.max(x))
    if not np.isfinite(m):
        raise InvalidDistribution("log-prob vector has no finite entry")
    return m + float(np.log(np.exp(x - m).sum()))
