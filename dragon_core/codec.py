"""Versioned binary frames for every DRAGON message.

A frame is a header + the msgpack body of a ``messages.Message`` (a tagged union, so the body
says which struct it is). ``decode`` is the trust boundary: for any input bytes it returns a
well-formed ``Message`` or raises a ``CodecError`` subclass, never anything else, and it never
evaluates code (no pickle). A decoded ``Draft`` always carries a ``WireDist`` that
``dist_from_wire`` accepts.

Headers (protocol 6). The connection's own frames (``Hello``, ``Welcome``, ``Error``) start
with ``b"DG"`` + the version byte, as every protocol version's frames have: a peer of any older
version reads our first frame as another version and answers with its typed
``UnsupportedVersion``, and we do the same with its frames. Every other frame has no header at
all: it goes only on a connection whose handshake agreed on the version (``connection`` refuses
any frame before it), so a version byte on it would say what both sides know already, and
those frames cross every step (CONCORD: ~1.5 a token, 3 bytes each). ``decode`` tells the two
apart by the first byte: a body is a msgpack array, which never starts with ``b"D"``.

The body is msgpack as msgspec writes the struct (array_like: the tag, then the fields in order)
with two lossless savings (``_wire_fields``): trailing fields equal to their defaults are left off
(msgspec fills them back in), and a float that an int or a float32 holds exactly goes as that
(1-5 bytes, not 9; msgspec reads either into a ``float`` field).
"""

from __future__ import annotations

import dataclasses
import math
import struct
from typing import Any

import msgspec
import numpy as np

from dragon_core import messages as m
from dragon_core.concord_wire import check_concord_open, check_evidence, check_run
from dragon_core.dist import Dist
from dragon_core.errors import FrameTooLarge, InvalidDistribution, MalformedFrame, UnsupportedVersion

MAGIC = b"DG"
HEADER = MAGIC + bytes([m.PROTOCOL_VERSION])  # on connection frames (decode takes it on any frame)
SUPPORTED_VERSIONS = (m.PROTOCOL_VERSION,)
_HEADED_TYPES = (m.Hello, m.Welcome, m.Error)  # what a peer of another version must read as such
# the first byte of a msgpack array (fixarray, array 16, array 32): a frame without a header
_ARRAY_STARTS = frozenset(range(0x90, 0xA0)) | {0xDC, 0xDD}
# A full float32 vector of a 262,144-token vocabulary is 1 MiB; leave room for larger vocabularies.
DEFAULT_MAX_FRAME = 4 << 20
MAX_VOCAB = 1 << 22
# Sender and receiver may round exp() differently by an ulp; anything further is a broken peer.
_TAIL_TOLERANCE = 1e-6

_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(m.Message)
_MESSAGE_TYPES = m.Message.__args__


def encode(msg: m.Message) -> bytes:
    """One frame for ``msg``."""
    if not isinstance(msg, _MESSAGE_TYPES):
        raise TypeError(f"not a DRAGON message: {type(msg).__name__}")
    buf = bytearray(HEADER if isinstance(msg, _HEADED_TYPES) else b"")
    _encoder.encode_into([msg.__struct_config__.tag, *_wire_fields(msg)], buf, len(buf))
    return bytes(buf)


def _wire_fields(value: msgspec.Struct) -> list:
    """A struct's fields as msgpack will write them: nested structs the same way, compact
    floats, and the trailing fields that equal their defaults left off (the decoder restores
    them). Lossless: ``decode(encode(msg)) == msg`` for every message."""
    layout = _layout(type(value))
    fields = [getattr(value, name) for name, _ in layout]
    n = len(fields)
    while n and _is_default(fields[n - 1], layout[n - 1][1]):
        n -= 1
    return [_wire_value(x) for x in fields[:n]]


_NO_DEFAULT = object()
_LAYOUTS: dict[type, tuple[tuple[str, Any], ...]] = {}


def _layout(cls: type) -> tuple[tuple[str, Any], ...]:
    """A struct type's fields in wire order, each with its default (``_NO_DEFAULT``: required)."""
    layout = _LAYOUTS.get(cls)
    if layout is None:
        layout = _LAYOUTS[cls] = tuple((f.name, _default(f)) for f in msgspec.structs.fields(cls))
    return layout


def _default(field: msgspec.structs.FieldInfo) -> Any:
    if field.default is not msgspec.NODEFAULT:
        return field.default
    if field.default_factory is not msgspec.NODEFAULT:
        return field.default_factory()
    return _NO_DEFAULT


def _is_default(value: Any, default: Any) -> bool:
    """Equal and of the same kind (a 0 is not a False, nor -0.0 a 0.0: the decoder must give back
    exactly what was sent)."""
    if default is _NO_DEFAULT or type(value) is not type(default):
        return False
    if isinstance(value, float):
        return value == default and math.copysign(1.0, value) == math.copysign(1.0, default)
    return value == default


