"""CONCORD's frames fuzzed (``messages.Evidence``, ``messages.EvidenceRequest``, the ``Open``'s
concord settings): ~5,000 mutated valid frames and hostile field values give a message that
survives re-encoding and reads back as evidence, or a typed ``CodecError``, nothing else. The
strategies are ``tests/concord_strategies.py``'s."""

from __future__ import annotations

import math

import msgspec
from hypothesis import given, settings
from hypothesis import strategies as st

from codec_strategies import mutated
from concord_strategies import FUZZ, concord_messages, decode_checked
from dragon_core import codec
from dragon_core import messages as m


mutated_frames = mutated(concord_messages.map(codec.encode), ("flip", "byte", "truncate", "insert", "delete"))


@settings(FUZZ, max_examples=3000)
@given(mutated_frames)
def test_fuzz_mutated_concord_frames_give_only_typed_errors(data):
    decode_checked(data)


hostile = st.sampled_from([-1, 0, 2**64 - 1, math.nan, math.inf, -math.inf, 1e308, b"", b"\xff" * 7,
                           b"\x00" * 6, "", None, [], {}])


@settings(FUZZ, max_examples=2000)
@given(st.sampled_from([t.__struct_config__.tag for t in (m.Evidence, m.EvidenceRun, m.EvidenceRequest)]), st.lists(hostile | st.binary(max_size=12) | st.floats() | st.integers(-9, 9),
                                                 max_size=8))
def test_fuzz_concord_schema_with_hostile_fields(tag, fields):
    decode_checked(codec.HEADER + msgspec.msgpack.encode([tag, *fields]))


