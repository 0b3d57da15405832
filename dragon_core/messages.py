"""Every message the two sides exchange, as typed msgspec structs.

What may cross the link (docs/ALGORITHMS.md §1): the query text, draft token ids, each side's
*mixed* next-token distribution, the scalar ``log h``, step numbers, target tokens with accept
flags, and control messages. Nothing here can carry a private passage, its embedding, its KV
or a per-document distribution: there is no field for them. The only passage text on the wire
is the cloud's *public* passages in ``Opened`` (the DRCG/Text baseline), cloud -> device.
"""

from __future__ import annotations

from typing import Literal

import msgspec

PROTOCOL_VERSION = 6  # 2: Evidence carries its chain (basis, prev): the cloud's evidence ahead; 3: EvidenceRun;
# 4: Open.retrieve_every (iterative retrieval: a Draft's log_h is its step's retrieval epoch's);
# 5: every message's tag is a small int (one byte on the wire, not its name: 2-7 bytes a frame);
# 6: a one-byte header on request frames, trailing default fields left off and floats as ints or
# float32 where exact (codec), Open's fields reordered (the often-default ones last), EvidenceRun's
# steps as one ``entries`` string with varint ids (concord_wire)

Side = Literal["device", "cloud"]
# Wire modes (baselines of the same link): "cloud" = cloud-only (the cloud decodes alone and
# streams its tokens), "text" = DRCG/Text (the cloud only sends its passages' text), "concord" =
# CONCORD (the device aggregates from the cloud's evidence; docs/CONCORD.md).
Mode = Literal["dragon", "vdrag", "sw", "cloud", "text", "concord"]


def other_side(side: Side) -> Side:
    return "cloud" if side == "device" else "device"


class Sampling(msgspec.Struct, frozen=True, array_like=True):
    """How the target token is chosen from the aggregated distribution."""

    greedy: bool = True
    temperature: float = 1.0
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1.0: off


class WireDist(msgspec.Struct, frozen=True, array_like=True, dict=True):
    """A ``Dist`` on the wire: raw little-endian arrays (int32 ids, f16/f32 log-probs).

    ``dict=True`` only so that ``codec.dist_from_wire`` can keep the ``Dist`` it converted this
    into: a received draft's distribution is converted once, when its frame is decoded, and not
    again by the session. Neither the frame nor equality sees it."""

    vocab_size: int
    logprobs: bytes
    ids: bytes | None = None  # None: full vector (exact mode), logprobs are float32
    tail_mass: float = 0.0


# ------------------------------------------------------------------ connection level
class Hello(msgspec.Struct, tag=1, frozen=True, array_like=True):
    """First frame from the device. The cloud refuses on any mismatch."""

    protocol_version: int
    model: str
    model_fingerprint: str
    tokenizer_fingerprint: str
    retriever_fingerprint: str
    score_function: str
    auth_token: str
    client: str = ""


class Welcome(msgspec.Struct, tag=2, frozen=True, array_like=True):
    protocol_version: int
    server: str
    max_k: int
    max_tokens: int
    max_frame_bytes: int


class Ping(msgspec.Struct, tag=3, frozen=True, array_like=True):
    nonce: int
    sent_at: float


class Pong(msgspec.Struct, tag=4, frozen=True, array_like=True):
    nonce: int
    sent_at: float


class Error(msgspec.Struct, tag=5, frozen=True, array_like=True):
    """A typed error; ``request_id`` is None for connection-level errors."""

    code: str
    message: str
    request_id: int | None = None


# ------------------------------------------------------------------ request level
class SchedulerPrior(msgspec.Struct, frozen=True, array_like=True):
    """Greedy Scheduling estimates from earlier requests on this link: timings and acceptance
    rates only. They let a request start on the right side instead of learning it first."""

    device_ms: float
    cloud_ms: float
    rtt_ms: float
    alpha_device: float
    alpha_cloud: float


class Open(msgspec.Struct, tag=6, frozen=True, array_like=True):
    """Device asks the cloud to join one request.

    Field order is wire order, and the codec leaves off the trailing fields that equal their
    defaults: the settings requests usually leave at their defaults come last."""

    request_id: int
    query: str
    k: int
    max_tokens: int
    seed: int
    mode: Mode = "dragon"
    max_depth: int = 8
    dist_top_k: int = 0  # 0: send full distributions (exact mode)
    concord_debt_max: float = 4.0  # CONCORD: wait for evidence while the debt is <= this (inf: always)
    concord_top_m: int = 1  # CONCORD: mixture entries the cloud's evidence lists per step
    prior: SchedulerPrior | None = None
    aggregator: Side = "device"
    sampling: Sampling = Sampling()
    scheduling: bool = True
    retrieval: bool = True
    retrieve_every: int = 0  # iterative retrieval: re-retrieve every n generated tokens (0: once)


class Opened(msgspec.Struct, tag=7, frozen=True, array_like=True):
    """Cloud accepted the request; ``sources`` names its public passages (for attribution).

    In mode "text" (DRCG/Text) the cloud opens no streams and instead sends its public passages'
    text and retrieval scores, one per source; otherwise both lists stay empty.
    """

    request_id: int
    sources: list[str] = []
    passages: list[str] = []
    scores: list[float] = []


