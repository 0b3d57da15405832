"""CONCORD's frames (``messages.Evidence``, ``messages.EvidenceRequest``, the ``Open``'s concord
settings; ``dragon_core.concord_wire``): round trips, bounds, and the evidence a frame proves never
violated by the cloud's mixture it came from; through the wire, a certified token is always the
dense argmax (ties and float16 edges included). The frames' fuzzing is in
``tests/sim/test_concord_fuzz.py`` (tests/core stays fast)."""

from __future__ import annotations

import math

import msgspec
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from concord_strategies import FUZZ, VOCAB, concord_messages, probs
from dragon_core import codec
from dragon_core import concord_wire as cw
from dragon_core import messages as m
from dragon_core.certificate import certify, dense_argmax
from dragon_core.errors import MalformedFrame, ProtocolError
from dragon_core.request import RequestSpec

# ------------------------------------------------------------------ round trips and sizes
@settings(FUZZ, max_examples=400)
@given(concord_messages)
def test_concord_messages_round_trip(msg):
    assert codec.decode(codec.encode(msg)) == msg


def test_one_entry_evidence_is_16_bytes_a_one_step_run_11_and_the_first_frame_carries_log_h():
    p = np.array([0.7, 0.2, 0.1])
    first, _ = cw.first_evidence(7, 0, p, 1, log_h=1.25)
    assert codec.decode(codec.encode(first)).log_h == 1.25
    for step, size in ((100, 16), (300, 18)):  # msgpack: steps past 127 take two bytes more
        later, _ = cw.first_evidence(7, step, p, 1, log_h=None)
        assert len(codec.encode(later)) == size  # no header, no bytes for the unset log h, upper, dist
        assert len(codec.encode(cw.pack_run([later]))) == size - 5  # id 0: a 1-byte varint (not 4), one byte string
    assert len(codec.encode(m.EvidenceRequest(7, 300, 0.0123))) == 15
    assert len(codec.encode(m.EvidenceRequest(7, 300, float(np.float32(0.0123))))) == 11  # a float32 θ: 5 bytes


def test_a_concord_open_leaves_off_what_the_cloud_does_not_need():
    """The SDK's CONCORD request: its settings after dist_top_k are at their defaults (left off),
    greedy sampling is the default, and a concord Open carries no scheduler prior."""
    prior = m.SchedulerPrior(28.3, 7.9, 101.2, 0.8, 0.9)
    spec = RequestSpec(query="who wrote the iliad", k=2, max_tokens=20, seed=0, mode="concord", max_depth=32,
                       dist_top_k=32, prior=prior)
    msg = spec.to_open(3)
    assert msg.prior is None and codec.decode(codec.encode(msg)) == msg
    assert len(codec.encode(msg)) == 1 + 1 + 1 + 20 + 3 + 8 + 2  # array, tag, id, query, k/max/seed, mode, depth/top-k
    dragon = RequestSpec(query="q", k=2, max_tokens=20, seed=0, prior=prior).to_open(3)
    assert dragon.prior == prior and codec.decode(codec.encode(dragon)) == dragon  # DRAGON's scheduler reads it


def test_open_carries_the_concord_settings_and_refuses_bad_ones():
    good = m.Open(1, "q", 2, 16, 0, mode="concord", concord_top_m=2, concord_debt_max=-math.inf)
    assert codec.decode(codec.encode(good)) == good
    bad = [m.Open(1, "q", 2, 16, 0, concord_top_m=-1), m.Open(1, "q", 2, 16, 0, concord_top_m=cw.MAX_TOP_M + 1),
           m.Open(1, "q", 2, 16, 0, concord_debt_max=math.nan),
           m.Open(1, "q", 2, 16, 0, mode="concord", sampling=m.Sampling(False, 0.7))]
    for msg in bad:
        with pytest.raises(MalformedFrame):
            codec.decode(codec.encode(msg))


def _raw(**fields) -> bytes:
    base = dict(request_id=1, step=0, ids=np.array([3], "<i4").tobytes(),
                values=np.array([0.5, 0.25], "<f2").tobytes(), log_h=None, upper=None, dist=None)
    base.update(fields)
    return codec.HEADER + msgspec.msgpack.encode(["ev", *base.values()])


