"""Privacy on the bytes: what actually crosses the wire between the device and the real cloud.

The device reaches the shared ``dragon-cloud serve`` process through a netem proxy that records
every byte each side sends into the link (``benchmarks.netem``, ``capture_dir``): the HTTP
upgrade, then the WebSocket frames, as they leave the device and the cloud. Device -> cloud frames are masked (RFC 6455 §5.3:
the payload is XORed with a 4-byte key per frame), so a plain search of the raw bytes would miss
any leak; the capture is parsed with the RFC 6455 parser below (7/16/64-bit lengths, masks,
fragmentation, permessage-deflate if it were ever negotiated) and both the raw bytes and the
unmasked, reassembled payloads are searched, both directions, every connection. (In the masked
raw bytes, only needles that random bytes would hold less than once in 10^4 are looked for: a
4-letter word, case-insensitively, is in ~4 MB of random bytes once in ~70.)

Searched for, for every passage of the private store (all of them, not only the retrieved ones;
text, vectors and file names read from the store itself):

* its text: every window of >= 2 words that does not also occur in text that legitimately
  crosses (the questions, the public corpus), as written and with punctuation dropped; and its
  rare words (>= 4 characters, not in the questions or the public corpus: the wifi password and
  its parts, the dentist's name, "nurse", "10am", ...), case-insensitively;
* its token ids: every 3 consecutive ids as u16 / i32 / i64 in both byte orders, and as msgpack
  integers (msgspec's encoding, 1-3 bytes each: the elements of any msgpack int array holding
  >= 3 consecutive ids, without the array header, extended to >= 6 bytes; plus each 3-id array
  with its header);
* its embedding as stored (the SQLite BLOB, checked equal to the bytes in index.faiss): every
  8-byte slice of it as fp32, fp16, bf16 (truncated and rounded) and fp64, both byte orders;
* its source: the file name (``family.md``), the file's path and the notes folder.

Each row of ``ROWS`` is one configuration of the link (DRAGON with the aggregator on either side,
full vectors, top-32, VDRAG, SW, a live handover, a link cut mid-answer, the DRCG/Text and
cloud-only baselines); a new mode (e.g. CONCORD) is one more row. Where the device's mixture
crosses (a ``Draft`` going up), no per-document distribution may equal it (the check compares
against every distribution the device's engine produced for one passage).

Positive controls, so the search can fail: a private passage planted as the query of a
cloud-only request is reported (its text windows and rare words, in the unmasked up payloads,
not in the masked raw bytes); in every row the query is found in the unmasked up payloads and
NOT in the raw (masked) up bytes; in DRCG/Text the public passages' text, rare
words and file names are found coming down with the very needle builders used for the private
ones; a Draft's own top-32 ids and full fp32 mixture, taken from the captured bytes, are found
by the token-window and vector-slice searches; and the parser reproduces the link's own frame
tap, message for message. The handover row starts the aggregator on the cloud with live
scheduling on, a scheduler prior (``Open.prior``) saying the device is the slow side and the
device slowed (``emulate_decode_ms``), so the ΔZ rule hands it to the device mid-answer (as in
test_scheduling_e2e.py's slow-device case, without a second, slowed cloud process).
"""

from __future__ import annotations

import re
import sqlite3
import zlib
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import msgspec
import numpy as np
import pytest

from benchmarks.netem import Shape, cut_proxy, read_capture, spawn_proxy, stop_proxy
from dragon_core import codec
from dragon_core import messages as m
from dragon_core.dist import Dist
from dragon_core.handshake import LINK_PATH
from dragon_core.scheduler import initial_aggregator
from dragon_demo import PUBLIC_CORPUS
from e2e_world import PUBLIC_QUESTION, QUESTION, ask, options, run

MAX_TOKENS = 10
MIN_BINARY = 6  # bytes: shorter binary needles would match random payload bytes by chance


# ============================================================================ RFC 6455 parsing
class WebSocketViolation(AssertionError):
    """The captured stream is not a valid WebSocket stream (so the search could not be trusted)."""


@dataclass(frozen=True)
class WsFrame:
    fin: bool
    rsv1: bool
    opcode: int
    payload: bytes  # unmasked
    complete: bool = True  # False: the capture ends inside this frame (a cut)


def split_upgrade(stream: bytes) -> tuple[bytes, bytes]:
    """(HTTP upgrade request/response with its blank line, the frames after it)."""
    end = stream.find(b"\r\n\r\n")
    return (stream, b"") if end < 0 else (stream[:end + 4], stream[end + 4:])


def unmask(payload: bytes, key: bytes) -> bytes:
    """RFC 6455 §5.3: octet i of the payload is XORed with octet i mod 4 of the key."""
    if not payload:
        return payload
    data = np.frombuffer(payload, np.uint8)
    return (data ^ np.resize(np.frombuffer(key, np.uint8), data.size)).tobytes()


