"""CONCORD (mode "concord", docs/CONCORD.md) over the deterministic network simulator: every step
that consulted the cloud commits the dense greedy token of its own prefix; with ``D_max = inf``
the whole answer is dense greedy DRAGON (RTT 0-300 ms, jitter, full and top-K distributions);
``D_max = -inf`` is device-only; a cloud lost mid-answer leaves a degraded, locally finished
answer; nothing of the device's distribution or retrieval mass goes up."""

from __future__ import annotations

import struct

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from dragon_core import codec
from dragon_core import concord_wire as cw
from dragon_core import messages as m
from dragon_core import session as s
from dragon_core.aggregate import cross_side_weights
from dragon_core.dist import Dist
from dragon_core.messages import Sampling
from dragon_core.speculative import VERIFY, step_rng, synchronous_target
from dragon_core.testing.netsim import LinkSpec, SideSpec, SimulatedPair
from dragon_core.testing.reference import centralized_decode, solo_decode

EOS = 0
INF = float("inf")


def fake_side(side_id: int, vocab: int, world: int, disagreement: float, top_k: int = 0, ties: bool = False):
    """Logits = a shared part + a side's own part, a pure function of the prefix; ``ties``
    rounds them to whole numbers, so ids tie exactly (and, with no disagreement, both sides)."""

    def dist_fn(prefix: tuple[int, ...]) -> Dist:
        shared = np.random.default_rng([world, 7, *prefix]).normal(0, 2.5, vocab)
        own = np.random.default_rng([world, side_id, *prefix]).normal(0, disagreement, vocab)
        z = np.round(shared + own) if ties else shared + own
        z[EOS] -= 3.0 if len(prefix) < 12 else -1.0  # EOS becomes likely late
        return Dist.top_k(z, top_k) if top_k else Dist.full(z)

    return dist_fn


def sides(world: int, *, top_k: int = 0, disagreement: float = 1.5, c_dev: float = 30.0, c_cloud: float = 10.0,
          vocab: int = 40, ties: bool = False) -> tuple[SideSpec, SideSpec]:
    dev = SideSpec(0.3, fake_side(1, vocab, world, disagreement, top_k, ties), lambda now, step: c_dev)
    cloud = SideSpec(1.1, fake_side(2, vocab, world, disagreement, top_k, ties), lambda now, step: c_cloud)
    return dev, cloud


def config(**kw) -> s.SessionConfig:
    base = dict(request_id=1, max_tokens=24, seed=5, eos_ids=frozenset({EOS}), mode="concord", vocab_size=40)
    base.update(kw)
    return s.SessionConfig(**base)


def links(rtt_ms: float, seed: int) -> tuple[LinkSpec, LinkSpec]:
    one_way = rtt_ms / 2
    return LinkSpec(one_way, one_way / 5, seed=seed), LinkSpec(one_way, one_way / 5, seed=seed + 1)


def dense_token(cfg: s.SessionConfig, dev: SideSpec, cloud: SideSpec, prefix: tuple[int, ...]) -> int:
    """Dense greedy DRAGON's token on ``prefix`` (the formula ``centralized_decode`` uses)."""
    _, eta_cloud = cross_side_weights(dev.log_h, cloud.log_h)
    return synchronous_target(dev.dist_fn(prefix), cloud.dist_fn(prefix), eta_cloud, cfg.sampling,
                              step_rng(cfg.seed, VERIFY, len(prefix)))


def run(cfg, dev, cloud, rtt=50.0, seed=0, **kw) -> SimulatedPair:
    return SimulatedPair(cfg, dev, cloud, *links(rtt, seed), **kw).run()