@pytest.mark.parametrize("fields", [
    dict(ids=b"\x01\x00\x00"),  # not whole int32s
    dict(values=np.array([0.5], "<f2").tobytes()),  # no tail
    dict(values=np.array([0.5, 0.25, 0.1], "<f2").tobytes()),  # one value too many
    dict(ids=np.array([3, 3], "<i4").tobytes(), values=np.array([0.5, 0.2, 0.1], "<f2").tobytes()),  # an id twice
    dict(ids=np.array([-1], "<i4").tobytes()),
    dict(ids=np.array([codec.MAX_VOCAB], "<i4").tobytes()),
    dict(values=np.array([1.5, 0.25], "<f2").tobytes()),  # a probability above 1
    dict(values=np.array([0.5, -0.25], "<f2").tobytes()),  # a negative tail
    dict(values=np.array([np.nan, 0.25], "<f2").tobytes()),
    dict(values=np.array([np.inf, 0.25], "<f2").tobytes()),
    dict(upper=np.array([0.25], "<f2").tobytes()),  # upper end below the lower end
    dict(upper=np.array([0.6, 0.7], "<f2").tobytes()),  # one upper too many
    dict(log_h=math.inf), dict(step=-1), dict(request_id=-5),
    dict(dist=[10, b"\x00" * 3, None, 0.0]),  # a dense reply that is not a distribution
])
def test_evidence_bounds_are_enforced(fields):
    with pytest.raises(MalformedFrame):
        codec.decode(_raw(**fields))


def test_evidence_request_theta_must_be_finite():
    for theta in (math.nan, math.inf, -math.inf):
        with pytest.raises(MalformedFrame):
            codec.decode(codec.encode(m.EvidenceRequest(1, 0, theta)))


def test_evidence_ids_outside_the_devices_vocabulary_are_a_protocol_error():
    frame, _ = cw.first_evidence(1, 0, np.array([0.1, 0.2, 0.7]), 1, None)
    with pytest.raises(ProtocolError, match="vocabulary"):
        cw.bounds_from_wire(frame, vocab_size=2)


# ------------------------------------------------------------------ soundness through the wire
def _assert_proves_the_truth(frame_bounds, p):
    assert np.all(frame_bounds.lo <= p[frame_bounds.ids]) and np.all(p[frame_bounds.ids] <= frame_bounds.hi)
    unlisted = np.setdiff1d(np.arange(p.size), frame_bounds.ids)
    assert np.all(p[unlisted] <= frame_bounds.tail)


@settings(FUZZ, max_examples=800)
@given(st.data())
def test_evidence_read_off_the_wire_is_never_violated_by_the_clouds_mixture(data):
    p = probs(data.draw, VOCAB)
    frame, listed = cw.first_evidence(1, 0, p, data.draw(st.integers(0, VOCAB)), 0.0)
    held = cw.bounds_from_wire(codec.decode(codec.encode(frame)))
    _assert_proves_the_truth(held, p)
    theta = data.draw(st.floats(1e-9, 1.0))
    reply, _ = cw.supplement_evidence(1, 0, p, theta, listed)
    merged = cw.merge(held, cw.bounds_from_wire(codec.decode(codec.encode(reply))), theta)
    _assert_proves_the_truth(merged, p)
    assert merged.tail <= theta


