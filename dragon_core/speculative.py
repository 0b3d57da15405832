"""Speculative Aggregation (docs/ALGORITHMS.md §3, DRAGON's Algorithm 1), exact by construction.

Each side drafts from ``q^s = transform(p^s)``; the aggregator runs standard speculative sampling
of each draft against the transformed target ``q = transform(η^l p^l + η^r p^r)`` and keeps one
of the two verified tokens by a fair coin. Every verified token is an exact sample of ``q``, so
the committed token is too (Theorem 1). With the mixture target and untransformed drafts this is
exactly Algorithm 1 (``1 - q/p^s = η^other (1 - p^other/p^s)``); for greedy the target is one-hot
and the result is the argmax of the mixture even when it is neither side's top token.

All randomness comes from ``step_rng(seed, purpose, step, epoch)``, so a decision can be replayed.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from dragon_core.aggregate import target_probs, transform
from dragon_core.dist import Dist
from dragon_core.messages import Sampling

# purposes of the per-step random streams
DRAFT_DEVICE, DRAFT_CLOUD, VERIFY = 0, 1, 2


def step_rng(seed: int, purpose: int, step: int, epoch: int = 0) -> np.random.Generator:
    """A reproducible generator for one decision (independent across purposes/steps/epochs)."""
    return np.random.default_rng([seed & 0xFFFFFFFFFFFF, purpose, step, epoch])


def sample_from(q: np.ndarray, rng: np.random.Generator) -> int:
    """Inverse-CDF draw from a probability vector; zero-probability ids are never drawn."""
    cdf = np.cumsum(q)
    return min(int(np.searchsorted(cdf, rng.random() * cdf[-1], side="right")), q.size - 1)


def draft(p: Dist, sampling: Sampling, rng: np.random.Generator) -> int:
    """A side's draft token: argmax (greedy) or a draw from ``transform(p)``."""
    if sampling.greedy:
        return p.argmax()
    return sample_from(transform(p.probs(), sampling), rng)


def speculative_sample(x: int, q_draft: np.ndarray, q_target: np.ndarray, rng: np.random.Generator) -> int:
    """Keep ``x ~ q_draft`` with probability ``min(1, q_target/q_draft)``, else draw from the
    residual ``norm(max(0, q_target - q_draft))``. The result is an exact sample of ``q_target``."""
    u = rng.random()
    if q_draft[x] > 0 and u * q_draft[x] < q_target[x]:
        return x
    residual = np.maximum(q_target - q_draft, 0.0)
    if residual.sum() <= 0.0:  # q_target == q_draft up to rounding: the draft stands
        return x
    return sample_from(residual, rng)


@dataclass(frozen=True)
class Verdict:
    token: int
    accept_local: bool
    accept_remote: bool


def verify(
    x_local: int,
    p_local: Dist,
    x_remote: int,
    p_remote: Dist,
    eta_remote: float,
    sampling: Sampling,
    rng: np.random.Generator,
) -> Verdict:
    """Algorithm 1 on the aggregating side, for one step."""
    q = transform(target_probs(p_local, p_remote, eta_remote), sampling)
    v_local = speculative_sample(x_local, transform(p_local.probs(), sampling), q, rng)
    v_remote = speculative_sample(x_remote, transform(p_remote.probs(), sampling), q, rng)
    token = v_local if rng.random() < 0.5 else v_remote
    return Verdict(token, x_local == token, x_remote == token)


def synchronous_target(p_local: Dist, p_remote: Dist, eta_remote: float, sampling: Sampling,
                       rng: np.random.Generator) -> int:
    """VDRAG (token-wise synchronisation): draw the target directly, no drafts to test."""
    return sample_from(transform(target_probs(p_local, p_remote, eta_remote), sampling), rng)