@pytest.mark.parametrize("rtt", [0.0, 50.0, 100.0, 300.0])
@pytest.mark.parametrize("top_k", [0, 8])
@pytest.mark.parametrize("top_m", [0, 1, 3])
def test_unbounded_debt_is_dense_greedy_token_for_token(rtt, top_k, top_m):
    for world in range(4):
        cfg = config(concord_debt_max=INF, concord_top_m=top_m, dist_top_k=top_k)
        dev, cloud = sides(world, top_k=top_k)
        pair = run(cfg, dev, cloud, rtt, seed=world * 10)
        want = centralized_decode(cfg, dev, cloud)
        assert pair.device.record.tokens == want, f"world {world}"
        assert pair.cloud.record.tokens == want, f"world {world}"  # the cloud followed the prefix
        stats = pair.device.session.stats
        assert stats.steps_local == 0 and stats.steps_consulted == len(want)
        assert pair.device.record.finish.reason in ("eos", "length") and not pair.device.record.finish.degraded


@pytest.mark.parametrize("rtt", [0.0, 50.0, 100.0, 300.0])
@pytest.mark.parametrize("debt_max", [4.0, 1.0, 0.0])
@pytest.mark.parametrize("disagreement", [0.3, 1.5])
def test_every_consulted_step_commits_the_dense_greedy_token(rtt, debt_max, disagreement):
    kinds_seen: set[str] = set()
    for world in range(4):
        # max_depth 1: the cloud computes on our tokens only, so a consulted step waits (the debt's case)
        cfg = config(concord_debt_max=debt_max, max_tokens=30, max_depth=1 if world % 2 else 8)
        dev, cloud = sides(world, disagreement=disagreement)
        pair = run(cfg, dev, cloud, rtt, seed=world)
        tokens, stats = pair.device.record.tokens, pair.device.session.stats
        assert len(stats.concord_by_step) == len(tokens) == stats.steps_certified + stats.steps_dense + stats.steps_local
        for step, kind in enumerate(stats.concord_by_step):
            if kind != "local":
                assert tokens[step] == dense_token(cfg, dev, cloud, tuple(tokens[:step])), (world, step, kind)
        assert pair.cloud.record.tokens == tokens
        kinds_seen.update(stats.concord_by_step)
    if rtt >= 100.0:  # waiting costs several local steps: the debt sends some steps local
        assert "local" in kinds_seen
    assert "certified" in kinds_seen


def test_minus_infinite_debt_is_device_only_and_never_asks():
    for world in range(3):
        cfg = config(concord_debt_max=-INF)
        dev, cloud = sides(world)
        pair = run(cfg, dev, cloud, 100.0, seed=world)
        assert pair.device.record.tokens == solo_decode(cfg, dev, "device")
        stats = pair.device.session.stats
        assert stats.steps_local == len(pair.device.record.tokens) and stats.evidence_requests == 0
        up = [codec.decode(f) for f in pair.up.frames]
        assert not any(isinstance(msg, m.EvidenceRequest) for msg in up)
        assert stats.evidence_late > 0  # late evidence still arrives and is read for the statistics


def test_agreeing_sides_certify_mostly_with_the_first_entry():
    cfg = config(concord_debt_max=INF, concord_top_m=1, max_tokens=20, eos_ids=frozenset())
    dev, cloud = sides(2, disagreement=0.05)
    pair = run(cfg, dev, cloud, 0.0)
    stats = pair.device.session.stats
    assert stats.steps_certified == 20 and stats.steps_dense == 0
    assert stats.steps_supplemented <= 2  # a near-tie of the two sides' top tokens may need an id more
    frames = [(len(f), codec.decode(f)) for f in pair.down.frames]
    evidence = [(n, msg) for n, msg in frames if isinstance(msg, (m.Evidence, m.EvidenceRun))]
    # log h rides only in the first frame; every other step goes as a run (one step or more):
    # at most 14 bytes for one step (steps < 128, a 3-byte varint id), 5 more with a chain
    # (computed ahead), 7 a step more
    assert isinstance(evidence[0][1], m.Evidence) and evidence[0][1].log_h is not None
    runs = [(n, msg) for n, msg in evidence[1:] if isinstance(msg, m.EvidenceRun)]
    assert len(runs) == len(evidence) - 1 - stats.steps_supplemented
    steps = [len(cw.run_entries(msg.entries)) for _, msg in runs]
    assert all(n <= 19 + 7 * (k - 1) for (n, _), k in zip(runs, steps)), list(zip([n for n, _ in runs], steps))


