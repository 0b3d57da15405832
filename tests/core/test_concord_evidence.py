"""The cloud's CONCORD evidence from per-document top-K lists (``dragon_core.concord_evidence``,
issue 14 item 2) is never violated by the full-vocabulary mixture it stands for: before the wire,
after it (float16 both ways), after a supplement; a token certified from it is the dense argmax of
the full mixture; a request it cannot settle is said so (the cloud answers dense)."""

from __future__ import annotations

import numpy as np
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from dragon_core import codec
from dragon_core import concord_wire as cw
from dragon_core.certificate import certify
from dragon_core.concord_evidence import stream_bounds, stream_evidence, stream_supplement
from dragon_core.dist import Dist

PROPERTY = settings(deadline=None, max_examples=500,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])


def _row(draw, vocab: int) -> np.ndarray:
    """One document's full distribution: random, peaked, tied, float16-edge, with zeros."""
    kind = draw(st.sampled_from(["random", "peaked", "ties", "fp16-edge", "zeros", "softmax"]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    if kind == "ties":
        raw = rng.integers(0, 3, vocab).astype(np.float64)
    elif kind == "fp16-edge":
        base = float(np.float16(draw(st.floats(1e-6, 0.5))))
        raw = base * (1 + rng.integers(0, 3, vocab) * 2.0 ** -10)
    elif kind == "zeros":
        raw = rng.random(vocab) * (rng.random(vocab) < 0.3)
    elif kind == "softmax":  # a language model's shape: a few likely ids, a long tail
        raw = np.exp(rng.normal(0, draw(st.sampled_from([1.0, 4.0, 12.0])), vocab))
    else:
        raw = rng.random(vocab)
        if kind == "peaked":
            raw[rng.integers(vocab)] += 50.0
    assume(raw.sum() > 0)
    return raw / raw.sum()


@st.composite
def clouds(draw):
    vocab = draw(st.integers(2, 60))
    k = draw(st.integers(1, 4))
    rows = np.array([_row(draw, vocab) for _ in range(k)])
    scores = np.array([draw(st.floats(-5.0, 5.0)) for _ in range(k)])
    top_k = draw(st.integers(1, vocab))
    with np.errstate(divide="ignore"):
        dists = [Dist.top_k(np.log(row), top_k) for row in rows]  # what the engine reports
    w = np.exp(scores - scores.max())
    truth = (w / w.sum()) @ rows
    return vocab, dists, scores, truth


def _holds(ids, lo, hi, tail, truth):
    """The bounds hold for the true mixture, of which ``truth`` is a float64 rounding (a few ulps
    either way: a mixture sure of one id computes to 1 + 2e-16), hence the 1e-13 relative slack;
    the bounds' own slack is far larger than that and far smaller than float16's."""
    unlisted = np.setdiff1d(np.arange(truth.size), ids)
    t_lo, t_hi = truth * (1 - 1e-13), truth * (1 + 1e-13)
    return (np.all(lo <= t_hi[ids]) and np.all(t_lo[ids] <= hi) and np.all(t_lo[unlisted] <= tail))


@PROPERTY
@given(clouds(), st.data())
def test_stream_evidence_is_never_violated_by_the_full_vocabulary_mixture(cloud, data):
    vocab, dists, scores, truth = cloud
    bounds = stream_bounds(dists, scores)
    assert _holds(bounds.ids, bounds.lo, bounds.hi, bounds.outside, truth)  # before any rounding
    frame, listed = stream_evidence(1, 0, bounds, data.draw(st.integers(0, vocab)), 0.0)
    held = cw.bounds_from_wire(codec.decode(codec.encode(frame)))
    assert _holds(held.ids, held.lo, held.hi, held.tail, truth)
    theta = data.draw(st.floats(1e-9, 1.0))
    reply = stream_supplement(1, 0, bounds, theta, listed)
    if reply is None:
        assert bounds.outside >= theta  # only an id outside every list could still reach θ
        return
    merged = cw.merge(held, cw.bounds_from_wire(codec.decode(codec.encode(reply[0]))), theta)
    assert _holds(merged.ids, merged.lo, merged.hi, merged.tail, truth) and merged.tail <= theta


@PROPERTY
@given(clouds(), st.data())
def test_a_token_certified_from_stream_evidence_is_the_full_mixtures_dense_argmax(cloud, data):
    vocab, dists, scores, truth = cloud
    pd = _row(data.draw, vocab)
    if data.draw(st.booleans()):
        pd = truth.copy()  # exact ties of the dense scores
    eta_c = data.draw(st.sampled_from([0.5, 0.2, 0.8]))
    want = int(np.argmax((1 - eta_c) * pd + eta_c * truth))
    bounds = stream_bounds(dists, scores)
    frame, listed = stream_evidence(1, 0, bounds, data.draw(st.integers(0, 3)), 0.0)
    held = cw.bounds_from_wire(frame)
    for _ in range(vocab + 2):
        verdict = certify(pd, 1 - eta_c, eta_c, held)
        if verdict.token is not None:
            assert verdict.token == want
            return
        if verdict.dense:
            return
        reply = stream_supplement(1, 0, bounds, verdict.theta, listed)
        if reply is None:
            return  # the cloud answers dense
        held = cw.merge(held, cw.bounds_from_wire(reply[0]), verdict.theta)
        listed = reply[1]
    raise AssertionError("asking did not end")


def test_a_peaked_language_model_certifies_from_one_entry_of_per_stream_top_20():
    """The case CONCORD is for: the streams agree on a clear favourite."""
    rng = np.random.default_rng(0)
    vocab = 2000
    rows = []
    for _ in range(3):
        z = rng.normal(0, 2.0, vocab)
        z[42] += 12.0
        rows.append(z)
    dists = [Dist.top_k(z, 20) for z in rows]
    bounds = stream_bounds(dists, [1.0, 0.5, 0.2])
    frame, _ = stream_evidence(1, 5, bounds, 1, None)
    pd = np.full(vocab, 0.5 / (vocab - 1))
    pd[42] = 0.5
    assert certify(pd, 0.5, 0.5, cw.bounds_from_wire(frame)).token == 42
    assert len(codec.encode(frame)) == 21  # one interval: 5 bytes more than a point (16): its upper end, a nil for log h


def test_bounds_survive_the_float64_rounding_of_their_own_sums():
    """A CI run's case: streams sure of id 0, whose mixture is exactly 1. Both the bound's float64
    sums (1 - 1e-16 before the bounds were widened by their own error) and the reference's
    (1 + 2e-16) round; many random weightings of 2-4 such streams, each must still hold."""
    sure = Dist(vocab_size=3, logprobs=np.array([0.0], dtype=np.float16), ids=np.array([0], dtype=np.int32),
                tail_mass=0.0)
    rng = np.random.default_rng(0)
    for _ in range(3000):
        k = int(rng.integers(2, 5))
        scores = rng.uniform(-5.0, 5.0, k)
        w = np.exp(scores - scores.max())
        truth = (w / w.sum()) @ np.tile([1.0, 0.0, 0.0], (k, 1))
        bounds = stream_bounds([sure] * k, scores)
        assert _holds(bounds.ids, bounds.lo, bounds.hi, bounds.outside, truth), scores
