"""CONCORD's frames fuzzed (``messages.Evidence``, ``messages.EvidenceRequest``, the ``Open``'s
concord settings): ~5,000 mutated valid frames and hostile field values give a message that
survives re-encoding and reads back as evidence, or a typed ``CodecError``, nothing else. The
strategies are ``tests/concord_strategies.py``'s."""

from __future__ import annotations

import math

import msgspec
from hypothesis import given, settings
from hypothesis import strategies as st

from concord_strategies import FUZZ, concord_messages, decode_checked
from dragon_core import codec


@st.composite
def mutated_frames(draw) -> bytes:
    frame = bytearray(codec.encode(draw(concord_messages)))
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "byte", "truncate", "insert", "delete"]))
        i = draw(st.integers(0, max(0, len(frame) - 1)))
        if op == "flip" and frame:
            frame[i] ^= 1 << draw(st.integers(0, 7))
        elif op == "byte" and frame:
            frame[i] = draw(st.integers(0, 255))
        elif op == "truncate":
            del frame[i:]
        elif op == "insert":
            frame[i:i] = draw(st.binary(min_size=1, max_size=8))
        elif op == "delete":
            del frame[i:i + draw(st.integers(1, 8))]
    return bytes(frame)


@settings(FUZZ, max_examples=3000)
@given(mutated_frames())
def test_fuzz_mutated_concord_frames_give_only_typed_errors(data):
    decode_checked(data)


hostile = st.sampled_from([-1, 0, 2**64 - 1, math.nan, math.inf, -math.inf, 1e308, b"", b"\xff" * 7,
                           b"\x00" * 6, "", None, [], {}])


@settings(FUZZ, max_examples=2000)
@given(st.sampled_from(["ev", "ask"]), st.lists(hostile | st.binary(max_size=12) | st.floats() | st.integers(-9, 9),
                                                 max_size=8))
def test_fuzz_concord_schema_with_hostile_fields(tag, fields):
    decode_checked(codec.HEADER + msgspec.msgpack.encode([tag, *fields]))


