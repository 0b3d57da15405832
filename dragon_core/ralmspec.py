"""RaLMSpec's rules for speculative iterative retrieval (issue 16; docs/RALMSPEC.md), pure.

Iterative RAG re-retrieves every ``n`` generated tokens with the question + the text so far as the
query. RaLMSpec keeps decoding on documents retrieved *speculatively* from a per-request cache
(the top-20 of each real retrieval, scored with the same function), and verifies ``s``
speculative retrievals with one batched real retrieval; at the first step whose speculative
documents differ from the real ones it rolls back, so the output equals the non-speculative
system's. This module holds the rules the hosts (``dragon_host.documents``) and the simulator need:

* ``first_mismatch``: where a verified batch goes wrong (the rollback point);
* ``SpeculationAccuracy``: γ, the share of speculative retrievals that were right over the last
  five verification rounds, capped at 0.6 (a lucky streak must not stretch the stride);
* ``optimal_stride`` (OS³): the stride ``s`` maximising the expected verified steps per unit of
  time, ``(1 − γ^s) / ((1 − γ)(s·a + b))``, with ``a`` one decoding + cache-retrieval step and
  ``b`` one verification (a batched real retrieval);
* ``StridePolicy``: OS³ fed with one request's measured costs and accuracy, and when to start a
  verification (``should_verify``).

OS³'s rate assumes each verification stalls the decoding (``s·a + b``). ``when_idle`` (off by
default) also starts a verification whenever none is running, on the idea that a verifier on
cores the decoding does not use costs nothing while idle. Measured, it does not pay: on the H200
(decoding on the GPU, searches on CPU cores; ``benchmarks/results/iterative_h200_vllm_verify.json``)
OS³'s stride alone was faster on 4 of 5 questions (3.80 s vs 4.08 s in all, 15 verifications
against 35), and on 2 CPU cores the two were even. The stride stays the rule.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Sequence

GAMMA_CAP = 0.6  # RaLMSpec's cap on the estimated speculation accuracy
WINDOW = 5  # verification rounds the accuracy is estimated over
MAX_STRIDE = 16


def first_mismatch(speculated: Sequence[Sequence[int]], real: Sequence[Sequence[int]]) -> int | None:
    """The first retrieval step whose speculative top-k (ids, in rank order) differs from the
    real one, or None when the whole batch was right. Order matters: the mixture weights follow
    the ranks' scores, so the same set in another order is another distribution."""
    if len(speculated) != len(real):
        raise ValueError(f"{len(speculated)} speculative steps but {len(real)} verified")
    for step, (s, r) in enumerate(zip(speculated, real)):
        if list(s) != list(r):
            return step
    return None


@dataclass
class SpeculationAccuracy:
    """γ over the last ``WINDOW`` verification rounds (right steps ÷ verified steps), capped."""

    rounds: deque = field(default_factory=lambda: deque(maxlen=WINDOW))

    def record(self, verified: int, right: int) -> None:
        if not 0 <= right <= verified:
            raise ValueError(f"{right} right of {verified} verified")
        if verified:
            self.rounds.append((verified, right))

    @property
    def gamma(self) -> float:
        verified = sum(v for v, _ in self.rounds)
        if not verified:
            return GAMMA_CAP  # nothing seen yet: the cap is RaLMSpec's starting guess
        return min(GAMMA_CAP, sum(r for _, r in self.rounds) / verified)


def expected_rate(stride: int, gamma: float, step_cost: float, verify_cost: float) -> float:
    """Verified steps per unit of time at stride ``s``: ``(1 − γ^s) / ((1 − γ)(s·a + b))``
    (``s`` when γ = 1 would be exact; γ is capped below 1)."""
    if stride < 1:
        raise ValueError("the stride is at least 1")
    accepted = stride if gamma >= 1 else (1 - gamma ** stride) / (1 - gamma)
    return accepted / (stride * step_cost + verify_cost)


def optimal_stride(gamma: float, step_cost: float, verify_cost: float, max_stride: int = MAX_STRIDE) -> int:
    """OS³: the stride in ``1..max_stride`` with the highest expected rate (the smallest on ties)."""
    if step_cost <= 0 or verify_cost < 0:
        raise ValueError("costs must be positive (verification may be free)")
    return max(range(1, max_stride + 1), key=lambda s: (expected_rate(s, gamma, step_cost, verify_cost), -s))


EWMA_ALPHA = 0.3  # weight of the newest cost sample


@dataclass
class StridePolicy:
    """OS³ on measured costs, for one request: the stride ``s`` (speculated retrievals verified by
    one batched real retrieval) from γ (``SpeculationAccuracy``) and running averages of ``a``
    (one step: decoding plus the cache's retrieval) and ``b`` (one batched verification). Until
    a verification has been timed the stride is 1: each speculation is verified at once, as
    without OS³. ``max_stride``: the most that can be pending (the draft window's boundaries;
    the host verifies early whenever the session cannot go on without a verdict). The host
    measures, this only averages (no clock here)."""

    max_stride: int = MAX_STRIDE
    when_idle: bool = False
    accuracy: SpeculationAccuracy = field(default_factory=SpeculationAccuracy)
    step_cost: float | None = None
    verify_cost: float | None = None

    def note_step(self, seconds: float) -> None:
        self.step_cost = _ewma(self.step_cost, seconds)

    def note_verification(self, seconds: float, verified: int, right: int) -> None:
        self.verify_cost = _ewma(self.verify_cost, seconds)
        self.accuracy.record(verified, right)

    def should_verify(self, pending: int, running: int) -> bool:
        """Whether to start a batched verification of the ``pending`` speculations now, with
        ``running`` verifications in flight: at the OS³ stride, or at once when the verifier is
        idle (``when_idle``)."""
        return pending > 0 and (pending >= self.stride or (self.when_idle and running == 0))

    @property
    def stride(self) -> int:
        if self.verify_cost is None or not self.step_cost:
            return 1
        return optimal_stride(self.accuracy.gamma, self.step_cost, self.verify_cost, max(1, self.max_stride))


def _ewma(old: float | None, sample: float) -> float:
    return sample if old is None else (1 - EWMA_ALPHA) * old + EWMA_ALPHA * sample
