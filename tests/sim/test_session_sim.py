"""Two sessions over the deterministic network simulator, against centralized aggregation."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from scipy import stats

from dragon_core import messages as m
from dragon_core import session as s
from dragon_core.aggregate import cross_side_weights, target_probs, transform
from dragon_core.dist import Dist
from dragon_core.messages import Sampling
from dragon_core.testing.netsim import LinkSpec, SideSpec, SimulatedPair
from dragon_core.testing.reference import centralized_decode
from dragon_core.scheduler import SchedulerConfig, initial_aggregator

EOS = 0


def fake_side(side_id: int, vocab: int, world: int, disagreement: float, top_k: int = 0, temperature: float = 1.0):
    """A deterministic fake engine: logits = shared part + side-specific part, both a pure
    function of the generated prefix (so the two sides agree on most, not all, tokens)."""

    def dist_fn(prefix: tuple[int, ...]) -> Dist:
        shared = np.random.default_rng([world, 7, *prefix]).normal(0, 2.5, vocab)
        own = np.random.default_rng([world, side_id, *prefix]).normal(0, disagreement, vocab)
        z = (shared + own) / temperature
        z[EOS] -= 3.0 if len(prefix) < 12 else -1.0  # EOS becomes likely late
        return Dist.top_k(z, top_k) if top_k else Dist.full(z)

    return dist_fn


def make_config(**kw) -> s.SessionConfig:
    base = dict(request_id=1, max_tokens=24, seed=5, eos_ids=frozenset({EOS}))
    base.update(kw)
    return s.SessionConfig(**base)


def sides(world: int, *, top_k=0, disagreement=1.5, c_dev=30.0, c_cloud=10.0, temperature=1.0, vocab=40):
    dev = SideSpec(0.3, fake_side(1, vocab, world, disagreement, top_k, temperature), lambda now, step: c_dev)
    cloud = SideSpec(1.1, fake_side(2, vocab, world, disagreement, top_k, temperature), lambda now, step: c_cloud)
    return dev, cloud


def links(rtt_ms: float, seed: int) -> tuple[LinkSpec, LinkSpec]:
    one_way = rtt_ms / 2
    return (LinkSpec(one_way, one_way / 5, seed=seed), LinkSpec(one_way, one_way / 5, seed=seed + 1))


CASES = {
    "dragon/device": dict(mode="dragon", aggregator="device", scheduling=False),
    "dragon/cloud": dict(mode="dragon", aggregator="cloud", scheduling=False),
    "dragon/scheduled": dict(mode="dragon", aggregator="device", scheduling=True,
                             scheduler=SchedulerConfig(min_dwell_steps=1, margin_ms=0.0, margin_frac=0.0)),
    "vdrag": dict(mode="vdrag", scheduling=False),
    "sw": dict(mode="sw", scheduling=False),
}


@pytest.mark.parametrize("rtt", [0.0, 50.0, 300.0])
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("top_k", [0, 8])
def test_greedy_equals_centralized_token_for_token(case, rtt, top_k):
    for world in range(4):
        config = make_config(**CASES[case])
        dev, cloud = sides(world, top_k=top_k)
        pair = SimulatedPair(config, dev, cloud, *links(rtt, seed=world * 10)).run()
        want = centralized_decode(config, dev, cloud)
        assert pair.device.record.tokens == want, f"world {world}"
        assert pair.cloud.record.tokens == want, f"world {world}"
        assert pair.device.record.finish.reason in ("eos", "length")
        assert not pair.device.record.finish.degraded


def test_speculation_actually_happened_and_rejections_were_rolled_back():
    config = make_config(mode="dragon", scheduling=False, max_depth=6)
    dev, cloud = sides(0, disagreement=2.0)
    pair = SimulatedPair(config, dev, cloud, *links(100, seed=3)).run()
    assert pair.device.record.tokens == centralized_decode(config, dev, cloud)
    st_dev, st_cloud = pair.device.session.stats, pair.cloud.session.stats
    assert st_dev.accepted_remote > 0 and st_dev.decided_here == len(pair.device.record.tokens)
    assert st_cloud.rollbacks > 0  # the cloud ran ahead, got rejected, rolled back
    assert st_dev.stale_dropped + st_cloud.stale_dropped > 0  # in-flight stale drafts were dropped


def test_step_only_tagging_of_the_reference_code_is_inexact():
    """The reference tags drafts with the step only: a draft built on a rejected token that is
    already in flight is then consumed as valid. With (epoch, step) tags the output is exact."""
    mismatches = 0
    for world in range(12):
        dev, cloud = sides(world, disagreement=2.5, c_dev=40.0, c_cloud=5.0)
        want = centralized_decode(make_config(), dev, cloud)
        for tagging in ("epoch", "step"):
            config = make_config(scheduling=False, max_depth=8, tagging=tagging)
            pair = SimulatedPair(config, dev, cloud, *links(200, seed=world)).run()
            if tagging == "epoch":
                assert pair.device.record.tokens == want
            else:
                mismatches += pair.device.record.tokens != want
    assert mismatches >= 3, f"step-only tagging diverged in only {mismatches}/12 runs"


def test_sampling_over_the_simulator_has_the_centralized_distribution():
    """Joint law of the first two tokens at a fixed prompt, DRAGON over a 100 ms link vs the
    exact centralized probabilities; χ² at α = 1e-3 over 10,000 runs (36 cells, power >= 0.999
    against a total-variation deviation of 0.05)."""
    vocab, runs = 6, 10_000
    sampling = Sampling(greedy=False, temperature=1.0)
    dev, cloud = sides(0, disagreement=1.0, vocab=vocab)
    _, eta = cross_side_weights(dev.log_h, cloud.log_h)

    def law(prefix):
        return transform(target_probs(dev.dist_fn(prefix), cloud.dist_fn(prefix), eta), sampling)

    p1 = law(())
    expected = np.array([p1[a] * law((a,))[b] for a, b in itertools.product(range(vocab), repeat=2)])
    counts = np.zeros(vocab * vocab)
    eos_free = make_config(eos_ids=frozenset(), max_tokens=2, sampling=sampling, scheduling=False)
    for seed in range(runs):
        config = s.SessionConfig(**{**eos_free.__dict__, "seed": seed})
        pair = SimulatedPair(config, dev, cloud, *links(100, seed=seed)).run()
        a, b = pair.device.record.tokens
        counts[a * vocab + b] += 1
    crit = stats.chi2.ppf(1 - 1e-3, 35)
    assert stats.ncx2.sf(crit, 35, runs * 4 * 0.05**2) >= 0.999
    assert counts[expected == 0].sum() == 0
    exp_counts = expected * runs
    rare = exp_counts < 5  # pool rare cells so the χ² approximation holds
    f_obs = np.append(counts[~rare], counts[rare].sum())
    f_exp = np.append(exp_counts[~rare], exp_counts[rare].sum())
    _, pval = stats.chisquare(f_obs[f_exp > 0], f_exp[f_exp > 0])
    assert pval > 1e-3
    # the same test rejects the device-only law: it can fail
    p1d = transform(dev.dist_fn(()).probs(), sampling)
    wrong = np.array([p1d[a] * transform(dev.dist_fn((a,)).probs(), sampling)[b]
                      for a, b in itertools.product(range(vocab), repeat=2)]) * runs
    _, pval_wrong = stats.chisquare(counts[wrong > 0], wrong[wrong > 0] * counts[wrong > 0].sum() / wrong[wrong > 0].sum())
    assert pval_wrong < 1e-3


def test_cloud_lost_mid_answer_device_continues_alone_flagged_degraded():
    config = make_config(scheduling=False, max_tokens=30, eos_ids=frozenset())
    dev, cloud = sides(1)
    up, down = links(60, seed=4)
    down.cut_at_ms = up.cut_at_ms = 250.0
    pair = SimulatedPair(config, dev, cloud, up, down).run()
    rec = pair.device.record
    assert rec.finish.reason == "length" and rec.finish.degraded
    assert len(rec.tokens) == 30
    want = centralized_decode(config, dev, cloud)
    cut = next(i for i, (t, _) in enumerate(rec.commits) if t >= 250.0)
    assert rec.tokens[:cut] == want[:cut]  # everything before the cut is exact DRAGON


def test_peer_protocol_violation_is_typed_and_contained():
    config = make_config(scheduling=False)
    dev, _ = sides(0)
    sess = s.Session("device", config, dev.log_h)
    sess.handle(s.Start())
    from dragon_core import messages as m

    actions = sess.handle(s.PeerMessage(m.Target(1, 5, 3, True, 0, 0)))  # device aggregates: no Target
    errors = [a.msg for a in actions if isinstance(a, s.Send) and isinstance(a.msg, m.Error)]
    assert errors and errors[0].code == "protocol_error"
    assert sess.degraded and sess.finished is None  # continues device-only


def test_target_token_outside_the_vocabulary_is_a_protocol_error():
    config = make_config(scheduling=False, aggregator="cloud", vocab_size=40)
    sess = s.Session("device", config, 0.3)
    (compute,) = [a for a in sess.handle(s.Start()) if isinstance(a, s.ComputeDist)]
    dist = Dist.full(np.log(np.full(40, 1 / 40)))
    sess.handle(s.LocalDist(compute.epoch, compute.step, dist))
    actions = sess.handle(s.PeerMessage(m.Target(1, 0, 40, False, 1, 0)))
    errors = [a.msg for a in actions if isinstance(a, s.Send) and isinstance(a.msg, m.Error)]
    assert errors and "vocabulary" in errors[0].message
    assert sess.committed == [] and sess.degraded and sess.finished is None  # goes on alone, nothing bogus committed


def test_scheduler_moves_aggregator_to_the_side_the_rule_predicts():
    """The rule: aggregate on the side slower by more than an RTT. The cloud becomes slow at
    step 20 -> the aggregator moves to the cloud; the device becomes slower still at step 45 ->
    it moves back to the device. Output stays exact throughout."""

    def c_cloud(now, step):
        return 5.0 if step < 20 else 300.0

    def c_dev(now, step):
        return 10.0 if step < 45 else 900.0

    config = make_config(max_tokens=80, eos_ids=frozenset(), scheduling=True, max_depth=4,
                         scheduler=SchedulerConfig(min_dwell_steps=3))
    dev, cloud = sides(2, disagreement=2.0)
    dev.decode_ms, cloud.decode_ms = c_dev, c_cloud
    pair = SimulatedPair(config, dev, cloud, *links(200.0, seed=9)).run()
    assert pair.device.record.tokens == centralized_decode(config, dev, cloud)
    by_step = pair.device.session.stats.aggregator_by_step
    assert by_step[38:45] == ["cloud"] * 7, by_step
    assert by_step[-8:] == ["device"] * 8, by_step
    assert pair.device.session.stats.handovers + pair.cloud.session.stats.handovers >= 2


def test_slow_device_hands_a_tie_back_to_the_device():
    """A slow device whose drafts are always accepted: ΔZ = (1 - α_device)·rtt = 0, so both
    sides are equally fast in steady state; ties go to the device (tokens reach the app half an
    RTT sooner). Started on the cloud, the aggregator moves to the device and stays."""
    config = make_config(max_tokens=40, eos_ids=frozenset(), scheduling=True, max_depth=4, aggregator="cloud")
    dev, cloud = sides(2)
    dev.decode_ms, cloud.decode_ms = (lambda now, step: 400.0), (lambda now, step: 5.0)
    dev.log_h = 30.0  # the device's passages dominate the mixture: its greedy drafts always win
    pair = SimulatedPair(config, dev, cloud, *links(100.0, seed=4)).run()
    assert pair.device.record.tokens == centralized_decode(config, dev, cloud)
    assert pair.cloud.session.scheduler.estimates.alpha_remote.value == 1.0  # a true tie: ΔZ = 0
    by_step = pair.device.session.stats.aggregator_by_step
    assert by_step[0] == "cloud" and by_step[-20:] == ["device"] * 20, by_step
    assert pair.cloud.session.stats.handovers == 1 and pair.device.session.stats.handovers == 0


def test_a_prior_lets_the_first_step_run_on_the_right_side():
    """With estimates from an earlier request (slow cloud, its drafts often rejected) the
    request starts on the cloud and never moves; both sessions start from the same prior."""
    prior = m.SchedulerPrior(device_ms=10.0, cloud_ms=300.0, rtt_ms=200.0, alpha_device=1.0, alpha_cloud=0.5)
    assert initial_aggregator(prior) == "cloud"
    config = make_config(max_tokens=30, eos_ids=frozenset(), scheduling=True, max_depth=4, aggregator="cloud",
                         prior=prior)
    dev, cloud = sides(2, disagreement=2.0)
    dev.decode_ms, cloud.decode_ms = (lambda now, step: 10.0), (lambda now, step: 300.0)
    pair = SimulatedPair(config, dev, cloud, *links(200.0, seed=5)).run()
    assert pair.device.record.tokens == centralized_decode(config, dev, cloud)
    assert set(pair.device.session.stats.aggregator_by_step) == {"cloud"}
    assert pair.cloud.session.scheduler.estimates.prior("cloud") is not None


# ---------------------------------------------------------------------------- cloud-only mode
def frames_of(link) -> list:
    from dragon_core import codec

    return [codec.decode(f) for f in link.frames]


@pytest.mark.parametrize("rtt", [0.0, 50.0, 300.0])
@pytest.mark.parametrize("greedy", [True, False], ids=["greedy", "sampling"])
def test_cloud_only_equals_the_clouds_solo_decode_and_the_device_computes_nothing(rtt, greedy):
    from dragon_core import messages as m
    from dragon_core.testing.reference import solo_decode

    for world in range(3):
        config = make_config(mode="cloud", aggregator="device", scheduling=True, max_tokens=30,
                             sampling=Sampling(greedy=greedy, temperature=1.0))
        assert config.aggregator == "cloud" and not config.scheduling  # normalised: the cloud decides
        dev, cloud = sides(world)
        pair = SimulatedPair(config, dev, cloud, *links(rtt, seed=world)).run()
        want = solo_decode(config, cloud, "cloud")
        assert pair.cloud.record.tokens == want and pair.device.record.tokens == want, f"world {world}"
        assert want != solo_decode(config, dev, "device")  # the check can fail: the sides differ
        assert pair.device.record.engine_calls == 0
        assert not pair.device.record.finish.degraded and pair.device.record.finish.reason in ("eos", "length")
        assert pair.device.session.stats.aggregator_by_step == ["cloud"] * len(want)
        assert pair.device.session.stats.verified == 0 and pair.cloud.session.stats.accepted_local == 0
        down = [x for x in frames_of(pair.down) if not isinstance(x, (m.Ping, m.Pong))]
        up = [x for x in frames_of(pair.up) if not isinstance(x, (m.Ping, m.Pong))]
        assert up == []  # the device sends no draft, no distribution
        assert [t for x in down for t in x.tokens] == want and all(isinstance(x, m.Tokens) for x in down)


def test_cloud_only_cloud_lost_mid_answer_device_continues_from_the_committed_tokens():
    from dragon_core.testing.reference import solo_decode

    config = make_config(mode="cloud", max_tokens=30, eos_ids=frozenset())
    dev, cloud = sides(1, c_cloud=20.0)
    up, down = links(60, seed=4)
    down.cut_at_ms = up.cut_at_ms = 250.0
    pair = SimulatedPair(config, dev, cloud, up, down).run()
    rec = pair.device.record
    assert rec.finish.reason == "length" and rec.finish.degraded and len(rec.tokens) == 30
    cut = next(i for i, (t, _) in enumerate(rec.commits) if t >= 250.0)
    assert 0 < cut < 30
    assert rec.tokens[:cut] == solo_decode(config, cloud, "cloud")[:cut]  # the cloud's tokens, as sent
    assert rec.tokens == solo_decode(config, dev, "device", tuple(rec.tokens[:cut]))  # then the device alone
    assert rec.engine_calls == 30 - cut
    by_step = pair.device.session.stats.aggregator_by_step
    assert by_step == ["cloud"] * cut + ["device"] * (30 - cut)


@pytest.mark.parametrize("mode,step,token", [("dragon", 0, 5), ("cloud", 3, 5), ("cloud", 0, 40), ("cloud", 0, -1)],
                         ids=["outside-cloud-mode", "wrong-step", "past-the-vocabulary", "negative"])
def test_misplaced_tokens_frame_is_a_protocol_error_and_the_device_goes_on_alone(mode, step, token):
    from dragon_core import messages as m

    config = make_config(mode=mode, scheduling=False, vocab_size=40)
    sess = s.Session("device", config, 0.3)
    first = sess.handle(s.Start())
    assert any(isinstance(a, s.ComputeDist) for a in first) == (mode != "cloud")
    actions = sess.handle(s.PeerMessage(m.Tokens(1, step, [token])))
    errors = [a.msg for a in actions if isinstance(a, s.Send) and isinstance(a.msg, m.Error)]
    assert errors and errors[0].code == "protocol_error"
    assert sess.degraded and sess.committed == [] and sess.finished is None


def test_cloud_only_device_commits_tokens_and_stops_at_eos():
    from dragon_core import messages as m

    sess = s.Session("device", make_config(mode="cloud"), 0.3)
    assert sess.handle(s.Start()) == []  # nothing to compute: no ComputeDist
    acts = sess.handle(s.PeerMessage(m.Tokens(1, 0, [7, 8])))
    assert [a for a in acts if isinstance(a, s.Commit)] == [s.Commit(0, (7,)), s.Commit(1, (8,))]
    acts = sess.handle(s.PeerMessage(m.Tokens(1, 2, [EOS, 9])))  # anything after EOS is ignored
    assert sess.committed == [7, 8, EOS] and sess.finished == s.Finish("eos")
    assert not any(isinstance(a, (s.ComputeDist, s.Send)) for a in acts)


# ---------------------------------------------------------------------------- the draft window
def test_draft_window_covers_one_round_trip_within_its_floor_and_cap():
    from dragon_core.scheduler import MIN_WINDOW, WINDOW_SLACK, Estimates, draft_window

    est = Estimates()
    assert draft_window(est, 32) == MIN_WINDOW  # nothing measured yet: the fixed depth
    assert draft_window(est, 4) == 4  # a request's smaller cap always wins
    est.rtt.update(300.0)
    est.c_local.update(5.0)
    assert draft_window(est, 32) == MIN_WINDOW  # only one side's pace known: 300/5 is not the pace
    est.c_remote.update(26.0)  # the slower side sets the commit pace
    assert draft_window(est, 32) == -(-300 // 26) + WINDOW_SLACK == 15
    assert draft_window(est, 12) == 12
    assert draft_window(est, 4) == 4
    est.rtt.value = 1.0  # a fast link needs no more than the floor
    assert draft_window(est, 32) == MIN_WINDOW


@pytest.mark.parametrize("aggregator", ["device", "cloud"])
def test_a_window_that_covers_the_round_trip_keeps_the_pipeline_full(aggregator):
    """Sides that always agree, RTT 300 ms, a 26 ms device and a 5 ms cloud: with the window
    (cap 32) tokens come at the device's pace; a fixed depth of 8 stalls every round trip
    (8 drafts cover 208 ms < 300 ms). Exact either way."""
    def run(max_depth):
        config = make_config(max_tokens=60, eos_ids=frozenset(), mode="dragon", aggregator=aggregator,
                             scheduling=False, max_depth=max_depth)
        dev, cloud = sides(0, disagreement=0.0, c_dev=26.0, c_cloud=5.0)
        pair = SimulatedPair(config, dev, cloud, *links(300.0, 3)).run()
        assert pair.device.record.tokens == centralized_decode(config, dev, cloud)
        times = [t for t, _ in pair.device.record.commits]
        return (times[-1] - times[10]) / (len(times) - 11)  # the steady state, after the first round trips

    windowed, fixed = run(32), run(8)
    assert windowed < 26.0 * 1.15, windowed
    assert fixed > 300.0 / 8 * 0.9, fixed