def parse_frames(data: bytes, masked: bool) -> list[WsFrame]:
    """Every frame of ``data``; a frame cut short at the end is returned with what arrived
    (unmasked) and ``complete=False``. ``masked``: client -> server (every frame must be)."""
    frames, off = [], 0
    while off < len(data):
        b0 = data[off]
        if off + 2 > len(data):
            break
        b1 = data[off + 1]
        fin, rsv, opcode = bool(b0 & 0x80), (b0 >> 4) & 0x7, b0 & 0xF
        has_mask, n, pos = bool(b1 & 0x80), b1 & 0x7F, off + 2
        if has_mask != masked:
            raise WebSocketViolation(f"frame at {off}: mask bit {has_mask}, expected {masked}")
        if opcode in (3, 4, 5, 6, 7) or opcode > 0xA:
            raise WebSocketViolation(f"frame at {off}: reserved opcode {opcode:#x}")
        if n >= 126:
            width = 2 if n == 126 else 8
            if pos + width > len(data):
                break
            n, pos = int.from_bytes(data[pos:pos + width], "big"), pos + width
            if width == 8 and n >> 63:
                raise WebSocketViolation(f"frame at {off}: 64-bit length with the top bit set")
        if opcode >= 8 and (not fin or n > 125):
            raise WebSocketViolation(f"frame at {off}: control frame fragmented or longer than 125")
        key = b""
        if masked:
            if pos + 4 > len(data):
                break
            key, pos = data[pos:pos + 4], pos + 4
        body = data[pos:pos + n]
        frames.append(WsFrame(fin, bool(rsv & 0x4), opcode, unmask(body, key) if masked else body, len(body) == n))
        off = pos + n
    return frames


def deflate_params(response_headers: bytes) -> dict[str, bool] | None:
    """permessage-deflate as the server accepted it (RFC 7692), or None if not negotiated."""
    for line in response_headers.split(b"\r\n"):
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"sec-websocket-extensions" and b"permessage-deflate" in value.lower():
            v = value.lower()
            return {"up": b"client_no_context_takeover" in v, "down": b"server_no_context_takeover" in v}
    return None


@dataclass(frozen=True)
class WsMessage:
    opcode: int
    payload: bytes
    complete: bool = True  # False: the capture ends inside it (a cut); payload is what arrived


def messages(frames: list[WsFrame], no_takeover: bool | None) -> list[WsMessage]:
    """Each message: fragments joined, compressed ones inflated (when ``no_takeover`` is not
    None, i.e. permessage-deflate was negotiated)."""
    out: list[WsMessage] = []
    inflater = zlib.decompressobj(-15)
    opcode, parts, compressed = None, [], False
    for f in frames:
        if f.opcode >= 8:  # control frames may come between the fragments of a message
            out.append(WsMessage(f.opcode, f.payload, f.complete))
            continue
        if f.opcode != 0:
            if opcode is not None:
                raise WebSocketViolation("a new message began inside a fragmented one")
            opcode, parts, compressed = f.opcode, [], f.rsv1
            if compressed and no_takeover is None:
                raise WebSocketViolation("RSV1 set without permessage-deflate")
        elif opcode is None:
            raise WebSocketViolation("continuation frame outside a message")
        parts.append(f.payload)
        if f.fin or not f.complete:
            body = b"".join(parts)
            if compressed:
                if no_takeover:
                    inflater = zlib.decompressobj(-15)
                body = inflater.decompress(body + (b"\x00\x00\xff\xff" if f.complete else b""))
            out.append(WsMessage(opcode, body, f.complete))
            opcode = None
    return out


@dataclass
class WsStream:
    """One direction of one captured connection, parsed."""

    raw: bytes
    headers: bytes
    frames: list[WsFrame]
    messages: list[WsMessage]

    @property
    def binary(self) -> list[bytes]:
        """The complete binary messages: the link's frames."""
        return [x.payload for x in self.messages if x.opcode == 2 and x.complete]

    @property
    def payloads(self) -> bytes:
        """Every message's unmasked payload, in order (control frames' and a cut one's included)."""
        return b"".join(x.payload for x in self.messages)


def parse_connection(up: bytes, down: bytes) -> dict[str, WsStream]:
    """Both directions of one captured device-link connection."""
    up_headers, up_frames = split_upgrade(up)
    down_headers, down_frames = split_upgrade(down)
    deflate = deflate_params(down_headers)
    out = {}
    for d, raw, headers, body, masked in (("up", up, up_headers, up_frames, True),
                                          ("down", down, down_headers, down_frames, False)):
        frames = parse_frames(body, masked)
        out[d] = WsStream(raw, headers, frames, messages(frames, None if deflate is None else deflate[d]))
    return out