def test_a_late_or_disagreeing_cloud_is_supplemented_or_dense_and_still_exact():
    """Sides that disagree: the first entry often cannot certify, the device asks (θ) and
    sometimes needs the dense mixture; every such step is still dense greedy."""
    asked = dense = 0
    for world in range(6):
        cfg = config(concord_debt_max=INF, concord_top_m=1, max_tokens=30)
        dev, cloud = sides(world, disagreement=3.0)
        pair = run(cfg, dev, cloud, 60.0, seed=world)
        assert pair.device.record.tokens == centralized_decode(cfg, dev, cloud)
        asked += pair.device.session.stats.steps_supplemented
        dense += pair.device.session.stats.steps_dense
    assert asked > 0


@pytest.mark.parametrize("debt_max", [INF, 4.0])
def test_cloud_lost_mid_answer_device_finishes_locally_flagged_degraded(debt_max):
    cfg = config(concord_debt_max=debt_max, max_tokens=30, eos_ids=frozenset())
    dev, cloud = sides(1)
    up, down = links(60.0, seed=4)
    up.cut_at_ms = down.cut_at_ms = 400.0
    pair = SimulatedPair(cfg, dev, cloud, up, down, peer_timeout_ms=300.0).run()
    rec, stats = pair.device.record, pair.device.session.stats
    assert rec.finish.reason == "length" and rec.finish.degraded and len(rec.tokens) == 30
    cut = next(i for i, (t, _) in enumerate(rec.commits) if t >= 400.0)
    assert 0 < cut < 30
    for step, kind in enumerate(stats.concord_by_step[:cut]):  # before the cut: exact where consulted
        if kind != "local":
            assert rec.tokens[step] == dense_token(cfg, dev, cloud, tuple(rec.tokens[:step]))
    assert set(stats.concord_by_step[cut + 1:]) == {"local"}  # after: the device's own tokens
    assert rec.tokens == solo_decode(cfg, dev, "device", tuple(rec.tokens[:cut + 1]))


def test_nothing_of_the_devices_distribution_or_retrieval_mass_goes_up():
    """The tap: every frame the device sent, decoded, is a prefix token list, an evidence
    request (one scalar θ) or link control; the raw bytes hold none of the device's
    distribution values (f16/f32/f64, both byte orders) nor its log h."""
    cfg = config(concord_debt_max=INF, max_tokens=24)
    dev, cloud = sides(3, disagreement=3.0)
    pair = run(cfg, dev, cloud, 50.0)
    up_msgs = [codec.decode(f) for f in pair.up.frames]
    assert {type(msg) for msg in up_msgs} <= {m.Tokens, m.EvidenceRequest, m.Ping, m.Pong}
    assert any(isinstance(msg, m.EvidenceRequest) for msg in up_msgs)  # the test covers requests
    tokens = pair.device.record.tokens
    sent = [t for msg in up_msgs if isinstance(msg, m.Tokens) for t in msg.tokens]
    assert sent == tokens  # token ids only: the committed prefix, once each
    raw = b"".join(pair.up.frames)
    needles = {struct.pack(order + "d", dev.log_h) for order in "<>"}
    for step in range(len(tokens)):
        p = dev.dist_fn(tuple(tokens[:step])).probs()
        for value in np.sort(p)[-3:]:  # the device's most telling entries
            for order in "<>":
                needles |= {struct.pack(order + "d", value), struct.pack(order + "f", value),
                            np.array([value], dtype=order + "f2").tobytes() * 2}
    assert not [n for n in needles if n in raw]
    # positive control: the same search finds the cloud's evidence values in the down stream
    down = b"".join(pair.down.frames)
    first = next(codec.decode(f) for f in pair.down.frames if isinstance(codec.decode(f), m.Evidence))
    assert first.values[:2] in down