class Draft(msgspec.Struct, tag=8, frozen=True, array_like=True):
    """Side's speculative token for ``step``, built on its own epoch-``epoch`` prefix."""

    request_id: int
    epoch: int
    step: int
    token: int
    dist: WireDist
    log_h: float
    decode_ms: float = 0.0


class Target(msgspec.Struct, tag=9, frozen=True, array_like=True):
    """The aggregator's decision for ``step``.

    ``accepted`` is the recipient's draft fate. ``recipient_epoch`` is the epoch the aggregator
    now expects from the recipient (bumped on rejection); ``sender_epoch`` the aggregator's own.
    ``handover`` moves the aggregator role to the recipient (Greedy Scheduling, §4).
    """

    request_id: int
    step: int
    token: int
    accepted: bool
    recipient_epoch: int
    sender_epoch: int
    handover: bool = False
    sender_decode_ms: float = 0.0  # the aggregator's own draft latency, for the scheduler


class Tokens(msgspec.Struct, tag=10, frozen=True, array_like=True):
    """Tokens the deciding side committed, from ``step`` on (no drafts to verify): the cloud's
    in cloud-only mode (cloud -> device), the device's in CONCORD (device -> cloud: the prefix
    the cloud's evidence is computed on)."""

    request_id: int
    step: int
    tokens: list[int]


class Cancel(msgspec.Struct, tag=11, frozen=True, array_like=True):
    request_id: int
    reason: str = ""


class Evidence(msgspec.Struct, tag=12, frozen=True, array_like=True):
    """CONCORD, cloud -> device: facts about the cloud's mixture ``p^c`` at ``step`` (on the
    prefix of ``step`` committed tokens). ``p^c(ids[i])`` rounded to the nearest float16 is
    ``values[i]``; the last of the ``n + 1`` values is a tail bound, rounded up, on every id not
    listed in this step's evidence so far. A reply to an ``EvidenceRequest`` lists only new ids;
    a dense reply carries the whole canonical mixture in ``dist``. Short tag and packed arrays:
    this frame crosses every step, its bytes are CONCORD's per-token cost. Nothing here is the
    device's: the cloud's own mixture only, as in DRAGON. (The codec leaves the unset optional
    fields at the end off: 16 bytes for a one-entry frame; one computed ahead usually goes as a
    one-step ``EvidenceRun``.)"""

    request_id: int
    step: int
    ids: bytes  # n int32, little-endian, distinct
    values: bytes  # n + 1 float16, little-endian: the listed p^c, then the tail bound
    log_h: float | None = None  # the cloud's retrieval mass: in the request's first Evidence
    upper: bytes | None = None  # n float16: upper ends when ``values`` are interval lower ends
    dist: WireDist | None = None  # the dense fall-back: the cloud's canonical mixture
    # ``(basis, prev)`` when the cloud ran ahead of the device's tokens: the prefix was the
    # device's first ``basis`` tokens, then the cloud's own greedy tokens (its guesses of the
    # device's) up to ``step - 1``, the last of them ``prev``; the earlier guesses were in the
    # earlier frames, which arrive first. None: computed on the device's ``step`` tokens alone.
    chain: tuple[int, int] | None = None


class EvidenceRun(msgspec.Struct, tag=13, frozen=True, array_like=True):
    """CONCORD, cloud -> device: one-entry ``Evidence`` for ``n`` consecutive steps from ``step``,
    computed ahead along the cloud's own chain, in one frame. ``entries`` holds, per step
    ``step + i``, its top id as an unsigned LEB128 varint (1-3 bytes for today's vocabularies,
    not 4) and then two float16 (little-endian): that id's ``p^c`` (nearest) and the tail bound
    (rounded up); 11-13 bytes for a one-step run, 5-7 a further step (``concord_wire.pack_run``).
    The chain: step ``step`` was computed on ``chain`` (as in ``Evidence``; None: the device's
    ``step`` tokens alone), and every later step on the one before it followed by that step's
    listed id, which was the cloud's guess there. The device reads it as those ``n`` ``Evidence``
    frames (``concord_wire.unpack_run``)."""

    request_id: int
    step: int
    entries: bytes  # per step: varint id, float16 p^c, float16 tail bound
    chain: tuple[int, int] | None = None


class EvidenceRequest(msgspec.Struct, tag=14, frozen=True, array_like=True):
    """CONCORD, device -> cloud: list every id of ``step``'s mixture with ``p^c >= theta`` not
    listed yet; ``theta <= 0``: send the whole mixture. ``theta`` is one scalar of the device's
    certificate, no distribution (docs/CONCORD.md, privacy)."""

    request_id: int
    step: int
    theta: float


Message = (Hello | Welcome | Ping | Pong | Error | Open | Opened | Draft | Target | Tokens | Cancel | Evidence
           | EvidenceRun | EvidenceRequest)