# ============================================================================ multi-needle search
def occurrences(haystack: bytes, needles: Iterable[bytes]) -> set[bytes]:
    """The needles that occur in ``haystack``: every position's first P bytes (P = the shortest
    needle, at most 8) as one integer, looked up among the needles' first P bytes at once, then
    checked in full. Equals ``{n for n in needles if n in haystack}``, in one pass per call."""
    needles = {n for n in needles if n}
    if not needles:
        return set()
    p = min(8, min(map(len, needles)))
    if len(haystack) < p:
        return set()
    a = np.frombuffer(haystack, np.uint8).astype(np.uint64)
    n = a.size - p + 1
    keys = np.zeros(n, np.uint64)
    for j in range(p):
        keys = (keys << np.uint64(8)) | a[j:j + n]
    by_key: dict[int, list[bytes]] = defaultdict(list)
    for nd in needles:
        by_key[int.from_bytes(nd[:p], "big")].append(nd)
    hits = np.flatnonzero(np.isin(keys, np.fromiter(by_key, np.uint64, len(by_key))))
    found: set[bytes] = set()
    for pos in hits.tolist():
        for nd in by_key[int(keys[pos])]:
            if nd not in found and haystack.startswith(nd, pos):
                found.add(nd)
    return found


@dataclass
class Needles:
    """What to look for: needle -> label; ``caseless`` ones are matched lower-cased."""

    exact: dict[bytes, str] = field(default_factory=dict)
    caseless: dict[bytes, str] = field(default_factory=dict)

    def add(self, needle: bytes, label: str, caseless: bool = False) -> None:
        table = self.caseless if caseless else self.exact
        table.setdefault(needle.lower() if caseless else needle, label)

    def merge(self, other: Needles) -> Needles:
        for nd, lb in other.exact.items():
            self.exact.setdefault(nd, lb)
        for nd, lb in other.caseless.items():
            self.caseless.setdefault(nd, lb)
        return self

    def __len__(self) -> int:
        return len(self.exact) + len(self.caseless)

    def kinds(self) -> Counter:
        return Counter(lb.split(":")[0] for lb in [*self.exact.values(), *self.caseless.values()])

    def found_in(self, haystack: bytes, max_chance: float = 1.0) -> dict[bytes, str]:
        """Needle -> label of every needle in ``haystack``; short and long needles searched
        apart, so the short ones do not make every position of a large payload a candidate.
        ``max_chance``: needles that bytes as random as ``haystack``'s would hold by chance more
        often than this (expected hits, see ``chance_hits``) are not looked for."""
        out = {}
        for table, hay, caseless in ((self.exact, haystack, False), (self.caseless, haystack.lower(), True)):
            table = {n: lb for n, lb in table.items() if chance_hits(n, len(hay), caseless) <= max_chance}
            short = [n for n in table if len(n) < 8]
            long = [n for n in table if len(n) >= 8]
            for nd in occurrences(hay, short) | occurrences(hay, long):
                out[nd] = table[nd]
        return out


def chance_hits(needle: bytes, hay_len: int, caseless: bool) -> float:
    """Expected occurrences of ``needle`` in ``hay_len`` uniformly random bytes; a caseless
    needle matches each of its letters' two cases (a CI run found the 4-letter word 'card' in
    the ~MB of masked bytes of the row that sends full fp32 vectors up: 16 variants, 2^-32 each)."""
    variants = 2 ** sum(chr(b).isalpha() for b in needle) if caseless else 1
    return max(hay_len - len(needle) + 1, 0) * variants / 256.0 ** len(needle)


# ---------------------------------------------------------------------------- needle builders
WORD = re.compile(r"\w(?:[\w'-]*\w)?")


def words_of(text: str) -> set[str]:
    return {w.lower() for w in WORD.findall(text)} | {p.lower() for w in WORD.findall(text) for p in w.split("-")}


def rare_words(text: str, public_text: str) -> list[str]:
    """Words (and hyphenated words' parts) of ``text`` of >= 4 characters that ``public_text``
    does not contain (shorter ones would match random payload bytes)."""
    known = words_of(public_text)
    found = []
    for w in WORD.findall(text):
        for cand in [w, *(w.split("-") if "-" in w else [])]:
            if len(cand) >= 4 and cand.lower() not in known and cand not in found:
                found.append(cand)
    return found


def text_needles(text: str, public_text: str, label: str) -> Needles:
    """Each position's shortest window of >= 2 words not inside ``public_text`` (so every longer
    window that is not public contains one), as written and with punctuation dropped; and the
    rare words, case-insensitively."""
    out = Needles()
    for kind, words in (("text", text.split()), ("text-words", WORD.findall(text))):
        for i in range(len(words) - 1):
            for j in range(i + 2, len(words) + 1):
                window = " ".join(words[i:j])
                if window not in public_text:
                    out.add(window.encode(), f"{kind}:{label}:{window!r}")
                    break
    for w in rare_words(text, public_text):
        out.add(w.encode(), f"word:{label}:{w!r}", caseless=True)
    return out


