"""Hypothesis strategies for DRAGON messages and frames, shared by the codec's round-trip tests
(tests/core/test_codec.py) and its fuzz tests (tests/sim/test_codec_fuzz.py)."""

from __future__ import annotations

import numpy as np
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

from dragon_core import codec
from dragon_core import messages as m
from dragon_core.dist import Dist

FUZZ = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

# ------------------------------------------------------------------ strategies
u63 = st.integers(0, 2**63 - 1)
small_nat = st.integers(0, 1 << 20)
finite = st.floats(allow_nan=False, allow_infinity=False)
text = st.text(max_size=40)


@st.composite
def dists(draw, max_vocab: int = 600) -> Dist:
    """Random canonical Dists: full or top-K, flat to near one-hot, some ids impossible (-inf)."""
    v = draw(st.integers(1, max_vocab))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    lp = rng.normal(0, draw(st.sampled_from([0.01, 1.0, 5.0, 40.0])), v)
    if v > 1 and draw(st.booleans()):
        lp[rng.random(v) < 0.3] = -np.inf
        lp[rng.integers(v)] = 0.0  # keep one finite entry
    if draw(st.booleans()):
        return Dist.full(lp)
    return Dist.top_k(lp, draw(st.integers(1, v)))


wire_dists = dists().map(codec.dist_to_wire)
sampling = st.builds(m.Sampling, greedy=st.booleans(), temperature=st.floats(1e-3, 10.0),
                     top_k=small_nat, top_p=st.floats(1e-3, 1.0))


@st.composite
def drafts(draw) -> m.Draft:
    w = draw(wire_dists)
    return m.Draft(draw(u63), draw(small_nat), draw(small_nat), draw(st.integers(0, w.vocab_size - 1)), w,
                   draw(finite), draw(st.floats(0, 1e6)))


messages = st.one_of(
    st.builds(m.Hello, protocol_version=small_nat, model=text, model_fingerprint=text, tokenizer_fingerprint=text,
              retriever_fingerprint=text, score_function=text, auth_token=text, client=text),
    st.builds(m.Welcome, protocol_version=small_nat, server=text, max_k=st.integers(1, 1000),
              max_tokens=st.integers(1, 1 << 20), max_frame_bytes=st.integers(1, 1 << 30)),
    st.builds(m.Ping, nonce=u63, sent_at=finite),
    st.builds(m.Pong, nonce=u63, sent_at=finite),
    st.builds(m.Error, code=text, message=text, request_id=st.none() | u63),
    st.builds(m.Open, request_id=u63, query=st.text(max_size=200), k=st.integers(1, 1000),
              max_tokens=st.integers(1, 1 << 20), seed=st.integers(-(2**63), 2**63 - 1), sampling=sampling,
              mode=st.sampled_from(["dragon", "vdrag", "sw", "cloud", "text"]), aggregator=st.sampled_from(["device", "cloud"]),
              scheduling=st.booleans(), max_depth=st.integers(0, 64), dist_top_k=st.integers(0, 1000),
              retrieval=st.booleans()),
    st.builds(m.Opened, request_id=u63, sources=st.lists(text, max_size=5)),
    st.lists(st.tuples(text, st.text(max_size=300), finite), max_size=5).flatmap(
        lambda ps: st.builds(m.Opened, request_id=u63, sources=st.just([n for n, _, _ in ps]),
                             passages=st.just([x for _, x, _ in ps]), scores=st.just([r for _, _, r in ps]))),
    st.builds(m.Tokens, request_id=u63, step=small_nat, tokens=st.lists(st.integers(0, codec.MAX_VOCAB - 1),
                                                                          min_size=1, max_size=8)),
    drafts(),
    st.builds(m.Target, request_id=u63, step=small_nat, token=small_nat, accepted=st.booleans(),
              recipient_epoch=small_nat, sender_epoch=small_nat, handover=st.booleans(),
              sender_decode_ms=st.floats(0, 1e6)),
    st.builds(m.Cancel, request_id=u63, reason=text),
)
frames = messages.map(codec.encode)

# any msgpack-encodable value (ints within msgpack's range, floats incl. NaN/inf)
msgpack_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats() | st.text(max_size=20)
    | st.binary(max_size=40),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=12), inner, max_size=5),
    max_leaves=20,
)
TAGS = ["hello", "welcome", "ping", "pong", "error", "open", "opened", "draft", "target", "tokens", "cancel"]
FIELDS = sorted({f for t in m.Message.__args__ + (m.WireDist, m.Sampling) for f in t.__struct_fields__})
# dicts that look like messages: a real tag and real field names with arbitrary values
tagged_dicts = st.builds(lambda tag, fields: {**fields, "type": tag}, st.sampled_from(TAGS),
                         st.dictionaries(st.sampled_from(FIELDS), msgpack_values, max_size=10))


MUTATIONS = ("flip", "byte", "truncate", "splice", "insert", "delete")


@st.composite
def mutated(draw, valid: st.SearchStrategy, ops: tuple[str, ...] = MUTATIONS) -> bytes:
    """A valid frame from ``valid`` with 1-4 byte-level mutations (the decoder's trust boundary);
    ``splice`` grafts the tail of another valid frame."""
    frame = bytearray(draw(valid))
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(ops))
        i = draw(st.integers(0, max(0, len(frame) - 1)))
        if op == "flip" and frame:
            frame[i] ^= 1 << draw(st.integers(0, 7))
        elif op == "byte" and frame:
            frame[i] = draw(st.integers(0, 255))
        elif op == "truncate":
            del frame[i:]
        elif op == "splice":
            other = draw(valid)
            j = draw(st.integers(0, len(other)))
            frame[i:] = other[j:]
        elif op == "insert":
            frame[i:i] = draw(st.binary(min_size=1, max_size=8))
        elif op == "delete":
            del frame[i:i + draw(st.integers(1, 8))]
    return bytes(frame)
