"""Greedy Scheduling's ΔZ rule (docs/ALGORITHMS.md §4)."""

from __future__ import annotations

import numpy as np
import pytest

from dragon_core.messages import SchedulerPrior
from dragon_core.scheduler import Ewma, GreedyScheduler, SchedulerConfig, delta_z, initial_aggregator, steady_wait


def test_four_case_formula_equals_difference_of_steady_state_waits():
    rng = np.random.default_rng(0)
    seen_cases = set()
    for _ in range(20_000):
        c_l, c_r = rng.uniform(0, 500, 2)
        rtt = rng.uniform(0, 400)
        a_l, a_r = rng.uniform(0, 1, 2)
        want = steady_wait(c_l, c_r, rtt, a_r) - steady_wait(c_r, c_l, rtt, a_l)
        assert delta_z(c_l, c_r, rtt, a_l, a_r) == pytest.approx(want, abs=1e-9)
        j = c_r - c_l
        seen_cases.add((j >= rtt) * 3 or (j >= 0) * 2 or (j >= -rtt) * 1)
    assert seen_cases == {0, 1, 2, 3}  # all four branches were checked


@pytest.mark.parametrize(
    "c_l, c_r, rtt, a_l, a_r, move",
    [
        (10, 400, 100, 0.9, 0.8, True),  # remote slower by more than an RTT -> move there
        (400, 10, 100, 0.8, 0.9, False),  # we are the slow side -> stay
        (10, 20, 100, 0.95, 0.6, True),  # within an RTT: the remote's drafts fail more -> move
        (10, 20, 100, 0.6, 0.95, False),  # within an RTT: our drafts fail more -> stay
    ],
)
def test_rule_in_words(c_l, c_r, rtt, a_l, a_r, move):
    assert (delta_z(c_l, c_r, rtt, a_l, a_r) > 0) is move


def test_hysteresis_needs_margin_dwell_and_samples():
    sched = GreedyScheduler(SchedulerConfig(margin_ms=5.0, margin_frac=0.0, min_dwell_steps=3, min_samples=2))
    est = sched.estimates
    assert not sched.should_hand_over("device")  # no estimates yet
    for _ in range(2):
        est.c_local.update(10)
        est.c_remote.update(400)
        est.rtt.update(100)
        est.alpha_local.update(1.0)
        est.alpha_remote.update(0.0)
    assert sched.should_hand_over("device")  # the first move needs no dwell, only ready estimates
    sched.on_moved()
    assert not sched.should_hand_over("device")  # after a move: dwell not reached
    for _ in range(2):
        sched.on_target()
    assert not sched.should_hand_over("device")
    sched.on_target()
    assert sched.should_hand_over("device")
    # a ΔZ below the margin does not move
    quiet = GreedyScheduler(SchedulerConfig(margin_ms=50.0, margin_frac=0.0, min_dwell_steps=0, min_samples=1))
    quiet.estimates.c_local.update(10)
    quiet.estimates.c_remote.update(400)
    quiet.estimates.rtt.update(100)
    quiet.estimates.alpha_remote.update(0.9)  # ΔZ = 0.1 * 100 = 10 ms < 50
    assert not quiet.should_hand_over("device")


def test_ewma():
    e = Ewma(weight=0.5)
    e.update(10)
    e.update(20)
    assert e.value == 15 and e.count == 2


def _seeded(prior: SchedulerPrior, side: str) -> GreedyScheduler:
    sched = GreedyScheduler()
    sched.estimates.seed(prior, side, sched.config.min_samples)
    return sched


