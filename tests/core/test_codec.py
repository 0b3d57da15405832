"""Wire codec: round trips, bit-identical distributions, malformed and out-of-bounds frames.

Decode as a trust boundary under fuzzing (>= 10,000 frames) is tests/sim/test_codec_fuzz.py.
"""

from __future__ import annotations

import math
import pickle

import msgspec
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from codec_strategies import FUZZ, dists, messages
from dragon_core import codec
from dragon_core import messages as m
from dragon_core.dist import Dist
from dragon_core.errors import FrameTooLarge, InvalidDistribution, MalformedFrame, UnsupportedVersion


def same_probs(a: Dist, b: Dist) -> bool:
    return a.probs().tobytes() == b.probs().tobytes()


# ------------------------------------------------------------------ round trips
@settings(FUZZ, max_examples=600)
@given(messages)
def test_every_message_round_trips(msg):
    frame = codec.encode(msg)
    headed = isinstance(msg, (m.Hello, m.Welcome, m.Error))  # what a peer of another version must read
    assert frame[:3] == b"DG" + bytes([m.PROTOCOL_VERSION]) if headed else isinstance(msgspec.msgpack.decode(frame), list)
    assert codec.decode(codec.HEADER + (frame[3:] if headed else frame)) == msg  # with the header, it reads too
    assert codec.decode(frame) == msg
    assert codec.decode(bytearray(frame)) == msg and codec.decode(memoryview(frame)) == msg


@settings(FUZZ, max_examples=400)
@given(dists(max_vocab=3000))
def test_dist_round_trip_is_bit_identical(d):
    w = codec.dist_to_wire(d)
    back = codec.dist_from_wire(codec.decode(codec.encode(m.Draft(0, 0, 0, 0, w, 0.0))).dist)
    assert back.vocab_size == d.vocab_size and back.is_full == d.is_full
    assert back.logprobs.dtype == d.logprobs.dtype and back.logprobs.tobytes() == d.logprobs.tobytes()
    if not d.is_full:
        assert back.ids.tobytes() == d.ids.tobytes() and back.tail_mass == d.tail_mass
    assert same_probs(back, d)
    assert back.argmax() == d.argmax()


def test_a_received_drafts_distribution_is_converted_once(monkeypatch):
    """decode converts the Draft's distribution to check it; whoever reads it next (the session)
    gets that same Dist, not a second conversion. The frame and equality do not see it."""
    d = Dist.top_k(np.log(np.full(50, 1 / 50)), 5)
    frame = codec.encode(m.Draft(1, 0, 3, 2, codec.dist_to_wire(d), 0.0))
    calls = []
    convert = codec._convert
    monkeypatch.setattr(codec, "_convert", lambda w: calls.append(w) or convert(w))
    msg = codec.decode(frame)
    assert len(calls) == 1
    assert codec.dist_from_wire(msg.dist) is codec.dist_from_wire(msg.dist) and len(calls) == 1
    assert codec.encode(msg) == frame and msg == codec.decode(frame)


def test_full_vocabulary_of_262144_fits_default_frame():
    rng = np.random.default_rng(1)
    d = Dist.full(rng.normal(0, 3, 262_144))
    frame = codec.encode(m.Draft(1, 0, 0, 5, codec.dist_to_wire(d), -0.5))
    assert len(frame) < codec.DEFAULT_MAX_FRAME
    assert same_probs(codec.dist_from_wire(codec.decode(frame).dist), d)


def test_top20_draft_bytes_per_token():
    rng = np.random.default_rng(2)
    d = Dist.top_k(rng.normal(0, 3, 151_936), 20)
    frame = codec.encode(m.Draft(123_456, 7, 1_024, int(d.ids[0]), codec.dist_to_wire(d), -3.25, 41.7))
    print(f"\ntop-20 Draft frame: {len(frame)} bytes per token (distribution payload {d.nbytes()} bytes)")
    assert len(frame) < 300


# ------------------------------------------------------------------ framing errors
def test_oversized_frame_is_refused_before_parsing():
    frame = codec.encode(m.Cancel(1, "x" * 100))
    with pytest.raises(FrameTooLarge):
        codec.decode(frame, max_size=len(frame) - 1)
    assert codec.decode(frame, max_size=len(frame)) == m.Cancel(1, "x" * 100)
    # garbage of any kind is still "too large", i.e. the size is checked first
    for junk in (codec.HEADER + b"\xc1" * (1 << 20), b"XX" + bytes(1 << 20), b"DG\x63" + bytes(1 << 20)):
        with pytest.raises(FrameTooLarge):
            codec.decode(junk, max_size=1 << 10)