INT_FORMATS = ("<u2", ">u2", "<i4", ">i4", "<i8", ">i8")


def token_needles(ids: list[int], label: str) -> Needles:
    """Every 3 consecutive ids as fixed-width integers (both byte orders), and as msgpack
    integers: the elements' encodings from each position on, >= 3 ids and >= MIN_BINARY bytes
    (a leaked msgpack array of >= 3 consecutive ids holds one of these, whatever its header),
    plus each 3-id array with its header (which catches short arrays of 1-byte ids)."""
    out = Needles()
    for i in range(len(ids) - 2):
        window = ids[i:i + 3]
        for fmt in INT_FORMATS:
            if fmt.endswith("u2") and max(window) > 0xFFFF:
                continue
            out.add(np.asarray(window, fmt).tobytes(), f"tokens-{fmt}:{label}:{window}")
        enc = [msgspec.msgpack.encode(t) for t in ids[i:]]
        needle = b"".join(enc[:3])
        for extra in enc[3:]:
            if len(needle) >= MIN_BINARY:
                break
            needle += extra
        if len(needle) >= MIN_BINARY:
            out.add(needle, f"tokens-msgpack:{label}:{window}")
        out.add(msgspec.msgpack.encode(window), f"tokens-msgpack-array:{label}:{window}")
    return out


def _bf16(v: np.ndarray, rounded: bool) -> np.ndarray:
    u = v.astype("<f4").view(np.uint32).astype(np.uint64)
    if rounded:
        u = u + 0x7FFF + ((u >> np.uint64(16)) & np.uint64(1))
    return (u >> np.uint64(16)).astype(np.uint16)


def vector_needles(blob: bytes, label: str, size: int = 8) -> Needles:
    """Every ``size``-byte, element-aligned slice of a float32 vector re-encoded as fp32, fp16,
    bf16 (truncated / rounded) and fp64, little- and big-endian."""
    v = np.frombuffer(blob, "<f4")
    forms = {
        "fp32": v.astype(np.float32), "fp16": v.astype(np.float16), "fp64": v.astype(np.float64),
        "bf16": _bf16(v, rounded=False), "bf16r": _bf16(v, rounded=True),
    }
    out = Needles()
    for name, arr in forms.items():
        for order in "<>":
            data = arr.astype(arr.dtype.newbyteorder(order)).tobytes()
            step = arr.dtype.itemsize
            for off in range(0, len(data) - size + 1, step):
                out.add(data[off:off + size], f"vector-{name}{order}:{label}@{off // step}")
    return out


def source_needles(source: str, label: str) -> Needles:
    """The file name, its path and its folder (a bare name has no folder)."""
    out = Needles()
    path = Path(source)
    for name in {path.name, str(path), str(path.parent)} - {".", "", "/"}:
        out.add(name.encode(), f"source:{label}:{name!r}", caseless=True)
    return out


# ---------------------------------------------------------------------------- the private side
@dataclass(frozen=True)
class StoredPassage:
    id: int
    text: str
    source: str
    vector: bytes  # the store's own bytes: float32 little-endian


def stored_passages(store) -> list[StoredPassage]:
    """Every passage of the private store, read from its SQLite file (the source of truth)."""
    db = sqlite3.connect(f"file:{store.path / 'store.sqlite3'}?mode=ro", uri=True)
    try:
        rows = db.execute("SELECT p.id, p.text, s.source, p.vector FROM passages p "
                          "JOIN sources s ON p.source_id = s.id ORDER BY p.id").fetchall()
    finally:
        db.close()
    return [StoredPassage(int(i), t, s, bytes(v)) for i, t, s, v in rows]


PUBLIC_TEXT = "\n".join([QUESTION, PUBLIC_QUESTION, *PUBLIC_CORPUS.values(), *PUBLIC_CORPUS])


def token_ids(tokenizer, text: str) -> list[list[int]]:
    """The passage's ids as it would be tokenised alone and after a space (inside a prompt)."""
    return [tokenizer.encode(t, add_special_tokens=False) for t in (text, " " + text)]


def private_needles(passages: list[StoredPassage], tokenizer) -> Needles:
    out = Needles()
    for p in passages:
        label = Path(p.source).name
        out.merge(text_needles(p.text, PUBLIC_TEXT, label))
        for ids in token_ids(tokenizer, p.text):
            out.merge(token_needles(ids, label))
        out.merge(vector_needles(p.vector, label))
        out.merge(source_needles(p.source, label))
    return out