def test_ties_go_to_the_device_with_a_band_against_ping_pong():
    # slow device, its drafts always accepted: ΔZ = (1 - α_device) rtt = 0 either way
    tie = SchedulerPrior(device_ms=300, cloud_ms=30, rtt_ms=100, alpha_device=1.0, alpha_cloud=0.6)
    assert _seeded(tie, "cloud").should_hand_over("cloud")  # the cloud hands a tie back ...
    assert not _seeded(tie, "device").should_hand_over("device")  # ... the device keeps it
    # a clear win for the cloud (slow cloud, rejected cloud drafts) is not handed back
    slow_cloud = SchedulerPrior(device_ms=20, cloud_ms=300, rtt_ms=100, alpha_device=1.0, alpha_cloud=0.6)
    assert _seeded(slow_cloud, "device").should_hand_over("device")
    assert not _seeded(slow_cloud, "cloud").should_hand_over("cloud")
    # inside the band (0 < ΔZ_device <= margin) neither side moves
    band = SchedulerPrior(device_ms=20, cloud_ms=300, rtt_ms=100, alpha_device=1.0, alpha_cloud=0.99)
    assert not _seeded(band, "device").should_hand_over("device")  # ΔZ = 1 ms < 5% of Z
    assert not _seeded(band, "cloud").should_hand_over("cloud")


def test_prior_round_trips_between_sides_and_picks_the_start():
    prior = SchedulerPrior(device_ms=20, cloud_ms=300, rtt_ms=100, alpha_device=1.0, alpha_cloud=0.6)
    for side in ("device", "cloud"):
        assert _seeded(prior, side).estimates.prior(side) == prior
    assert GreedyScheduler().estimates.prior("device") is None  # nothing measured yet
    assert initial_aggregator(None) == "device"
    assert initial_aggregator(prior) == "cloud"
    assert initial_aggregator(SchedulerPrior(300, 30, 100, 1.0, 0.6)) == "device"


def test_a_move_to_the_cloud_must_repay_its_round_trip_over_the_tokens_left():
    from dragon_core.scheduler import pays_for_the_move

    # measured shape (H200, RTT 300): device 20 ms, cloud 5 ms, device drafts always right,
    # the cloud's 95%: ΔZ ~ 14 ms/token, so 20 tokens do not repay 300 ms, 40 do
    prior = SchedulerPrior(device_ms=20.0, cloud_ms=5.0, rtt_ms=300.0, alpha_device=1.0, alpha_cloud=0.95)
    assert initial_aggregator(prior) == "cloud"  # no horizon: the steady-state rule alone
    assert initial_aggregator(prior, max_tokens=20) == "device"
    assert initial_aggregator(prior, max_tokens=40) == "cloud"
    assert pays_for_the_move(10.0, 300.0, None) and pays_for_the_move(10.0, 300.0, 31)
    assert not pays_for_the_move(10.0, 300.0, 30) and not pays_for_the_move(10.0, 300.0, 0)
    seeded = _seeded(prior, "device")
    assert seeded.should_hand_over("device") and not seeded.should_hand_over("device", tokens_left=5)
    tie_back = _seeded(prior, "cloud")  # the way back is free: no horizon applies to the cloud's rule
    assert tie_back.should_hand_over("cloud", tokens_left=1) == tie_back.should_hand_over("cloud")


def test_the_first_draft_time_includes_the_prefill_and_is_no_decode_sample():
    from dragon_core.scheduler import observe_draft_time

    # a request placed on a slow cloud by its prior (measured shape of test_scheduling_e2e)
    prior = SchedulerPrior(device_ms=106, cloud_ms=297, rtt_ms=115, alpha_device=1.0, alpha_cloud=0.59)
    on_cloud = _seeded(prior, "cloud")
    est = on_cloud.estimates
    observe_draft_time(est.c_remote, 0, 2000.0)  # the device's first draft waited for its prefill
    observe_draft_time(est.c_local, 0, 300.0)
    assert (est.c_remote.value, est.c_local.value) == (106, 297)  # the prior stands
    assert not on_cloud.should_hand_over("cloud")
    # counted as a decode sample, that one time alone would have sent the request back
    polluted = _seeded(prior, "cloud")
    polluted.estimates.c_remote.update(2000.0)
    assert polluted.should_hand_over("cloud")
    # with nothing known, the first time stands in until the first real sample replaces it
    fresh = Ewma()
    observe_draft_time(fresh, 0, 700.0)
    assert fresh.value == 700.0 and fresh.count == 0 and fresh.provisional
    observe_draft_time(fresh, 1, 20.0)
    assert fresh.value == 20.0 and fresh.count == 1 and not fresh.provisional
    observe_draft_time(fresh, 2, 30.0)
    assert fresh.value == pytest.approx(22.0) and fresh.count == 2