@pytest.mark.parametrize("version", [0, 1, 2, 3, 4, 5, 7, 99, 255])
def test_other_protocol_version_is_unsupported(version):
    """A frame of any other version, in the long header every version has had, is refused as
    such: an older peer's Hello, or anything it sends, gets the typed error."""
    frame = b"DG" + bytes([version]) + codec.encode(m.Ping(1, 0.0))
    with pytest.raises(UnsupportedVersion, match=f"version {version}.*supported: {m.PROTOCOL_VERSION}"):
        codec.decode(frame)


def test_a_protocol_5_peers_frames_are_unsupported_and_ours_are_refused_by_it():
    """Protocol 5 wrote b"DG\x05" + msgspec's own msgpack of the struct: we refuse it typed;
    our Hello keeps that long header, so a protocol-5 peer reads our version (6) and refuses it
    typed too (its decoder checks b"DG", then the version byte, as ours does for the long form)."""
    old_ping = b"DG\x05" + msgspec.msgpack.encode(m.Ping(1, 0.0))
    with pytest.raises(UnsupportedVersion, match="version 5"):
        codec.decode(old_ping)
    hello = codec.encode(m.Hello(m.PROTOCOL_VERSION, "m", "f", "t", "r", "s", "tok"))
    assert hello[:3] == b"DG" + bytes([m.PROTOCOL_VERSION]) != b"DG\x05"


def test_a_frame_without_a_header_is_a_msgpack_array_and_nothing_else_reads():
    """Request frames carry no header (the handshake agreed on the version); any first byte
    that is neither b"D" nor a msgpack array's is refused as not a DRAGON frame."""
    body = codec.encode(m.Ping(1, 0.5))
    assert codec.decode(body) == m.Ping(1, 0.5) == codec.decode(codec.HEADER + body)
    for first in set(range(256)) - set(range(0x90, 0xA0)) - {0xDC, 0xDD, ord("D")}:
        with pytest.raises(MalformedFrame):
            codec.decode(bytes([first]) + body[1:])


@settings(FUZZ, max_examples=300)
@given(st.floats(allow_nan=False, allow_infinity=False) | st.floats(width=32, allow_nan=False, allow_infinity=False)
       | st.integers(-2**53, 2**53).map(float))
def test_floats_go_as_short_as_they_read_back_exactly(x):
    """An int or a float32 where it holds the value exactly, float64 otherwise; -0.0 stays -0.0."""
    frame = codec.encode(m.Ping(1, x))
    back = codec.decode(frame).sent_at
    assert back == x and math.copysign(1.0, back) == math.copysign(1.0, x)
    if x == int(x) and abs(x) < 128 and math.copysign(1.0, x) > 0:
        assert len(frame) == 4  # array, tag, nonce, then the float as a one-byte int
    assert len(frame) <= 1 + 1 + 1 + 9


def test_trailing_defaults_are_left_off_and_restored():
    short = codec.encode(m.Opened(1))  # sources, passages, scores: all empty
    assert len(short) == 3 and codec.decode(short) == m.Opened(1)
    # a field equal in value but of another kind is not its default: it goes, and reads back as typed
    assert codec.decode(codec.encode(m.Open(1, "q", 2, 8, 0, concord_debt_max=4))).concord_debt_max == 4.0


@pytest.mark.parametrize("data", [b"", b"D", b"DG", b"GD\x01\x80", b"\x00garbage\xff", codec.HEADER,
                                  codec.HEADER + b"\xc1", codec.HEADER + b"\x80", codec.HEADER + b"\x81\xa4type\xa5bogus",
                                  codec.HEADER + msgspec.msgpack.encode({"type": "ping", "nonce": "1", "sent_at": 0.0}),
                                  codec.HEADER + msgspec.msgpack.encode({"type": "ping", "nonce": 1}),
                                  codec.HEADER + msgspec.msgpack.encode([1, 2, 3])])
def test_malformed_frames(data):
    with pytest.raises(MalformedFrame):
        codec.decode(data)


def test_trailing_bytes_and_pickles_are_malformed():
    frame = codec.encode(m.Ping(1, 0.0))
    with pytest.raises(MalformedFrame):
        codec.decode(frame + b"\x00")
    with pytest.raises(MalformedFrame):
        codec.decode(pickle.dumps(m.Ping(1, 0.0)))
    with pytest.raises(MalformedFrame):
        codec.decode(frame[:3] + pickle.dumps(m.Ping(1, 0.0)))