# ============================================================================ capturing one answer
@dataclass(frozen=True)
class Row:
    """One configuration of the link whose bytes must carry nothing private."""

    id: str
    opts: dict
    question: str = QUESTION
    cut: bool = False  # cut the link (SIGUSR1 to the proxy) after the second committed token
    prior: m.SchedulerPrior | None = None  # scheduler estimates "from an earlier request" (Open.prior)
    expect: Callable = lambda stats: not stats.degraded  # what the answer's stats must show


ROWS = [
    Row("dragon", dict(mode="dragon", aggregator="device")),
    Row("dragon-aggregator-cloud", dict(mode="dragon", aggregator="cloud")),  # the device's mixture crosses
    Row("full-vectors", dict(mode="dragon", aggregator="cloud", dist_top_k=0)),
    Row("vdrag", dict(mode="vdrag", aggregator="cloud")),
    Row("sw", dict(mode="sw", aggregator="cloud")),
    # starts on the cloud; the prior (and the emulated decode time) say the device is the slow
    # side, so the ΔZ rule hands the aggregator to the device as soon as it is evaluated
    Row("handover", dict(mode="dragon", aggregator="cloud", scheduling=True, emulate_decode_ms=150),
        prior=m.SchedulerPrior(device_ms=700.0, cloud_ms=30.0, rtt_ms=60.0, alpha_device=0.5, alpha_cloud=0.5),
        expect=lambda st: not st.degraded and st.handovers >= 1 and set(st.aggregator_steps) == {"cloud", "device"}),
    Row("degraded", dict(mode="dragon", aggregator="cloud", max_tokens=24), cut=True,
        expect=lambda st: st.degraded and st.finish_reason in ("eos", "length")),
    Row("text", dict(mode="text"), question=PUBLIC_QUESTION),
    Row("cloud-only", dict(mode="cloud")),
]
ROW_BY_ID = {r.id: r for r in ROWS}


@dataclass
class Captured:
    row: Row
    conns: dict[int, dict[str, WsStream]]
    tapped: list[tuple[str, bytes]]
    ids: list[int]
    stats: object
    per_doc: list[Dist]

    def up_messages(self) -> list[m.Message]:
        return [codec.decode(f) for c in self.conns.values() for f in c["up"].binary]


@pytest.fixture(scope="module")
def loop(e2e_loop):
    return e2e_loop


@pytest.fixture(scope="module")
def capture(loop, runtime, cloud, tmp_path_factory) -> Callable[[str | Row], Captured]:
    """Answer once per row through a capturing proxy (cached: the controls reuse the rows)."""
    done: dict[str, Captured] = {}

    def get(row: str | Row) -> Captured:
        row = ROW_BY_ID[row] if isinstance(row, str) else row
        if row.id not in done:
            done[row.id] = _capture(loop, runtime, cloud, row, tmp_path_factory.mktemp(row.id))
        return done[row.id]

    return get


def _capture(loop, runtime, cloud, row: Row, folder: Path) -> Captured:
    proc, port = spawn_proxy(("127.0.0.1", cloud.port), up=Shape(latency_ms=5), down=Shape(latency_ms=5),
                             seed=0, capture_dir=folder)
    per_doc: list[Dist] = []
    real_open = runtime.engine.open_group

    async def tapped_open(prompts, temperature=1.0):  # every distribution of one private passage
        group = await real_open(prompts, temperature)
        real_next = group.next_dists

        async def next_dists():
            dists = await real_next()
            per_doc.extend(dists)
            return dists

        group.next_dists = next_dists
        return group

    runtime.engine.open_group = tapped_open
    tapped: list[tuple[str, bytes]] = []
    url = f"http://127.0.0.1:{port}"
    if row.prior is not None:
        assert initial_aggregator(row.prior) == "device"  # the rule would place it on the device
        runtime.priors[url + LINK_PATH] = row.prior
    try:
        opts = options(**{"max_tokens": MAX_TOKENS, "dist_top_k": 32, **row.opts})
        ids, stats = run(loop, ask(runtime, url, opts, tapped, question=row.question,
                                   hook=(lambda: cut_proxy(proc)) if row.cut else None))
    finally:
        runtime.engine.open_group = real_open
        runtime.priors.pop(url + LINK_PATH, None)
        stop_proxy(proc)
    conns = {cid: parse_connection(c["up"], c["down"]) for cid, c in read_capture(folder).items()}
    return Captured(row, conns, tapped, ids, stats, per_doc)