@settings(FUZZ, max_examples=500)
@given(st.data())
def test_through_the_wire_a_certified_token_is_the_dense_argmax_and_asking_ends_on_it(data):
    """The device's loop over real frames: certify, ask for θ, merge, ..., dense last."""
    pd, pc = probs(data.draw, VOCAB), probs(data.draw, VOCAB)
    if data.draw(st.booleans()):
        pc = pd.copy()  # the two sides' dense scores tie exactly
    eta_c = data.draw(st.sampled_from([0.5, 0.2, 0.8, data.draw(st.floats(0.01, 0.99))]))
    eta_d = 1.0 - eta_c
    want = dense_argmax(pd, pc, eta_d, eta_c)
    frame, listed = cw.first_evidence(1, 0, pc, data.draw(st.integers(0, VOCAB)), 0.0)
    held = cw.bounds_from_wire(codec.decode(codec.encode(frame)))
    for _ in range(VOCAB + 2):
        verdict = certify(pd, eta_d, eta_c, held)
        if verdict.token is not None:
            assert verdict.token == want
            return
        if verdict.dense:
            return  # the dense mixture decides: the reference itself
        reply, listed = cw.supplement_evidence(1, 0, pc, verdict.theta, listed)
        held = cw.merge(held, cw.bounds_from_wire(codec.decode(codec.encode(reply))), verdict.theta)
    raise AssertionError("asking did not end")


def test_an_exact_tie_never_certifies():
    p = np.array([0.4, 0.4, 0.2])
    frame, _ = cw.first_evidence(1, 0, p, 3, 0.0)
    verdict = certify(p, 0.5, 0.5, cw.bounds_from_wire(frame))
    assert verdict.token is None


def test_merge_refuses_an_id_listed_twice():
    p = np.array([0.5, 0.3, 0.2])
    frame, _ = cw.first_evidence(1, 0, p, 2, 0.0)
    held = cw.bounds_from_wire(frame)
    with pytest.raises(ProtocolError):
        cw.merge(held, held, 0.1)


def test_evidence_computed_ahead_names_its_chain_and_the_codec_checks_it():
    p = np.array([0.7, 0.2, 0.1])
    ahead, _ = cw.first_evidence(7, 100, p, 1, log_h=None, chain=(98, 40_000))
    back = codec.decode(codec.encode(ahead))
    assert back.chain == (98, 40_000) and cw.chain_basis(back) == 98
    assert len(codec.encode(ahead)) == 16 + 8  # basis and prev, and the three nils before them
    for chain in ((100, 1), (-1, 1), (5, -1), (5, 1 << 23)):
        with pytest.raises(MalformedFrame, match="chain"):
            codec.decode(codec.encode(m.Evidence(7, 100, ahead.ids, ahead.values, chain=chain)))


# ------------------------------------------------------------------ runs of evidence ahead
@settings(FUZZ, max_examples=300)
@given(st.data())
def test_a_run_reads_back_as_the_frames_it_packs(data):
    """``pack_run`` then the wire then ``unpack_run`` gives the one-entry frames, chains included,
    that the cloud would have sent one by one."""
    n = data.draw(st.integers(2, 12))
    step = data.draw(st.integers(1, 4000))
    basis = data.draw(st.integers(0, step))
    chain = None if basis == step else (basis, data.draw(st.integers(0, VOCAB - 1)))
    frames = []
    for i in range(n):
        prev = chain if i == 0 else (basis, int(np.frombuffer(frames[-1].ids, "<i4")[0]))
        frame, _ = cw.first_evidence(9, step + i, probs(data.draw, VOCAB), 1, None, prev)
        frames.append(frame)
    run = cw.pack_run(frames)
    assert isinstance(run, m.EvidenceRun)
    assert cw.unpack_run(codec.decode(codec.encode(run))) == frames
    assert len(codec.encode(run)) <= 12 + 5 + 5 * n  # 5 bytes a step (ids < 128), against 16-24 for a frame each


def test_only_one_entry_frames_of_the_chain_are_runnable_and_a_single_one_goes_as_a_one_step_run():
    p = np.array([0.1, 0.7, 0.2])
    one, _ = cw.first_evidence(7, 5, p, 1, None, (3, 2))
    assert cw.runnable(one, guess=1) and not cw.runnable(one, guess=2)  # its id must be the guess
    two, _ = cw.first_evidence(7, 5, p, 2, None, (3, 2))
    first, _ = cw.first_evidence(7, 5, p, 1, 0.5, (3, 2))
    assert not cw.runnable(two, guess=1) and not cw.runnable(first, guess=1)  # two entries; log h
    assert cw.unpack_run(codec.decode(codec.encode(cw.pack_run([one])))) == [one]
    later, _ = cw.first_evidence(7, 7, p, 1, None, (3, 1))
    with pytest.raises(ValueError, match="consecutive"):
        cw.pack_run([one, later])


