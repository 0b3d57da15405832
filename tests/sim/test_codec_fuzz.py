"""Wire codec fuzzing: decode as a trust boundary (moved from tests/core/test_codec.py: these
take tens of seconds, the core layer seconds).

The fuzz tests (>= 10,000 frames in all) check one property: for any bytes, ``decode`` returns a
``Message`` or raises a ``CodecError`` — never another exception. A frame that does decode must
re-encode to an equal message (so no NaN or out-of-range value slipped through).
"""

from __future__ import annotations

import math

import msgspec
from hypothesis import event, given, settings
from hypothesis import strategies as st

from codec_strategies import FUZZ, TAGS, frames, messages, msgpack_values, mutated, tagged_dicts
from dragon_core import codec
from dragon_core import messages as m
from dragon_core.errors import CodecError


def decode_checked(frame) -> m.Message | None:
    """The fuzz property: a Message (that survives re-encoding) or a CodecError, nothing else."""
    try:
        msg = codec.decode(frame)
    except CodecError as e:
        event(type(e).__name__)  # --hypothesis-show-statistics shows how deep the fuzzing gets
        return None
    event(f"decoded {type(msg).__name__}")
    assert isinstance(msg, m.Message.__args__)
    assert codec.decode(codec.encode(msg)) == msg
    if isinstance(msg, m.Draft):
        codec.dist_from_wire(msg.dist)
    return msg


# ------------------------------------------------------------------ fuzzing (>= 10,000 frames)
@settings(FUZZ, max_examples=2500)
@given(st.binary(max_size=400) | st.binary(max_size=400).map(lambda b: codec.HEADER + b))
def test_fuzz_random_bytes(data):
    decode_checked(data)


mutated_frames = mutated(frames)


@settings(FUZZ, max_examples=4000)
@given(mutated_frames)
def test_fuzz_mutated_valid_frames(data):
    decode_checked(data)


@settings(FUZZ, max_examples=1500)
@given(msgpack_values | tagged_dicts)
def test_fuzz_valid_msgpack_wrong_schema(value):
    decode_checked(codec.HEADER + msgspec.msgpack.encode(value))


@st.composite
def schema_mutations(draw) -> bytes:
    """Valid message dicts with fields deleted, retyped or given hostile values, or a wrong tag."""
    msg = draw(messages)
    d = msgspec.to_builtins(msg, builtin_types=(bytes,))  # array_like: [tag, field, ...]
    target = d[1 + msg.__struct_fields__.index("dist")] if isinstance(msg, m.Draft) and draw(st.booleans()) else d
    for _ in range(draw(st.integers(1, 3))):
        if not target:
            break
        key = draw(st.integers(0, len(target) - 1))
        op = draw(st.sampled_from(["delete", "random", "hostile", "retag"]))
        if op == "delete":
            target.pop(key)
        elif op == "random":
            target[key] = draw(msgpack_values)
        elif op == "hostile":
            target[key] = draw(st.sampled_from([-1, 0, 2**64 - 1, -(2**63), math.nan, math.inf, -math.inf,
                                                1e308, b"", b"\xff" * 7, "", None, [], {}]))
        else:
            d[0] = draw(st.sampled_from(TAGS) | st.text(max_size=8))
    return codec.HEADER + msgspec.msgpack.encode(d)


@settings(FUZZ, max_examples=2500)
@given(schema_mutations())
def test_fuzz_schema_mutations(data):
    decode_checked(data)