# ============================================================================ the check
def leaks(cap: Captured, needles: Needles, without: tuple[bytes, ...] = ()) -> list[str]:
    """Every needle found, where: raw bytes and unmasked payloads, each connection, both ways.
    ``without``: frames cut out of the payloads first (frames the caller checked otherwise).
    The device's raw bytes are masked (RFC 6455: random to anyone without the mask), so there
    only needles a random stream would hold less than once in 10^4 are looked for; the same
    needles are still looked for, all of them, in the unmasked payloads."""
    out = []
    for cid, conn in cap.conns.items():
        for direction, stream in conn.items():
            payloads = stream.payloads
            for frame in without:
                payloads = payloads.replace(frame, b"")
            raw_chance = MASKED_RAW_MAX_CHANCE if direction == "up" else 1.0
            for view, hay, chance in (("raw", stream.raw, raw_chance), ("payloads", payloads, 1.0)):
                found = needles.found_in(hay, max_chance=chance)
                out += [f"conn {cid} {direction} {view}: {label}" for label in found.values()]
    return out


MASKED_RAW_MAX_CHANCE = 1e-4


@pytest.fixture(scope="module")
def private(world, runtime) -> tuple[list[StoredPassage], Needles]:
    store = world[2]
    passages = stored_passages(store)
    assert len(passages) == 3 and {Path(p.source).name for p in passages} == {"family.md", "dentist.md", "wifi.md"}
    faiss_file = (store.path / "index.faiss").read_bytes()
    for p in passages:  # the vectors the store searches are these very bytes
        assert len(p.vector) == 4 * store.stats().dim and p.vector in faiss_file
    needles = private_needles(passages, runtime.tokenizer)
    rare = {lb.split(":")[2] for lb in needles.caseless.values() if lb.startswith("word:")}
    assert {"'plum-tiger-42'", "'Alvarez'", "'nurse'", "'password'", "'10am'"} <= rare, rare
    assert not {"'Lena'", "'sister'", "'Lyon'"} & rare  # in the question / public text: not rare
    return passages, needles


@pytest.mark.slow
@pytest.mark.parametrize("row_id", [r.id for r in ROWS])
def test_no_private_text_tokens_embedding_or_file_names_in_the_captured_bytes(capture, private, row_id):
    cap = capture(row_id)
    row, stats = cap.row, cap.stats
    assert row.expect(stats), stats
    assert cap.conns and all(c["up"].headers.startswith(b"GET ") for c in cap.conns.values())
    # the capture is the link: the parser gives back the link's own frames, message for message
    captured = {d: Counter(f for c in cap.conns.values() for f in c[d].binary) for d in ("up", "down")}
    tapped = {d: Counter(f for dd, f in cap.tapped if dd == d) for d in ("up", "down")}
    def kinds(frames: Counter) -> list[str]:
        return sorted(f"{type(codec.decode(f)).__name__} x{n}" for f, n in frames.items())

    welcome = Counter(f for f in captured["down"] if isinstance(codec.decode(f), m.Welcome))
    captured["down"] -= welcome  # the handshake's reply is read before the link's tap is in place
    assert sum(welcome.values()) == len(cap.conns)
    diff = {d: (kinds(captured[d] - tapped[d]), kinds(tapped[d] - captured[d])) for d in ("up", "down")}
    # up: what the link sent is what crossed (a cut may drop the last frames); down: frames that
    # arrive while the device closes the link are delivered but no longer read (a Ping, a Pong)
    if row.cut:
        assert captured["up"] <= tapped["up"] and tapped["down"] <= captured["down"], diff
    else:
        assert captured["up"] == tapped["up"], diff
        assert tapped["down"] <= captured["down"] and (captured["down"] - tapped["down"]).total() <= 3, diff
    # positive control in this very capture: the query goes up, visible only once unmasked
    up_payloads = b"".join(c["up"].payloads for c in cap.conns.values())
    up_raw = b"".join(c["up"].raw for c in cap.conns.values())
    assert row.question.encode() in up_payloads and row.question.encode() not in up_raw
    _, needles = private
    found = leaks(cap, needles)
    assert not found, f"{len(found)} private needles on the wire in {row_id}:\n" + "\n".join(found[:40])
    _check_no_single_document_distribution(cap)


def _check_no_single_document_distribution(cap: Captured) -> None:
    sent = cap.up_messages()
    assert all(isinstance(x, (m.Hello, m.Open, m.Draft, m.Target, m.Ping, m.Pong, m.Cancel)) for x in sent)
    opens = [x for x in sent if isinstance(x, m.Open)]
    assert len(opens) == 1 and opens[0].query == cap.row.question
    drafts = [x for x in sent if isinstance(x, m.Draft)]
    if cap.row.opts.get("aggregator") == "cloud" and cap.row.opts.get("mode") in ("dragon", "vdrag", "sw"):
        assert drafts and cap.per_doc  # the device's mixture did cross, so this check can fail
    for d in drafts:  # the device's mixture, never one document's distribution
        sent_probs = codec.dist_from_wire(d.dist).probs()
        k = len(d.dist.ids) // 4 if d.dist.ids is not None else 0
        for doc in cap.per_doc:
            single = Dist.top_k(np.log(np.maximum(doc.probs(), 1e-300)), k) if k else doc
            assert not np.array_equal(sent_probs, single.probs())


