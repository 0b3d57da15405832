"""CONCORD's evidence on the wire (issue 14; docs/CONCORD.md): the cloud builds
``messages.Evidence`` frames from its mixture, the device reads them back as the certificate's
sound intervals (``certificate.Evidence``), and the codec checks their bounds.

What travels: each listed ``p^c`` rounded to the nearest float16 (the device widens it by that
rounding, ``certificate.widen_fp16``) and a tail bound rounded *up* to a float16, so every fact
stays true after the trip. A reply to an ``EvidenceRequest`` lists only ids not sent before, and
the device itself lowers the tail to the ``θ`` it asked for (the cloud listed every id at or above
it), so ``θ`` never has to come back exactly. Pure: numpy only.
"""

from __future__ import annotations

import math

import numpy as np

from dragon_core import messages as m
from dragon_core.certificate import Evidence, round_up_fp16, widen_fp16
from dragon_core.errors import MalformedFrame, ProtocolError

MAX_TOP_M = 4096  # evidence entries a request may ask the cloud to list per step
MAX_RUN = 256  # steps one EvidenceRun may carry (the window, max_depth, is at most this)


# ---------------------------------------------------------------------------- the cloud
def first_evidence(request_id: int, step: int, probs: np.ndarray, top_m: int,
                   log_h: float | None, chain: tuple[int, int] | None = None) -> tuple[m.Evidence, np.ndarray]:
    """The step's evidence: the ``top_m`` largest ``p^c`` (ties to the lowest id) and the tail
    bound. The cloud holds its whole mixture here, so the tail is the largest unlisted value
    ``p_(m+1)``, never above §6's ``min(p_(m), 1 − Σ top-m)`` and, unlike ``1 − Σ``, not fooled
    by a mixture whose float sum is a hair off 1. Returns the frame and the ids it lists.
    ``chain``: the frame's ``(basis, prev)`` when the cloud computed it ahead (``Evidence.chain``)."""
    p = np.asarray(probs, dtype=np.float64)
    order = np.argsort(-p, kind="stable")
    ids, rest = order[:max(0, min(top_m, p.size))], order[max(0, min(top_m, p.size)):]
    tail = float(p[rest[0]]) if rest.size else 0.0
    return _frame(request_id, step, ids, p[ids], tail, log_h, chain), ids


def supplement_evidence(request_id: int, step: int, probs: np.ndarray, theta: float,
                        listed: np.ndarray, chain: tuple[int, int] | None = None) -> tuple[m.Evidence, np.ndarray]:
    """The reply to ``EvidenceRequest(theta > 0)``: every id with ``p^c >= θ`` not listed yet
    (largest first), and a tail bound on what stays unlisted. Returns the frame and the ids
    listed after it."""
    p = np.asarray(probs, dtype=np.float64)
    unlisted = np.ones(p.size, dtype=bool)
    unlisted[listed] = False
    new = np.flatnonzero((p >= theta) & unlisted)
    new = new[np.argsort(-p[new], kind="stable")]
    unlisted[new] = False
    tail = float(p[unlisted].max()) if unlisted.any() else 0.0
    return _frame(request_id, step, new, p[new], tail, None, chain), np.concatenate([listed, new])


def dense_evidence(request_id: int, step: int, dist: m.WireDist,
                   chain: tuple[int, int] | None = None) -> m.Evidence:
    """The reply to ``EvidenceRequest(theta <= 0)``: the whole canonical mixture."""
    return m.Evidence(request_id, step, b"", np.array([1.0], dtype="<f2").tobytes(), dist=dist, chain=chain)


def _frame(request_id: int, step: int, ids: np.ndarray, values: np.ndarray, tail: float,
           log_h: float | None, chain: tuple[int, int] | None) -> m.Evidence:
    packed = np.concatenate([values.astype("<f2"), np.array([round_up_fp16(min(1.0, tail))], dtype="<f2")])
    return m.Evidence(request_id, step, ids.astype("<i4").tobytes(), packed.tobytes(), log_h, chain=chain)


def runnable(frame: m.Evidence, guess: int) -> bool:
    """Can ``frame`` go in an ``EvidenceRun``: one entry, nothing else, and its listed id is the
    cloud's guess at its step (the run's chain says so for the step after)."""
    return (frame.log_h is None and frame.upper is None and frame.dist is None and len(frame.ids) == 4
            and int(np.frombuffer(frame.ids, dtype="<i4")[0]) == guess)


def pack_run(frames: list[m.Evidence]) -> m.EvidenceRun:
    """Consecutive ``runnable`` frames of one chain as one ``EvidenceRun`` (a single frame too:
    a one-step run is shorter than its ``Evidence``: a varint id, one byte string)."""
    first = frames[0]
    for a, b in zip(frames, frames[1:]):
        if b.step != a.step + 1:
            raise ValueError(f"a run needs consecutive steps, got {a.step} then {b.step}")
    entries = b"".join(_run_entry(int(np.frombuffer(f.ids, dtype="<i4")[0]), f.values) for f in frames)
    return m.EvidenceRun(first.request_id, first.step, entries, first.chain)


