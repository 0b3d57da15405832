"""RaLMSpec's pure rules (dragon_core/ralmspec.py, issue 16): rollback point, speculation
accuracy, and the OS³ stride."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dragon_core.ralmspec import (GAMMA_CAP, SpeculationAccuracy, StridePolicy, expected_rate, first_mismatch,
                                  optimal_stride)


def test_first_mismatch_is_the_first_step_whose_ranked_documents_differ():
    assert first_mismatch([[1, 2], [3, 4]], [[1, 2], [3, 4]]) is None
    assert first_mismatch([[1, 2], [3, 4], [5, 6]], [[1, 2], [4, 3], [5, 6]]) == 1  # same set, other order
    assert first_mismatch([[9]], [[8]]) == 0
    with pytest.raises(ValueError):
        first_mismatch([[1]], [])


def test_accuracy_is_capped_and_forgets_after_five_rounds():
    acc = SpeculationAccuracy()
    assert acc.gamma == GAMMA_CAP
    for _ in range(5):
        acc.record(4, 4)
    assert acc.gamma == GAMMA_CAP  # 100% right, but a streak must not stretch the stride
    for _ in range(5):
        acc.record(4, 1)
    assert acc.gamma == pytest.approx(0.25)  # the five perfect rounds have left the window
    with pytest.raises(ValueError):
        acc.record(2, 3)


def test_free_verification_verifies_every_step_and_costly_verification_stretches_the_stride():
    assert optimal_stride(0.6, step_cost=1.0, verify_cost=0.0) == 1
    cheap, costly = optimal_stride(0.6, 1.0, 0.5), optimal_stride(0.6, 1.0, 20.0)
    assert cheap < costly
    # a hand check of the formula at γ = 0.5, a = 1, b = 2: s=1 -> 1/3, s=2 -> 1.5/4, s=3 -> 1.75/5
    assert expected_rate(2, 0.5, 1.0, 2.0) == pytest.approx(0.375)
    assert optimal_stride(0.5, 1.0, 2.0) == 2


@settings(max_examples=200, deadline=None)
@given(st.floats(0.0, 0.6), st.floats(0.01, 10.0), st.floats(0.0, 100.0), st.floats(0.0, 100.0))
def test_the_stride_is_the_argmax_and_grows_with_the_verification_cost(gamma, a, b1, b2):
    s = optimal_stride(gamma, a, b1)
    assert all(expected_rate(s, gamma, a, b1) >= expected_rate(t, gamma, a, b1) - 1e-12 for t in range(1, 17))
    lo, hi = sorted((b1, b2))
    assert optimal_stride(gamma, a, lo) <= optimal_stride(gamma, a, hi)


def test_stride_policy_verifies_at_once_until_it_has_measured_a_verification():
    policy = StridePolicy(max_stride=8)
    assert policy.stride == 1
    policy.note_step(0.01)
    assert policy.stride == 1  # no verification timed yet
    policy.note_verification(0.2, verified=1, right=1)
    assert policy.stride == optimal_stride(GAMMA_CAP, 0.01, 0.2, 8) > 1  # costly verification: batch


def test_stride_policy_follows_costs_and_accuracy_and_stays_within_its_cap():
    cheap = StridePolicy(max_stride=16)
    cheap.note_step(0.05)
    cheap.note_verification(0.001, 1, 1)
    assert cheap.stride == 1  # verifying costs nothing next to a step: never wait to batch
    capped = StridePolicy(max_stride=2)
    capped.note_step(0.001)
    capped.note_verification(1.0, 1, 1)
    assert capped.stride == 2
    wrong = StridePolicy(max_stride=16)
    right = StridePolicy(max_stride=16)
    for policy, hits in ((wrong, 0), (right, 4)):
        policy.note_step(0.01)
        for _ in range(5):
            policy.note_verification(0.05, 4, hits)
    assert 1 <= wrong.stride < right.stride  # speculation that fails pays less to batch


def test_stride_policy_averages_its_costs():
    policy = StridePolicy()
    policy.note_step(1.0)
    policy.note_step(2.0)
    assert policy.step_cost == pytest.approx(0.7 * 1.0 + 0.3 * 2.0)


def test_a_verification_starts_at_the_stride_or_whenever_the_verifier_is_idle():
    policy = StridePolicy(max_stride=8, when_idle=True)
    policy.note_step(0.01)
    policy.note_verification(1.0, 4, 4)  # a slow verifier: OS³ batches several
    s = policy.stride
    assert s > 1
    assert not policy.should_verify(0, 0)  # nothing to verify
    assert policy.should_verify(1, 0)  # idle: at once, whatever the stride
    assert not policy.should_verify(s - 1, 1)  # one running: wait for the stride
    assert policy.should_verify(s, 1)
    policy.when_idle = False  # the paper's synchronous rule: the stride alone
    assert not policy.should_verify(1, 0)
    assert policy.should_verify(s, 0)