@pytest.mark.parametrize("data", [None, "DG\x01", 12, 1.5, [1, 2], object()])
def test_non_bytes_input_is_malformed(data):
    with pytest.raises(MalformedFrame):
        codec.decode(data)


def test_encode_refuses_non_messages():
    with pytest.raises(TypeError):
        codec.encode(m.Sampling())
    with pytest.raises(TypeError):
        codec.encode({"type": "ping", "nonce": 1, "sent_at": 0.0})


# ------------------------------------------------------------------ semantic bounds
def body(msg: m.Message, **changes) -> bytes:
    """A frame of ``msg`` with fields overwritten at the msgpack level (bypassing the structs)."""
    for key, value in changes.items():  # nested structs (sampling) are given as dicts of changes
        if isinstance(value, dict):
            changes[key] = msgspec.structs.replace(getattr(msg, key), **value)
    # msgspec does not validate on construction, so replace() can build out-of-bounds messages
    return codec.HEADER + msgspec.msgpack.encode(msgspec.structs.replace(msg, **changes))  # the long header reads too


GOOD_OPEN = m.Open(1, "q", k=3, max_tokens=8, seed=0)
GOOD_DRAFT = m.Draft(1, 0, 0, 0, codec.dist_to_wire(Dist.top_k(np.log([0.5, 0.3, 0.2]), 2)), -1.0, 2.0)
GOOD_TARGET = m.Target(1, 0, 0, True, 0, 0)
GOOD_OPENED = m.Opened(1, ["lyon.txt#0", "rome.txt#3"], ["Lyon is ...", "Rome is ..."], [0.61, 0.42])
GOOD_TOKENS = m.Tokens(1, 4, [17, 2])


@pytest.mark.parametrize("frame", [
    body(GOOD_OPEN, request_id=-1), body(GOOD_OPEN, k=0), body(GOOD_OPEN, max_tokens=0),
    body(GOOD_OPEN, max_depth=-1), body(GOOD_OPEN, dist_top_k=-5), body(GOOD_OPEN, mode="other"),
    body(GOOD_OPEN, sampling={"temperature": 0.0}), body(GOOD_OPEN, sampling={"temperature": math.inf}),
    body(GOOD_OPEN, sampling={"top_p": 0.0}), body(GOOD_OPEN, sampling={"top_p": math.nan}),
    body(GOOD_OPEN, sampling={"top_k": -1}),
    body(GOOD_DRAFT, step=-1), body(GOOD_DRAFT, epoch=-1), body(GOOD_DRAFT, token=-1), body(GOOD_DRAFT, token=3),
    body(GOOD_DRAFT, log_h=math.nan), body(GOOD_DRAFT, log_h=-math.inf), body(GOOD_DRAFT, decode_ms=-1.0),
    body(GOOD_DRAFT, request_id=None), body(GOOD_TARGET, recipient_epoch=-1), body(GOOD_TARGET, sender_epoch=-2),
    body(GOOD_TARGET, sender_decode_ms=math.inf), body(GOOD_TARGET, token=-1),
    body(m.Ping(1, 0.0), sent_at=math.nan), body(m.Pong(1, 0.0), nonce=-1),
    body(m.Welcome(1, "s", 1, 1, 1), max_frame_bytes=0), body(m.Error("c", "m", 3), request_id=-3),
    body(GOOD_OPENED, scores=[0.61]), body(GOOD_OPENED, scores=[0.61, math.nan]), body(GOOD_OPENED, passages=[]),
    body(GOOD_TOKENS, tokens=[]), body(GOOD_TOKENS, tokens=[3, -1]), body(GOOD_TOKENS, tokens=[codec.MAX_VOCAB]),
    body(GOOD_TOKENS, step=-1),
])
def test_semantic_bounds_are_enforced(frame):
    with pytest.raises(MalformedFrame):
        codec.decode(frame)


def test_good_bodies_built_the_same_way_decode():
    for msg in (GOOD_OPEN, GOOD_DRAFT, GOOD_TARGET, GOOD_OPENED, GOOD_TOKENS):
        assert codec.decode(body(msg)) == msg