@pytest.mark.parametrize("rtt", [50.0, 300.0])
def test_the_debt_cuts_waiting_when_the_cloud_is_far(rtt):
    """At a long RTT the default debt commits most steps locally and the answer finishes sooner
    than exact (D_max = inf) CONCORD; at least one step per answer still consulted the cloud."""
    dev, cloud = sides(0, disagreement=0.3)
    # max_depth 1: no evidence ahead, so every consulted step waits a round trip (the debt's case)
    exact = run(config(concord_debt_max=INF, max_tokens=30, eos_ids=frozenset(), max_depth=1), dev, cloud, rtt)
    debt = run(config(max_tokens=30, eos_ids=frozenset(), max_depth=1), dev, cloud, rtt)
    assert debt.device.record.finish_ms < exact.device.record.finish_ms
    assert debt.device.session.stats.steps_consulted >= 1
    if rtt >= 300.0:
        assert debt.device.session.stats.steps_local > debt.device.session.stats.steps_consulted


def test_concord_refuses_sampling():
    with pytest.raises(ValueError, match="greedy"):
        s.Session("device", config(sampling=Sampling(False, 0.7)), 0.3)


@settings(deadline=None, max_examples=200, suppress_health_check=[HealthCheck.too_slow])
@given(world=st.integers(0, 10_000), rtt=st.floats(0.0, 400.0), jitter=st.floats(0.0, 1.0),
       debt_max=st.sampled_from([INF, 8.0, 4.0, 1.0, 0.0, -1.0]), top_m=st.integers(0, 4),
       top_k=st.sampled_from([0, 4, 16]), disagreement=st.sampled_from([0.0, 0.3, 1.5, 4.0]),
       ties=st.booleans(), c_dev=st.floats(1.0, 80.0), c_cloud=st.floats(1.0, 80.0))
# a stall found by a CI seed: the cloud computed step 15 after the device had passed it, guessed
# EOS there, and stopped its chain on that guess while the device waited for step 16's evidence
@example(world=0, rtt=42.69451686614387, jitter=0.0, debt_max=1.0, top_m=0, top_k=16, disagreement=0.3,
         ties=True, c_dev=66.1600268836605, c_cloud=66.1600268836605)
def test_any_world_every_consulted_step_is_dense_greedy(world, rtt, jitter, debt_max, top_m, top_k, disagreement,
                                                        ties, c_dev, c_cloud):
    """Random worlds (exact ties among ids and between the sides included), link speeds (jitter
    up to the one-way latency), debts, list sizes and side speeds: every consulted step is dense
    greedy on its prefix; with D_max = inf, all of them."""
    cfg = config(concord_debt_max=debt_max, concord_top_m=top_m, dist_top_k=top_k, max_tokens=20)
    dev, cloud = sides(world, top_k=top_k, disagreement=disagreement, c_dev=c_dev, c_cloud=c_cloud, ties=ties)
    one_way = rtt / 2
    up, down = LinkSpec(one_way, one_way * jitter, seed=world), LinkSpec(one_way, one_way * jitter, seed=world + 1)
    pair = SimulatedPair(cfg, dev, cloud, up, down).run()
    tokens, stats = pair.device.record.tokens, pair.device.session.stats
    for step, kind in enumerate(stats.concord_by_step):
        if kind != "local":
            assert tokens[step] == dense_token(cfg, dev, cloud, tuple(tokens[:step]))
    if debt_max == INF:
        assert tokens == centralized_decode(cfg, dev, cloud) and stats.steps_local == 0
    assert pair.cloud.record.tokens == tokens and not pair.device.record.finish.degraded