def _entries(*steps: tuple[int, float, float]) -> bytes:
    return b"".join(cw.varint(t) + np.array([p, tail], "<f2").tobytes() for t, p, tail in steps)


def _run_raw(**changes) -> bytes:
    run = m.EvidenceRun(7, 10, _entries((1, 0.5, 0.25), (2, 0.6, 0.3)), (8, 4))
    return msgspec.msgpack.encode(msgspec.structs.replace(run, **changes))  # a request frame: no header


@pytest.mark.parametrize("fields", [
    dict(entries=b""), dict(entries=_entries((1, 0.5, 0.25))[:-1]),  # no step; values cut short
    dict(entries=_entries(*[(1, 0.1, 0.1)] * (cw.MAX_RUN + 1))),  # longer than any window
    dict(entries=b"\x81\x80\x80\x80\x00" + bytes(4)),  # a varint longer than any id needs
    dict(entries=b"\x81\x00" + bytes(4)),  # a varint not in its shortest form
    dict(entries=b"\x81"),  # a varint cut short
    dict(entries=_entries((1, 0.5, 0.25), (codec.MAX_VOCAB, 0.5, 0.25))),
    dict(entries=_entries((1, 0.5, 0.25), (2, 1.5, 0.3))),  # a probability above 1
    dict(entries=_entries((1, 0.5, 1.5), (2, 0.6, 0.3))),  # a tail above 1
    dict(entries=_entries((1, 0.5, np.nan), (2, 0.6, 0.3))),
    dict(chain=(10, 4)), dict(chain=(-1, 4)), dict(chain=(8, codec.MAX_VOCAB)), dict(step=-1),
])
def test_run_bounds_are_enforced(fields):
    codec.decode(_run_raw())  # the unchanged frame is fine
    with pytest.raises(MalformedFrame):
        codec.decode(_run_raw(**fields))


@settings(FUZZ, max_examples=300)
@given(st.floats(-1.0, 1.0) | st.floats(0.0, 1e-30) | st.floats(1e-45, 1e-37))
def test_theta_goes_as_a_float32_at_or_below_it(theta):
    """θ on the wire never exceeds the device's θ (the cloud then lists a superset of the ids that
    can settle the step) and is a float32 whenever θ > 0 has one below it."""
    sent = cw.theta_for_wire(theta)
    assert sent <= theta and (sent > 0) == (theta > 0)
    tiniest = float(np.finfo(np.float32).smallest_subnormal)
    if theta <= 0 or theta < tiniest:  # no positive float32 at or below it: θ goes as it is
        assert theta <= 0 or sent == theta
        return
    assert float(np.float32(sent)) == sent and float(np.nextafter(np.float32(sent), np.float32(np.inf))) > theta
    assert codec.decode(codec.encode(m.EvidenceRequest(1, 2, sent))).theta == sent


@settings(FUZZ, max_examples=500)
@given(st.lists(st.tuples(st.integers(0, codec.MAX_VOCAB - 1), st.floats(0.0, 1.0), st.floats(0.0, 1.0)),
                min_size=1, max_size=cw.MAX_RUN))
def test_run_entries_round_trip_any_id_and_take_one_to_four_bytes_an_id(steps):
    """Any id below MAX_VOCAB: the varint is its shortest form (1 byte below 128, 2 below 16,384,
    3 below 2^21, 4 above) and the run reads back to the same ids and float16 values."""
    run = m.EvidenceRun(1, 5, _entries(*steps))
    back = codec.decode(codec.encode(run))
    assert back == run
    assert [t for t, _ in cw.run_entries(back.entries)] == [t for t, _, _ in steps]
    sizes = [len(cw.varint(t)) for t, _, _ in steps]
    assert sizes == [1 if t < 1 << 7 else 2 if t < 1 << 14 else 3 if t < 1 << 21 else 4 for t, _, _ in steps]
    assert len(run.entries) == sum(sizes) + 4 * len(steps)