def _wire_value(value: Any) -> Any:
    if isinstance(value, msgspec.Struct):
        return _wire_fields(value)
    if isinstance(value, float):
        return _compact_float(value)
    if isinstance(value, list):
        return [_compact_float(x) if isinstance(x, float) else x for x in value]
    return value


_FLOAT32 = struct.Struct(">f")
_MSGPACK_FLOAT32 = b"\xca"


def _compact_float(x: float) -> Any:
    """``x`` as the shortest msgpack value that reads back as exactly ``x``: an int when it is
    one (up to 2^53, where a float still holds every int; not -0.0), a float32 when that holds
    it, else the float64 msgspec writes (NaN too)."""
    if not math.isfinite(x):
        return x if math.isnan(x) else msgspec.Raw(_MSGPACK_FLOAT32 + _FLOAT32.pack(x))
    if x == int(x) and abs(x) <= 2 ** 53 and math.copysign(1.0, x) > 0:
        return int(x)
    try:
        packed = _FLOAT32.pack(x)
    except OverflowError:
        return x
    return msgspec.Raw(_MSGPACK_FLOAT32 + packed) if _FLOAT32.unpack(packed)[0] == x else x


def decode(data: bytes, max_size: int = DEFAULT_MAX_FRAME) -> m.Message:
    """The message in one frame; raises only ``CodecError`` subclasses."""
    try:
        view = memoryview(data).cast("B")
    except (TypeError, ValueError) as e:
        raise MalformedFrame(f"frame must be bytes, got {type(data).__name__}") from e
    if view.nbytes > max_size:  # before any parsing: a big frame costs nothing but its length
        raise FrameTooLarge(f"frame of {view.nbytes} bytes exceeds the limit of {max_size}")
    version, body = _split_header(view)
    if version not in SUPPORTED_VERSIONS:
        raise UnsupportedVersion(
            f"frame has protocol version {version}; supported: {', '.join(map(str, SUPPORTED_VERSIONS))}")
    try:
        msg = _decoder.decode(body)
    except msgspec.DecodeError as e:
        raise MalformedFrame(f"bad message body: {e}") from e
    except Exception as e:  # e.g. UnicodeDecodeError on a bad str: a hostile frame must not crash a peer
        raise MalformedFrame(f"bad message body: {type(e).__name__}: {e}") from e
    _check(msg)
    return msg


def _split_header(view: memoryview) -> tuple[int, memoryview]:
    """The frame's protocol version and its body (a frame without a header is of the version
    the handshake agreed on: ours)."""
    if view.nbytes >= 1 and view[0] in _ARRAY_STARTS:
        return m.PROTOCOL_VERSION, view
    if view.nbytes < len(HEADER) or view[:2] != MAGIC:
        raise MalformedFrame("not a DRAGON frame (bad magic or truncated header)")
    return view[2], view[len(HEADER):]


# ---------------------------------------------------------------- distributions
def dist_to_wire(d: Dist) -> m.WireDist:
    """Raw little-endian arrays of a canonical ``Dist`` (nothing is rounded here)."""
    if d.ids is None:
        _require_dtype(d.logprobs, np.float32, "full log-probs")
        return m.WireDist(d.vocab_size, d.logprobs.astype("<f4", copy=False).tobytes())
    _require_dtype(d.logprobs, np.float16, "top-K log-probs")
    _require_dtype(d.ids, np.int32, "top-K ids")
    return m.WireDist(d.vocab_size, d.logprobs.astype("<f2", copy=False).tobytes(),
                      d.ids.astype("<i4", copy=False).tobytes(), float(d.tail_mass))


def dist_from_wire(w: m.WireDist) -> Dist:
    """The sender's ``Dist``, bit for bit (so both sides compute identical ``probs()``).

    Converted once per ``WireDist``: ``decode`` converts a Draft's to check it, and the session
    that reads the draft then gets that same ``Dist``."""
    converted = w.__dict__.get(_CONVERTED)
    if converted is None:
        converted = w.__dict__[_CONVERTED] = _convert(w)
    return converted


_CONVERTED = "converted"  # where a WireDist keeps its Dist (messages.WireDist has a __dict__ for it)


def _convert(w: m.WireDist) -> Dist:
    _check_wire_shape(w)
    try:
        if w.ids is None:
            return Dist.from_full_wire(np.frombuffer(w.logprobs, dtype="<f4"))
        d = Dist.from_top_k(w.vocab_size, np.frombuffer(w.ids, dtype="<i4"), np.frombuffer(w.logprobs, dtype="<f2"))
    except InvalidDistribution as e:
        raise MalformedFrame(f"invalid distribution: {e}") from e
    if abs(w.tail_mass - d.tail_mass) > _TAIL_TOLERANCE:
        raise MalformedFrame(f"tail mass {w.tail_mass} breaks the unseen-id rule (expected {d.tail_mass})")
    # keep the sender's own tail so both sides hold the very same numbers
    return dataclasses.replace(d, tail_mass=w.tail_mass)