def test_extended_opened_round_trips_and_old_opened_frames_still_decode():
    """DRCG/Text: Opened carries the public passages' text and scores, bit for bit; an Opened
    without them (the other modes, or an older cloud) decodes with both lists empty."""
    back = codec.decode(codec.encode(GOOD_OPENED))
    assert back == GOOD_OPENED and back.passages == ["Lyon is ...", "Rome is ..."] and back.scores == [0.61, 0.42]
    old = codec.HEADER + msgspec.msgpack.encode([m.Opened.__struct_config__.tag, 7, ["a#1"]])  # array_like: tag, then fields
    assert codec.decode(old) == m.Opened(7, ["a#1"]) and codec.decode(old).passages == []
    assert codec.decode(codec.encode(m.Open(1, "q", 2, 8, 0, mode="text"))).mode == "text"
    assert codec.decode(codec.encode(GOOD_TOKENS)) == GOOD_TOKENS


# ------------------------------------------------------------------ malformed distributions
def f16(*x) -> bytes:
    return np.array(x, dtype="<f2").tobytes()


def i32(*x) -> bytes:
    return np.array(x, dtype="<i4").tobytes()


BAD_WIRE = {
    "odd logprob bytes": m.WireDist(4, f16(-1.0, -2.0)[:-1], i32(0, 1)),
    "odd id bytes": m.WireDist(4, f16(-1.0, -2.0), i32(0, 1)[:-1]),
    "no ids": m.WireDist(4, b"", b""),
    "length mismatch": m.WireDist(4, f16(-1.0, -2.0, -3.0), i32(0, 1)),
    "id out of range": m.WireDist(4, f16(-1.0, -2.0), i32(0, 4)),
    "negative id": m.WireDist(4, f16(-1.0, -2.0), i32(-1, 1)),
    "duplicate ids": m.WireDist(4, f16(-1.0, -2.0), i32(1, 1)),
    "NaN log-prob": m.WireDist(4, f16(-1.0, np.nan), i32(0, 1)),
    "positive log-prob": m.WireDist(4, f16(0.5, -2.0), i32(0, 1)),
    "more ids than vocab": m.WireDist(1, f16(-1.0, -2.0), i32(0, 1)),
    "tail mass off": m.WireDist(4, f16(-1.0, -2.0), i32(0, 1), tail_mass=0.9),
    "tail mass NaN": m.WireDist(4, f16(-1.0, -2.0), i32(0, 1), tail_mass=math.nan),
    "tail mass negative": m.WireDist(4, f16(-1.0, -2.0), i32(0, 1), tail_mass=-0.1),
    "zero vocab": m.WireDist(0, b""),
    "negative vocab": m.WireDist(-4, f16(-1.0), i32(0)),
    "absurd vocab": m.WireDist(1 << 40, f16(-1.0), i32(0), tail_mass=1 - math.exp(-1.0)),
    "full length mismatch": m.WireDist(3, np.zeros(2, "<f4").tobytes()),
    "full odd bytes": m.WireDist(1, b"\x00\x00\x00"),
    "full NaN": m.WireDist(2, np.array([0.0, np.nan], "<f4").tobytes()),
    "full all -inf": m.WireDist(2, np.array([-np.inf, -np.inf], "<f4").tobytes()),
    "full positive": m.WireDist(2, np.array([0.1, -1.0], "<f4").tobytes()),
}
VALUE_LEVEL = {"id out of range", "negative id", "duplicate ids", "NaN log-prob", "positive log-prob",
               "full NaN", "full all -inf", "full positive"}


@pytest.mark.parametrize("name", sorted(BAD_WIRE))
def test_malformed_wire_dist_is_malformed_frame(name):
    w = BAD_WIRE[name]
    with pytest.raises(MalformedFrame) as err:
        codec.dist_from_wire(w)
    if name in VALUE_LEVEL:  # the distribution's own validation is kept as the cause
        assert isinstance(err.value.__cause__, InvalidDistribution)
    with pytest.raises(MalformedFrame):  # and a Draft carrying it never gets past decode
        codec.decode(body(m.Draft(1, 0, 0, 0, w, 0.0)))


def test_dist_to_wire_refuses_non_canonical_dtypes():
    d = Dist.top_k(np.log([0.5, 0.3, 0.2]), 2)
    with pytest.raises(InvalidDistribution):
        codec.dist_to_wire(Dist(3, d.logprobs.astype(np.float32), d.ids, d.tail_mass))
    with pytest.raises(InvalidDistribution):
        codec.dist_to_wire(Dist(3, np.log([0.5, 0.3, 0.2])))  # float64 full vector