# ---------------------------------------------------------------------------- the device
def theta_for_wire(theta: float) -> float:
    """The ``θ`` an ``EvidenceRequest`` carries: the largest float32 at or below ``θ`` (5 bytes on
    the wire, not 9). Rounding *down* keeps the request sound: the cloud lists every id at or
    above it, a superset of those at or above ``θ``, and the device lowers its tail to the value
    it sent, which only tightens the bound the next check uses. ``θ <= 0`` (dense) and a ``θ``
    below float32's range stay as they are."""
    if theta <= 0:
        return theta
    down = np.float32(theta)
    if float(down) > theta:
        down = np.nextafter(down, np.float32(0))
    return float(down) if down > 0 else theta


def unpack_run(run: m.EvidenceRun) -> list[m.Evidence]:
    """The ``Evidence`` frames a run stands for (``EvidenceRun``'s chain rule)."""
    basis = chain_basis(m.Evidence(run.request_id, run.step, b"", b"", chain=run.chain))
    out: list[m.Evidence] = []
    chain = run.chain
    for i, (token, values) in enumerate(run_entries(run.entries)):
        out.append(m.Evidence(run.request_id, run.step + i, np.array([token], dtype="<i4").tobytes(), values,
                              chain=chain))
        chain = (basis, token)  # the next step was computed on this one's listed id, the guess
    return out


# ---------------------------------------------------------------------------- run entries
# A run's step: its top id as a varint, then its p^c (float16, nearest: the device widens it by
# that rounding, as for any Evidence) and its tail bound (float16, rounded up). A one-byte tail
# (the float16 bound rounded up to 3 mantissa bits) was tried and dropped: it saved ~1.2 B/token
# in the simulator but the looser bound sent ~15% more steps to a θ request, 1-5% slower.
RUN_VALUES = 4  # bytes after a run step's id: its p^c, then its tail bound, float16 LE each


def _run_entry(token: int, values: bytes) -> bytes:
    return varint(token) + values


def varint(n: int) -> bytes:
    """``n >= 0`` as an unsigned LEB128 varint: 7 bits a byte, low first, the high bit set on
    every byte but the last (ids below 128 take 1 byte, below 16,384 2, below 2^21 3)."""
    out = bytearray()
    while n >= 0x80:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def read_varint(buf: bytes, pos: int) -> tuple[int, int]:
    """The varint at ``pos`` and the position after it; ``MalformedFrame`` if it is cut short,
    longer than an id can need, or not in its shortest form (one value, one encoding: a frame
    reads back to the very bytes it came from)."""
    value = shift = 0
    for end in range(pos, min(pos + _MAX_VARINT, len(buf))):
        byte = buf[end]
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            if byte == 0 and end > pos:
                raise MalformedFrame("evidence run: a varint id is not in its shortest form")
            return value, end + 1
        shift += 7
    raise MalformedFrame("evidence run: a varint id is cut short or too long")


_MAX_VARINT = 4  # bytes: 28 bits hold every id below MAX_VOCAB (2^22)


def run_entries(entries: bytes) -> list[tuple[int, bytes]]:
    """A run's steps as (top id, its p^c and tail bound as two float16 LE)."""
    out, pos = [], 0
    while pos < len(entries):
        token, pos = read_varint(entries, pos)
        if pos + RUN_VALUES > len(entries):
            raise MalformedFrame("evidence run: a step's values are cut short")
        out.append((token, bytes(entries[pos:pos + RUN_VALUES])))
        pos += RUN_VALUES
    return out


def chain_basis(msg: m.Evidence) -> int:
    """How many of the device's tokens the frame's prefix starts with (the rest, up to its
    step, are the cloud's own greedy tokens)."""
    return msg.step if msg.chain is None else msg.chain[0]


def bounds_from_wire(msg: m.Evidence, vocab_size: int = 0) -> Evidence:
    """The intervals a frame proves (``vocab_size``: this side's vocabulary, 0 unknown)."""
    ids = np.frombuffer(msg.ids, dtype="<i4").astype(np.int64)
    values = np.frombuffer(msg.values, dtype="<f2").astype(np.float64)
    if vocab_size and ids.size and int(ids.max()) >= vocab_size:
        raise ProtocolError(f"evidence lists ids outside this model's vocabulary of {vocab_size}")
    lo, hi = widen_fp16(values[:-1])
    if msg.upper is not None:
        _, hi = widen_fp16(np.frombuffer(msg.upper, dtype="<f2").astype(np.float64))
    return Evidence(ids, lo, np.maximum(hi, lo), float(values[-1]))


