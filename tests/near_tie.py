"""The rule for comparing two greedy answers from vLLM CPU in bf16, written once.

vLLM's CPU bf16 logits are not batch-invariant: the same request decoded alone and among other
requests can see its logits rounded differently (measured up to ~0.06 nats), so greedy decoding
may take the other of two nearly tied tokens. A divergence is therefore accepted only at a step
where the reference's own distribution puts the two tokens within ``NEAR_TIE`` nats; everything
before it must be equal, and wherever the reference is decisive the tokens must be equal.
"""

from __future__ import annotations

from typing import Callable, Sequence

NEAR_TIE = 0.15


def first_divergence(ids: Sequence[int], ref: Sequence[int]) -> int | None:
    """The first step where the answers differ (None: equal)."""
    if list(ids) == list(ref):
        return None
    return next((i for i, (a, b) in enumerate(zip(ids, ref)) if a != b), min(len(ids), len(ref)))


def assert_equal_up_to_a_near_tie(ids: Sequence[int], ref: Sequence[int], logprob_gap: Callable[[int, int, int], float],
                                  what: str) -> None:
    """``logprob_gap(k, a, b)``: |log p(a) - log p(b)| in the reference's distribution after ``ref[:k]``."""
    k = first_divergence(ids, ref)
    if k is None:
        return
    assert k < min(len(ids), len(ref)), f"{what}: one answer is a prefix of the other ({len(ids)} vs {len(ref)} tokens)"
    gap = logprob_gap(k, ids[k], ref[k])
    assert gap < NEAR_TIE, f"{what} diverged at step {k} ({ids[k]} vs {ref[k]}) where the reference is decisive " \
                           f"(log-prob gap {gap:.4f})"
