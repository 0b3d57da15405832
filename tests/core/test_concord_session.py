"""CONCORD's session roles driven by hand, event by event (pure): what the device sends and
commits at each point, the cloud's evidence and replies, the debt's clock, and a cloud that
breaks the protocol (the device goes on alone, degraded)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from dragon_core import codec
from dragon_core import concord_wire as cw
from dragon_core import messages as m
from dragon_core import session as s
from dragon_core.dist import Dist

V = 8


def cfg(**kw) -> s.SessionConfig:
    base = dict(request_id=4, max_tokens=5, seed=0, eos_ids=frozenset({0}), mode="concord", vocab_size=V,
                concord_debt_max=math.inf)
    base.update(kw)
    return s.SessionConfig(**base)


def dist(*probs: float) -> Dist:
    p = np.full(V, 1e-6)
    p[:len(probs)] = probs
    with np.errstate(divide="ignore"):  # a 0 is an impossible token (log-prob -inf)
        return Dist.full(np.log(p))


def sent(actions, kind=None) -> list[m.Message]:
    return [a.msg for a in actions if isinstance(a, s.Send) and (kind is None or isinstance(a.msg, kind))]


def commits(actions) -> list[int]:
    return [t for a in actions if isinstance(a, s.Commit) for t in a.tokens]


def compute_of(actions) -> s.ComputeDist:
    (c,) = [a for a in actions if isinstance(a, s.ComputeDist)]
    return c


def evidence(step: int, probs: Dist, top_m: int = 1, log_h: float | None = 0.0) -> s.PeerMessage:
    frame, _ = cw.first_evidence(4, step, probs.probs(), top_m, log_h)
    return s.PeerMessage(codec.decode(codec.encode(frame)))


def test_device_waits_for_evidence_then_commits_the_certified_token_and_sends_it_up():
    dev = s.Session("device", cfg(), 0.0)
    c = compute_of(dev.handle(s.Start()))
    assert (c.step, dev.awaiting_peer) == (0, False)
    assert dev.handle(s.LocalDist(c.epoch, 0, dist(0, 0.1, 0.7, 0.1))) == []  # waits for the cloud
    assert dev.awaiting_peer
    out = dev.handle(evidence(0, dist(0, 0.1, 0.8, 0.05)))
    assert commits(out) == [2] and sent(out) == [m.Tokens(4, 0, [2])]
    assert compute_of(out).step == 1 and dev.stats.concord_by_step == ["certified"]


def test_device_asks_for_the_ids_above_theta_then_the_dense_mixture_when_needed():
    dev = s.Session("device", cfg(), 0.0)
    c = compute_of(dev.handle(s.Start()))
    dev.handle(s.LocalDist(c.epoch, 0, dist(0, 0.45, 0.1, 0.44)))
    cloud_p = dist(0, 0.40, 0.05, 0.45)  # dense: 0.425 vs 0.445 -> 3, the cloud's top is 3 too
    out = dev.handle(evidence(0, cloud_p, top_m=0))  # nothing listed: only a tail
    (ask,) = sent(out, m.EvidenceRequest)
    assert ask.step == 0 and 0 < ask.theta < 1 and commits(out) == []
    reply, _ = cw.supplement_evidence(4, 0, cloud_p.probs(), ask.theta, np.zeros(0, dtype=np.int64))
    out = dev.handle(s.PeerMessage(reply))
    assert commits(out) == [3] and dev.stats.steps_supplemented == 1
    # a step the certificate cannot settle: exact tie of the dense scores -> the dense mixture
    c = compute_of(out)
    tie = dist(0, 0.5, 0.5)
    dev.handle(s.LocalDist(c.epoch, 1, tie))
    out = dev.handle(evidence(1, tie, top_m=3, log_h=None))
    (ask,) = sent(out, m.EvidenceRequest)
    assert ask.theta <= 0
    out = dev.handle(s.PeerMessage(cw.dense_evidence(4, 1, codec.dist_to_wire(tie))))
    assert commits(out) == [1] and dev.stats.concord_by_step == ["certified", "dense"]  # lowest id of a tie


def test_late_evidence_for_a_local_step_feeds_the_debt_only():
    dev = s.Session("device", cfg(concord_debt_max=-math.inf), 0.0)
    c = compute_of(dev.handle(s.Start()))
    out = dev.handle(s.LocalDist(c.epoch, 0, dist(0, 0.6, 0.3)))
    assert commits(out) == [1] and dev.stats.steps_local == 1  # no waiting at all
    out = dev.handle(evidence(0, dist(0, 0.01, 0.98)))  # the cloud would have overruled it
    assert commits(out) == [] and sent(out) == []
    assert (dev.stats.evidence_late, dev.stats.local_overruled) == (1, 1)
    assert dev.committed == [1]


def test_the_wait_is_timed_by_the_hosts_clock_in_local_steps():
    dev = s.Session("device", cfg(concord_debt_max=4.0), 0.0)
    c = compute_of(dev.handle(s.Start()))
    dev.handle(s.LocalDist(c.epoch, 0, dist(0, 0.1, 0.7), decode_ms=10.0, at_ms=100.0))
    out = dev.handle(s.PeerMessage(evidence(0, dist(0, 0.1, 0.8)).msg, at_ms=160.0))
    assert commits(out) == [2] and dev.stats.waited_ms == 60.0
    assert dev._concord.debt.debt == pytest.approx(6.0)  # 60 ms at 10 ms a local step
    c = compute_of(out)
    out = dev.handle(s.LocalDist(c.epoch, 1, dist(0, 0.1, 0.7), decode_ms=10.0, at_ms=170.0))
    assert commits(out) == [2] and dev.stats.concord_by_step == ["certified", "local"]  # D = 6 > 4: no wait


def test_without_a_clock_a_wait_counts_one_round_trip():
    dev = s.Session("device", cfg(concord_debt_max=4.0), 0.0)
    c = compute_of(dev.handle(s.Start()))
    dev.handle(s.RttSample(30.0))
    dev.handle(s.LocalDist(c.epoch, 0, dist(0, 0.1, 0.7), decode_ms=10.0))
    dev.handle(evidence(0, dist(0, 0.1, 0.8)))
    assert dev.stats.waited_ms == pytest.approx(30.0)
    assert dev._concord.debt.debt == pytest.approx(3.0)


def test_evidence_already_there_costs_no_wait():
    dev = s.Session("device", cfg(concord_debt_max=4.0), 0.0)
    c = compute_of(dev.handle(s.Start()))
    dev.handle(s.RttSample(30.0))
    dev.handle(evidence(0, dist(0, 0.1, 0.8)))
    out = dev.handle(s.LocalDist(c.epoch, 0, dist(0, 0.1, 0.7), decode_ms=10.0))
    assert commits(out) == [2] and dev.stats.waited_ms == 0.0 and dev._concord.debt.debt == 0.0


@pytest.mark.parametrize("bad", [
    lambda: evidence(3, dist(0, 1.0)),  # a step the device has not reached
    lambda: evidence(0, dist(0, 1.0), log_h=None),  # no log h in the first evidence
    lambda: s.PeerMessage(m.Draft(4, 0, 0, 1, codec.dist_to_wire(dist(0, 1.0)), 0.0)),  # DRAGON's frame
    lambda: s.PeerMessage(m.Evidence(4, 0, np.array([V + 3], "<i4").tobytes(), np.array([0.5, 0.1], "<f2").tobytes(), 0.0)),
])
def test_a_cloud_that_breaks_the_protocol_is_told_and_the_device_goes_on_alone(bad):
    dev = s.Session("device", cfg(), 0.0)
    c = compute_of(dev.handle(s.Start()))
    dev.handle(s.LocalDist(c.epoch, 0, dist(0, 0.2, 0.7)))
    out = dev.handle(bad())
    assert [e.code for e in sent(out, m.Error)] and dev.degraded and dev.finished is None
    assert commits(out) == [2] and dev.stats.concord_by_step == ["local"]  # its own token, flagged local


def test_cloud_publishes_evidence_per_step_and_answers_requests_even_before_its_mixture_is_ready():
    cloud = s.Session("cloud", cfg(concord_top_m=2, max_depth=1), 1.5)  # no guessing ahead
    c = compute_of(cloud.handle(s.Start()))  # step 0 at once, on the prompts
    p0 = dist(0, 0.5, 0.3, 0.1)
    (ev0,) = sent(cloud.handle(s.LocalDist(c.epoch, 0, p0)), m.Evidence)
    assert ev0.log_h == 1.5 and np.frombuffer(ev0.ids, "<i4").tolist() == [1, 2]
    out = cloud.handle(s.PeerMessage(m.Tokens(4, 0, [1])))
    assert commits(out) == [1] and compute_of(out).step == 1
    assert sent(cloud.handle(s.PeerMessage(m.EvidenceRequest(4, 1, 0.0)))) == []  # held until computed
    out = cloud.handle(s.LocalDist(c.epoch, 1, p0))
    first, dense = sent(out, m.Evidence)
    assert first.log_h is None and first.dist is None and dense.dist is not None
    assert codec.dist_from_wire(dense.dist).probs().tobytes() == p0.probs().tobytes()


def test_cloud_skips_ahead_when_the_device_outran_it_and_finishes_with_the_device():
    cloud = s.Session("cloud", cfg(max_tokens=3), 0.0)
    c = compute_of(cloud.handle(s.Start()))
    cloud.handle(s.PeerMessage(m.Tokens(4, 0, [5])))
    cloud.handle(s.PeerMessage(m.Tokens(4, 1, [6])))
    out = cloud.handle(s.LocalDist(c.epoch, 0, dist(0, 0.5)))
    assert [e.step for e in sent(out, m.Evidence)] == [0]  # late, still published
    assert compute_of(out).step == 2  # straight to the newest prefix
    out = cloud.handle(s.PeerMessage(m.Tokens(4, 2, [7])))
    assert cloud.finished is not None and cloud.finished.reason == "length" and cloud.committed == [5, 6, 7]


def test_cloud_refuses_tokens_out_of_order():
    cloud = s.Session("cloud", cfg(), 0.0)
    cloud.handle(s.Start())
    out = cloud.handle(s.PeerMessage(m.Tokens(4, 2, [1])))
    assert sent(out, m.Error) and cloud.finished.reason == "error"


def test_cloud_computes_ahead_on_its_own_guesses_and_drops_them_when_the_device_differs():
    cloud = s.Session("cloud", cfg(max_depth=3, max_tokens=8), 0.0)
    c = compute_of(cloud.handle(s.Start()))
    out = cloud.handle(s.LocalDist(c.epoch, 0, dist(0, 0.1, 0.8)))  # its guess for step 0: 2
    (ev0,) = sent(out, m.Evidence)
    assert ev0.chain is None and compute_of(out).step == 1  # ahead, on its own guess
    out = cloud.handle(s.LocalDist(c.epoch, 1, dist(0, 0.7, 0.2)))  # guess for step 1: 1
    assert not sent(out, m.Evidence) and compute_of(out).step == 2  # held for a run; on [] + guess 2
    out = cloud.handle(s.LocalDist(c.epoch, 2, dist(0, 0.2, 0.7)))
    (run,) = sent(out, m.EvidenceRun)  # the window (3) is full: what was held goes, as one frame
    ev1, ev2 = cw.unpack_run(codec.decode(codec.encode(run)))
    assert (ev1.step, ev1.chain) == (1, (0, 2)) and (ev2.step, ev2.chain) == (2, (0, 1))
    assert not [a for a in out if isinstance(a, s.ComputeDist)]
    out = cloud.handle(s.PeerMessage(m.Tokens(4, 0, [2])))  # guessed right: the window moves on
    assert compute_of(out).step == 3 and cloud.epoch == c.epoch
    out = cloud.handle(s.PeerMessage(m.Tokens(4, 1, [3])))  # guessed wrong (1): steps 2, 3 are void
    assert cloud.epoch == c.epoch + 1
    c2 = [a for a in out if isinstance(a, s.ComputeDist)]
    assert not c2  # the stale computation is still in flight: one at a time
    out = cloud.handle(s.LocalDist(c.epoch, 3, dist(0, 0.5)))
    assert not sent(out, m.Evidence) and not sent(out, m.EvidenceRun)  # dropped, never published
    assert compute_of(out).step == 2 and compute_of(out).epoch == c.epoch + 1  # on the device's tokens
    (run,) = sent(cloud.handle(s.LocalDist(c.epoch + 1, 2, dist(0, 0.5))), m.EvidenceRun)  # a one-step run
    (ev,) = cw.unpack_run(run)
    assert ev.step == 2 and ev.chain is None


def test_device_uses_evidence_ahead_only_where_the_guesses_equal_its_tokens():
    dev = s.Session("device", cfg(max_depth=4, max_tokens=5), 0.0)
    c = compute_of(dev.handle(s.Start()))
    frame0, _ = cw.first_evidence(4, 0, dist(0, 0.1, 0.8).probs(), 1, 0.0)
    frame1, _ = cw.first_evidence(4, 1, dist(0, 0.1, 0.1, 0.7).probs(), 1, None, chain=(0, 2))  # guessed 2
    frame2, _ = cw.first_evidence(4, 2, dist(0, 0.9).probs(), 1, None, chain=(0, 3))  # then guessed 3
    for frame in (frame0, frame1, frame2):
        assert dev.handle(s.PeerMessage(codec.decode(codec.encode(frame)))) == []  # p^d not ready yet
    out = dev.handle(s.LocalDist(c.epoch, 0, dist(0, 0.1, 0.7, 0.1)))
    assert commits(out) == [2]  # certified by frame 0
    c1 = compute_of(out)
    out = dev.handle(s.LocalDist(c1.epoch, 1, dist(0, 0.1, 0.1, 0.7)))
    assert commits(out) == [3]  # frame 1 was on [2] = what we committed: no wait
    c2 = compute_of(out)
    # frame 2 was on [2, 3]: right as well; but a frame on a wrong guess is not used
    wrong, _ = cw.first_evidence(4, 3, dist(0, 0.9).probs(), 1, None, chain=(1, 4))  # guessed 4 at step 2
    dev.handle(s.PeerMessage(codec.decode(codec.encode(wrong))))
    out = dev.handle(s.LocalDist(c2.epoch, 2, dist(0, 0.8, 0.1)))
    assert commits(out) == [1]
    c3 = compute_of(out)
    assert dev.handle(s.LocalDist(c3.epoch, 3, dist(0, 0.8, 0.1))) == []  # waits: the guess (4) was not 1
    assert dev.stats.evidence_missed == 1 and dev.stats.steps_certified == 3
    right, _ = cw.first_evidence(4, 3, dist(0, 0.9).probs(), 1, None)
    assert commits(dev.handle(s.PeerMessage(codec.decode(codec.encode(right))))) == [1]