def _require_dtype(a: np.ndarray, dtype: type, what: str) -> None:
    if a.dtype != dtype:
        raise InvalidDistribution(f"{what} must be {np.dtype(dtype).name}, got {a.dtype}")


def _check_wire_shape(w: m.WireDist) -> None:
    """Sizes and scalars only: cheap, and it bounds the memory ``probs()`` may allocate."""
    if not 1 <= w.vocab_size <= MAX_VOCAB:
        raise MalformedFrame(f"vocab_size {w.vocab_size} outside [1, {MAX_VOCAB}]")
    if not (math.isfinite(w.tail_mass) and 0.0 <= w.tail_mass <= 1.0):
        raise MalformedFrame(f"tail_mass {w.tail_mass} outside [0, 1]")
    if w.ids is None:
        if len(w.logprobs) != 4 * w.vocab_size:
            raise MalformedFrame(f"full distribution needs {4 * w.vocab_size} bytes, got {len(w.logprobs)}")
        return
    k, rest = divmod(len(w.ids), 4)
    if rest or not 1 <= k <= w.vocab_size:
        raise MalformedFrame(f"{len(w.ids)} id bytes is not 1..{w.vocab_size} int32 ids")
    if len(w.logprobs) != 2 * k:
        raise MalformedFrame(f"{k} ids need {2 * k} float16 log-prob bytes, got {len(w.logprobs)}")


# ---------------------------------------------------------------- semantic bounds
# Checked by field name, so every message gets the same rule for the same concept.
_NON_NEGATIVE = frozenset({"request_id", "epoch", "step", "token", "recipient_epoch", "sender_epoch",
                           "nonce", "protocol_version", "max_depth", "dist_top_k", "top_k", "retrieve_every"})
_POSITIVE = frozenset({"k", "max_tokens", "max_k", "max_frame_bytes"})
_FINITE = frozenset({"log_h", "sent_at", "theta"})
_FINITE_NON_NEGATIVE = frozenset({"decode_ms", "sender_decode_ms"})


def _check(msg: m.Message) -> None:
    for name in msg.__struct_fields__:
        _check_field(type(msg).__name__, name, getattr(msg, name))
    if isinstance(msg, m.Open):
        s = msg.sampling
        if not (math.isfinite(s.temperature) and s.temperature > 0):
            raise MalformedFrame(f"open: temperature {s.temperature} must be finite and > 0")
        if not 0.0 < s.top_p <= 1.0:
            raise MalformedFrame(f"open: top_p {s.top_p} outside (0, 1]")
        _check_field("sampling", "top_k", s.top_k)
        check_concord_open(msg)
    elif isinstance(msg, m.Draft):
        dist_from_wire(msg.dist)  # a decoded Draft must always convert (kept: the session reads it)
        if msg.token >= msg.dist.vocab_size:
            raise MalformedFrame(f"draft: token {msg.token} outside vocabulary of {msg.dist.vocab_size}")
    elif isinstance(msg, m.Tokens):
        if not msg.tokens or not all(0 <= t < MAX_VOCAB for t in msg.tokens):
            raise MalformedFrame(f"tokens: need 1+ ids in [0, {MAX_VOCAB}), got {msg.tokens[:8]}")
    elif isinstance(msg, m.Evidence):
        check_evidence(msg, MAX_VOCAB)
        if msg.dist is not None:
            dist_from_wire(msg.dist)  # a dense reply must always convert
    elif isinstance(msg, m.EvidenceRun):
        check_run(msg, MAX_VOCAB)
    elif isinstance(msg, m.Opened):
        if len(msg.scores) != len(msg.passages) or not all(math.isfinite(x) for x in msg.scores):
            raise MalformedFrame("opened: one finite score per passage")


def _check_field(where: str, name: str, value: Any) -> None:
    if value is None:  # only optional fields (Error.request_id) can be None after schema validation
        return
    if name in _NON_NEGATIVE and value < 0:
        raise MalformedFrame(f"{where}.{name} = {value} must be >= 0")
    if name in _POSITIVE and value < 1:
        raise MalformedFrame(f"{where}.{name} = {value} must be >= 1")
    if name in _FINITE and not math.isfinite(value):
        raise MalformedFrame(f"{where}.{name} = {value} must be finite")
    if name in _FINITE_NON_NEGATIVE and not (math.isfinite(value) and value >= 0):
        raise MalformedFrame(f"{where}.{name} = {value} must be finite and >= 0")