def merge(held: Evidence | None, new: Evidence, theta: float | None) -> Evidence:
    """``held`` joined with a reply to the request for ``θ`` (None: the step's first evidence).
    Every id at or above ``θ`` is listed now, so ``θ`` bounds the rest as well."""
    if held is None:
        return new
    if np.intersect1d(held.ids, new.ids).size:
        raise ProtocolError("evidence lists an id twice for one step")
    tail = min(held.tail, new.tail, theta if theta is not None and theta > 0 else 1.0)
    return Evidence(np.concatenate([held.ids, new.ids]), np.concatenate([held.lo, new.lo]),
                    np.concatenate([held.hi, new.hi]), tail)


# ---------------------------------------------------------------------------- codec bounds
def check_evidence(msg: m.Evidence, max_vocab: int) -> None:
    """Sizes, ids and values of an ``Evidence`` frame (the codec calls it; its ``dist`` is
    checked there like a ``Draft``'s)."""
    _check_chain("evidence", msg.chain, msg.step, max_vocab)
    n, rest = divmod(len(msg.ids), 4)
    if rest or n > max_vocab:
        raise MalformedFrame(f"evidence: {len(msg.ids)} id bytes is not 0..{max_vocab} int32 ids")
    if len(msg.values) != 2 * (n + 1):
        raise MalformedFrame(f"evidence: {n} ids need {2 * (n + 1)} float16 value bytes, got {len(msg.values)}")
    if msg.upper is not None and len(msg.upper) != 2 * n:
        raise MalformedFrame(f"evidence: {n} ids need {2 * n} float16 upper bytes, got {len(msg.upper)}")
    ids = np.frombuffer(msg.ids, dtype="<i4")
    if ids.size and (ids.min() < 0 or ids.max() >= max_vocab or np.unique(ids).size != ids.size):
        raise MalformedFrame(f"evidence: ids must be distinct and in [0, {max_vocab})")
    values = np.frombuffer(msg.values, dtype="<f2").astype(np.float64)
    if not np.all((values >= 0) & (values <= 1)):  # NaN fails both
        raise MalformedFrame("evidence: probabilities and the tail must be in [0, 1]")
    if msg.upper is not None:
        upper = np.frombuffer(msg.upper, dtype="<f2").astype(np.float64)
        if not np.all((upper >= values[:-1]) & (upper <= 1)):
            raise MalformedFrame("evidence: upper ends must be in [value, 1]")


def _check_chain(where: str, chain: tuple[int, int] | None, step: int, max_vocab: int) -> None:
    """A frame's ``(basis, prev)``: computed ahead of ``basis < step`` device tokens, ``prev`` an id."""
    if chain is None:
        return
    basis, prev = chain
    if not 0 <= basis < step:
        raise MalformedFrame(f"{where}: chain basis {basis} outside [0, step {step})")
    if not 0 <= prev < max_vocab:
        raise MalformedFrame(f"{where}: chain prev {prev} outside [0, {max_vocab})")


def check_run(msg: m.EvidenceRun, max_vocab: int) -> None:
    """Sizes, ids, values and chain of an ``EvidenceRun`` frame (the codec calls it)."""
    if len(msg.entries) > MAX_RUN * (_MAX_VARINT + RUN_VALUES):  # before parsing: cheap
        raise MalformedFrame(f"evidence run: {len(msg.entries)} entry bytes is more than {MAX_RUN} steps")
    steps = run_entries(msg.entries)
    if not 1 <= len(steps) <= MAX_RUN:
        raise MalformedFrame(f"evidence run: {len(steps)} steps is not 1..{MAX_RUN}")
    _check_chain("evidence run", msg.chain, msg.step, max_vocab)
    if max(token for token, _ in steps) >= max_vocab:
        raise MalformedFrame(f"evidence run: ids must be in [0, {max_vocab})")
    values = np.frombuffer(b"".join(v for _, v in steps), dtype="<f2").astype(np.float64)
    if not np.all((values >= 0) & (values <= 1)):  # NaN fails both
        raise MalformedFrame("evidence run: probabilities and tails must be in [0, 1]")


def check_concord_open(msg: m.Open) -> None:
    """An ``Open``'s CONCORD settings (checked on every Open; they matter in mode concord)."""
    if not 0 <= msg.concord_top_m <= MAX_TOP_M:
        raise MalformedFrame(f"open: concord_top_m {msg.concord_top_m} outside [0, {MAX_TOP_M}]")
    if math.isnan(msg.concord_debt_max):
        raise MalformedFrame("open: concord_debt_max must be a number (inf and -inf are allowed)")
    if msg.mode == "concord" and not msg.sampling.greedy:
        raise MalformedFrame("open: concord certifies greedy tokens; sampling is not supported")