def test_exact_ties_are_never_certified_the_dense_reply_decides_them():
    """Whole-number logits, the same on both sides: ids tie exactly; the certificate refuses
    them (strict margin) and the dense reply gives DRAGON's own token (the lowest id)."""
    dense = 0
    for world in range(8):
        cfg = config(concord_debt_max=INF, max_tokens=20)
        dev, cloud = sides(world, disagreement=0.0, ties=True)
        pair = run(cfg, dev, cloud, 50.0, seed=world)
        assert pair.device.record.tokens == centralized_decode(cfg, dev, cloud)
        dense += pair.device.session.stats.steps_dense
    assert dense > 0


@pytest.mark.parametrize("rtt", [100.0, 300.0])
def test_evidence_ahead_hides_the_round_trip_and_stays_exact(rtt):
    """Exact CONCORD (D_max = inf) with the cloud computing ahead on its own guesses (window 16)
    against the same without guessing (max_depth 1): the same answer, dense greedy token for
    token, sooner, because a consulted step whose prefix the cloud guessed waits for nothing."""
    dev, cloud = sides(0, disagreement=0.3)
    flat = run(config(concord_debt_max=INF, max_tokens=30, eos_ids=frozenset(), max_depth=1), dev, cloud, rtt)
    ahead = run(config(concord_debt_max=INF, max_tokens=30, eos_ids=frozenset(), max_depth=16), dev, cloud, rtt)
    cfg = config(concord_debt_max=INF, max_tokens=30, eos_ids=frozenset())
    tokens = ahead.device.record.tokens
    assert tokens == flat.device.record.tokens
    assert all(tokens[t] == dense_token(cfg, dev, cloud, tuple(tokens[:t])) for t in range(len(tokens)))
    assert ahead.device.session.stats.steps_local == 0
    assert ahead.device.record.finish_ms < 0.6 * flat.device.record.finish_ms


@pytest.mark.parametrize("rtt", [100.0, 300.0])
def test_evidence_ahead_goes_in_runs_fewer_bytes_same_tokens(rtt, monkeypatch):
    """A cloud 10x faster than the device (3 vs 30 ms a step, the GPU testbed's shape) computes
    ahead in bursts; held into ``EvidenceRun``s of up to ``RUN_MAX`` steps, its frames cost far
    fewer bytes than one frame a step, and the answer is the same, token for token (exact
    CONCORD: dense greedy), at about the same pace."""
    from dragon_core import concord

    dev, cloud = sides(3, disagreement=0.3, c_dev=30.0, c_cloud=3.0)
    cfg = config(concord_debt_max=INF, max_tokens=40, eos_ids=frozenset(), max_depth=16)
    runs = run(cfg, dev, cloud, rtt)
    monkeypatch.setattr(concord, "RUN_MAX", 1)  # one frame a step
    single = run(cfg, dev, cloud, rtt)
    tokens = runs.device.record.tokens
    assert tokens == single.device.record.tokens and len(tokens) == 40
    assert all(tokens[t] == dense_token(cfg, dev, cloud, tuple(tokens[:t])) for t in range(len(tokens)))
    def evidence_bytes(pair) -> tuple[int, int]:  # the simulator pings every 50 ms: left out
        """Evidence bytes, and the most steps one run held."""
        msgs = [(len(f), codec.decode(f)) for f in pair.down.frames]
        kept = [(n, msg) for n, msg in msgs if isinstance(msg, (m.Evidence, m.EvidenceRun))]
        return sum(n for n, _ in kept), max(len(cw.run_entries(msg.entries)) for _, msg in kept
                                               if isinstance(msg, m.EvidenceRun))

    (ran, longest), (one_by_one, longest1) = evidence_bytes(runs), evidence_bytes(single)
    assert longest > 1 and longest1 == 1
    assert ran / len(tokens) < 0.6 * one_by_one / len(tokens), (ran / len(tokens), one_by_one / len(tokens))
    assert runs.device.record.finish_ms <= 1.1 * single.device.record.finish_ms