# ============================================================================ positive controls
@pytest.mark.slow
def test_control_public_passages_text_words_and_names_are_found_coming_down_in_text_mode(capture):
    """DRCG/Text: the cloud sends its public passages' text; the private needle builders, run
    on the public passages (public text = the question only), find them in the down bytes."""
    cap = capture("text")
    opened = [codec.decode(f) for c in cap.conns.values() for f in c["down"].binary]
    opened = [x for x in opened if isinstance(x, m.Opened)]
    assert len(opened) == 1 and opened[0].passages
    for name, text in zip(opened[0].sources, opened[0].passages):
        needles = text_needles(text, cap.row.question, name).merge(source_needles(name, name))
        down = [c["down"] for c in cap.conns.values()]
        as_written = {nd for nd, lb in needles.exact.items() if not lb.startswith("text-words")}  # as sent
        assert len(as_written) >= 10 and len(needles.caseless) >= 3
        for view in ("raw", "payloads"):
            hay = b"".join(getattr(s, view) for s in down)
            found = set(needles.found_in(hay))
            assert as_written <= found and set(needles.caseless) <= found, (view, as_written - found)
        up = b"".join(c["up"].payloads for c in cap.conns.values())
        assert not needles.found_in(up)  # nothing of the public passages goes up either


@pytest.mark.slow
def test_control_a_drafts_own_ids_and_full_vector_are_found_by_the_binary_searches(capture):
    """What does cross (the device's top-32 ids, its full fp32 mixture) is found by the same
    token-window and vector-slice searches, once unmasked, and not in the masked raw bytes."""
    for row_id, part in (("dragon-aggregator-cloud", "ids"), ("full-vectors", "logprobs")):
        cap = capture(row_id)
        draft = next(x for x in cap.up_messages() if isinstance(x, m.Draft))
        if part == "ids":
            ids = np.frombuffer(draft.dist.ids, "<i4").tolist()
            needles = token_needles(ids, "draft-ids")
            want = {nd for nd, lb in needles.exact.items() if lb.startswith("tokens-<i4")}
        else:
            needles = vector_needles(draft.dist.logprobs[:4096], "draft-logprobs")
            want = {nd for nd, lb in needles.exact.items() if lb.startswith("vector-fp32<")}
        assert len(want) >= 30
        up_payloads = b"".join(c["up"].payloads for c in cap.conns.values())
        assert want <= set(needles.found_in(up_payloads)), row_id
        up_raw = b"".join(c["up"].raw for c in cap.conns.values())
        assert len(want & set(needles.found_in(up_raw))) <= 1, row_id  # masked: (almost) nothing matches


@pytest.mark.slow
def test_control_a_private_passage_planted_in_the_query_is_found_only_once_unmasked(capture, private):
    """Plant a private passage where it may legitimately go (the query of a cloud-only request,
    2 tokens): the private search reports its text windows and rare words in the unmasked up
    payloads, and the masked raw bytes hide them (so an unparsed search would have missed it)."""
    passages, needles = private
    planted = next(p for p in passages if p.source.endswith("wifi.md"))
    cap = capture(Row("planted-query", dict(mode="cloud", max_tokens=2), question=planted.text))
    mine = [lb for lb in [*needles.exact.values(), *needles.caseless.values()]
            if lb.split(":")[1] == "wifi.md" and lb.split(":")[0] in ("text", "word")]
    found = leaks(cap, needles)
    in_payloads = {f.split(": ", 1)[1] for f in found if " up payloads: " in f}
    assert len(mine) >= 10 and set(mine) <= in_payloads
    assert not [f for f in found if " up raw: " in f]  # masked
    assert not [f for f in found if " down " in f]  # the cloud does not echo the query


# ============================================================================ the tools themselves
def _frames_by_aiohttp(payloads: list[bytes], masked: bool, compress: int = 0) -> bytes:
    """Frames as aiohttp's own WebSocket writer puts them on the wire (an independent encoder)."""
    import asyncio

    from aiohttp.http_websocket import WebSocketWriter

    class Transport:
        def __init__(self) -> None:
            self.out = bytearray()

        def write(self, data) -> None:
            self.out += data

        def is_closing(self) -> bool:
            return False

    class Protocol:
        _paused = False

        async def _drain_helper(self) -> None:
            return None

    async def go() -> bytes:
        t = Transport()
        w = WebSocketWriter(Protocol(), t, use_mask=masked, compress=compress)  # type: ignore[arg-type]
        for p in payloads:
            await w.send_frame(p, 0x2)
        await w.send_frame(b"bye", 0x9)  # a ping between messages
        return bytes(t.out)

    return asyncio.run(go())


