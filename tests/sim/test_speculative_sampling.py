"""Speculative Aggregation samples the target law: goodness of fit over 1e5 draws per case
(moved from tests/core/test_speculative.py: tens of seconds, the core layer takes seconds)."""

from __future__ import annotations

import zlib

import numpy as np
import pytest
from scipy import stats

from dragon_core.aggregate import target_probs, transform
from dragon_core.dist import Dist
from dragon_core.messages import Sampling
from dragon_core.speculative import draft, verify
from fakes import random_logprobs


# ------------------------------------------------------------------ sampling: goodness of fit
N_DRAWS = 100_000
ALPHA = 1e-3


def _power_for_tv(v: int, n: int, tv: float) -> float:
    """Power of the χ² test against any alternative at total-variation distance ``tv``:
    χ²-divergence >= (2·tv)², so the noncentrality is at least n·4·tv²."""
    crit = stats.chi2.ppf(1 - ALPHA, v - 1)
    return float(stats.ncx2.sf(crit, v - 1, n * 4 * tv * tv))


@pytest.mark.parametrize(
    "sampling",
    [Sampling(greedy=False), Sampling(greedy=False, top_k=4), Sampling(greedy=False, top_p=0.7)],
    ids=["plain", "top_k=4", "top_p=0.7"],
)
def test_sampling_reproduces_the_target_distribution(sampling):
    """Goodness of fit over 1e5 draws per case. Test size α = 1e-3 per case; power >= 0.99
    against any deviation of total variation >= 0.015 (computed below, asserted)."""
    v = 10
    assert _power_for_tv(v, N_DRAWS, 0.015) >= 0.99
    rng = np.random.default_rng(zlib.crc32(repr(sampling).encode()))
    p_l = Dist.full(random_logprobs(rng, v, 1.0))
    p_r = Dist.full(random_logprobs(rng, v, 1.0))
    eta_r = 0.35
    q = transform(target_probs(p_l, p_r, eta_r), sampling)
    counts = np.zeros(v)
    accepted = 0
    for _ in range(N_DRAWS):
        x_l, x_r = draft(p_l, sampling, rng), draft(p_r, sampling, rng)
        res = verify(x_l, p_l, x_r, p_r, eta_r, sampling, rng)
        counts[res.token] += 1
        accepted += res.accept_local
    support = q > 0
    assert counts[~support].sum() == 0, "drew a token outside the target's support"
    chi2, pval = stats.chisquare(counts[support], q[support] * N_DRAWS)
    assert pval > ALPHA, f"χ²={chi2:.1f}, p={pval:.2e}"
    assert 0 < accepted < N_DRAWS  # both accept and reject paths ran