@pytest.mark.parametrize("masked", [True, False])
@pytest.mark.parametrize("compress", [0, 15])
def test_websocket_parser_reads_aiohttps_frames_of_every_length_form(masked, compress):
    rng = np.random.default_rng(0)
    payloads = [b"", b"short", rng.bytes(125), rng.bytes(126), rng.bytes(300), rng.bytes(65535),
                rng.bytes(65536), rng.bytes(200_000)]  # 7-bit, 16-bit and 64-bit lengths
    wire = _frames_by_aiohttp(payloads, masked, compress)
    frames = parse_frames(wire, masked)
    assert all(f.complete for f in frames)
    deflate = {"up": False, "down": False} if compress else None
    got = messages(frames, None if deflate is None else deflate["up" if masked else "down"])
    assert got == [WsMessage(2, p) for p in payloads] + [WsMessage(9, b"bye")]
    if masked and not compress:
        assert payloads[-1] not in wire  # masked on the wire: the raw bytes hide the payload
    if not compress:
        cut = parse_frames(wire[:-1000], masked)  # a capture that ends inside the last big frame
        assert not cut[-1].complete and len(cut[-1].payload) > 100_000
        assert payloads[-1].startswith(cut[-1].payload)


def test_websocket_parser_joins_fragments_around_control_frames_and_rejects_violations():
    key = b"\x01\x02\x03\x04"

    def frame(opcode: int, payload: bytes, fin: bool = True) -> bytes:
        head = bytes([(0x80 if fin else 0) | opcode])
        n = len(payload)
        head += bytes([0x80 | n]) if n < 126 else bytes([0x80 | 126]) + n.to_bytes(2, "big")
        return head + key + unmask(payload, key)  # XOR is its own inverse

    wire = frame(2, b"abc", fin=False) + frame(9, b"p") + frame(0, b"x" * 200, fin=False) + frame(0, b"end")
    assert messages(parse_frames(wire, True), None) == [WsMessage(9, b"p"), WsMessage(2, b"abc" + b"x" * 200 + b"end")]
    cut = messages(parse_frames(wire[:-2], True), None)  # the capture ends inside the last fragment
    assert cut[-1] == WsMessage(2, b"abc" + b"x" * 200 + b"e", complete=False)
    with pytest.raises(WebSocketViolation):
        parse_frames(wire, masked=False)  # client frames carry a mask: mistaking them is an error
    with pytest.raises(WebSocketViolation):
        messages(parse_frames(frame(0, b"orphan"), True), None)
    with pytest.raises(WebSocketViolation):
        parse_frames(frame(9, b"p", fin=False), True)
    headers, rest = split_upgrade(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n" + wire)
    assert headers.endswith(b"\r\n\r\n") and rest == wire


def test_multi_needle_search_equals_the_naive_one():
    rng = np.random.default_rng(1)
    hay = rng.bytes(50_000) + b"plum-tiger-42" + rng.bytes(10) + np.arange(5, dtype="<i4").tobytes()
    needles = [hay[i:i + n] for i, n in zip(rng.integers(0, len(hay) - 30, 200), rng.integers(4, 24, 200))]
    needles += [rng.bytes(int(n)) for n in rng.integers(4, 24, 200)] + [b"plum-tiger-42", b"abcd"]
    assert occurrences(hay, needles) == {n for n in needles if n in hay}
    tn = token_needles([0, 1, 2, 3, 4], "t")
    assert any(lb.startswith("tokens-<i4") for lb in tn.found_in(hay).values())
    assert Needles(caseless={b"plum-tiger-42": "w"}).found_in(hay.upper()) == {b"plum-tiger-42": "w"}


def test_needle_builders_cover_windows_words_and_vectors():
    t = text_needles("The home wifi password is plum-tiger-42. The router", "the home of the Lyon", "wifi.md")
    assert b"home wifi" in t.exact and b"The home wifi" not in t.exact  # shortest non-public window
    assert b"plum-tiger-42. The" in t.exact and b"plum-tiger-42 The" in t.exact
    assert {b"plum-tiger-42", b"plum", b"tiger", b"password", b"router", b"wifi"} <= set(t.caseless)
    assert b"home" not in t.caseless and b"42" not in t.caseless
    v = np.linspace(-0.2, 0.2, 16).astype("<f4")
    vn = vector_needles(v.tobytes(), "v")
    assert v[3:5].tobytes() in vn.exact and v.astype(">f2")[2:6].tobytes() in vn.exact
    assert v.astype("<f8")[7:8].tobytes() in vn.exact
