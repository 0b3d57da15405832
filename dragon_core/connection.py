"""One end of the device–cloud link, sans-I/O (in h11's shape): the link's rules, no sockets.

Frames in, events out: ``receive(frame, now)`` returns what the frame means (``Event`` below).
Messages in, frames out: ``send(msg)`` returns the bytes to write. The host (an aiohttp shell
on each side: ``dragon_edge.link``, ``dragon_vllm.link``) only moves those bytes, runs the
timers and passes the time in; every rule of the link is here:

* **the handshake order**: the device's first frame is a ``Hello``; the cloud answers a
  ``Welcome`` (the Hello passed ``handshake.admit``) or an ``Error`` and closes. Nothing else
  crosses before, either way;
* **the table of requests** open on the link and **routing by request id**: a frame for a
  request not in the table is dropped (it already ended); on the cloud, frames for a request
  still opening wait until the host starts it;
* **ping/pong and RTT samples**, and the dead-peer rule (``liveness.PeerLiveness``: every frame
  is a sign of life);
* **byte counts**: for the connection, and per request (the frames carrying its request id
  while it is in the table), so two answers sharing a link each know their own traffic.

A bad frame after the handshake is dropped and never ends the connection: the cloud answers it
with a typed ``Error`` (the device may have a bug to learn about), the device only reports it.
A device's connection outlives its sockets: after ``lost()`` it may handshake again, and its
request ids and table carry over (an answer holds its request until it releases it).
"""

from __future__ import annotations

import enum
import itertools
from dataclasses import dataclass, field
from typing import Mapping, Union

from dragon_core import codec
from dragon_core import messages as m
from dragon_core.errors import (CodecError, DragonError, HandshakeError, MalformedFrame, ProtocolError,
                                RequestRejected)
from dragon_core.handshake import Identity, admit
from dragon_core.liveness import DEFAULT_PEER_TIMEOUT_S, PeerLiveness


class State(enum.Enum):
    IDLE = "idle"  # device: no handshake yet
    AWAIT_WELCOME = "await_welcome"  # device: Hello sent
    AWAIT_HELLO = "await_hello"  # cloud: nothing received yet
    OPEN = "open"  # handshake done: requests, pings
    CLOSED = "closed"  # refused or lost (a device may handshake again)


@dataclass(frozen=True)
class CloudTerms:
    """What the cloud holds a device to: the Hello's checks and what its Welcome offers."""

    identity: Identity
    auth_token: str | None  # the shared token (None: no check)
    device_tokens: Mapping[str, str] = field(default_factory=dict)  # {name: token}
    max_k: int = 16
    max_tokens: int = 1024
    max_requests: int = 64  # open at once on one connection


@dataclass
class Traffic:
    """Frame bytes one way and the other (``sent``: by this end)."""

    sent: int = 0
    received: int = 0


# ------------------------------------------------------------------ events
@dataclass(frozen=True)
class Send:
    """The protocol needs this frame written now (a pong, a refusal, the Welcome)."""

    frame: bytes


@dataclass(frozen=True)
class Welcomed:
    """Device: the cloud accepted the link."""

    welcome: m.Welcome


@dataclass(frozen=True)
class Admitted:
    """Cloud: the device passed the handshake (its Welcome comes in a ``Send`` before this)."""

    hello: m.Hello
    device_name: str | None  # the named token it presented (None: the shared token, or none)


@dataclass(frozen=True)
class Refused:
    """Cloud: the device was refused (its ``Error`` comes in a ``Send`` before this); close."""

    error: DragonError


@dataclass(frozen=True)
class RequestOpened:
    """Cloud: a new request is in the table (the host checks its options, then starts it)."""

    open: m.Open


@dataclass(frozen=True)
class RequestMessage:
    """A frame for a running request of the table."""

    request_id: int
    message: m.Message


@dataclass(frozen=True)
class RoundTrip:
    """A pong came back: one RTT sample."""

    rtt_ms: float


@dataclass(frozen=True)
class PeerError:
    """The peer reported an error about the connection (not about a request)."""

    error: m.Error


@dataclass(frozen=True)
class BadFrame:
    """A frame that does not decode, or that is not allowed now; it was dropped."""

    error: DragonError


Event = Union[Send, Welcomed, Admitted, Refused, RequestOpened, RequestMessage, RoundTrip, PeerError, BadFrame]

# Request-level messages each end may receive (routed by request id).
_ROUTED: dict[m.Side, tuple[type, ...]] = {
    "device": (m.Opened, m.Draft, m.Target, m.Tokens, m.Evidence, m.EvidenceRun, m.Cancel, m.Error),
    "cloud": (m.Draft, m.Target, m.Tokens, m.EvidenceRequest, m.Cancel, m.Error),
}


@dataclass
class _Request:
    running: bool  # cloud: False while the host opens it; its frames wait in ``held``
    traffic: Traffic = field(default_factory=Traffic)
    held: list[m.Message] = field(default_factory=list)


class LinkConnection:
    def __init__(self, role: m.Side, terms: CloudTerms | None = None,
                 peer_timeout_s: float = DEFAULT_PEER_TIMEOUT_S, max_frame_bytes: int = codec.DEFAULT_MAX_FRAME) -> None:
        """``role``: the end this is. ``terms``: the cloud's (required there, unused on the
        device). ``peer_timeout_s``: the dead-peer deadline (<= 0: never)."""
        if role == "cloud" and terms is None:
            raise ValueError("the cloud's end needs its terms")
        self.role, self.terms = role, terms
        self.peer_timeout_s, self.max_frame_bytes = peer_timeout_s, max_frame_bytes
        self.state = State.AWAIT_HELLO if role == "cloud" else State.IDLE
        self.welcome: m.Welcome | None = None
        self.liveness: PeerLiveness | None = None  # from the handshake on
        self.rtt_ms: float | None = None
        self.traffic = Traffic()  # every frame of the connection, handshake and pings included
        self._requests: dict[int, _Request] = {}
        self._ids = itertools.count(1)
        self._nonce = itertools.count()

    # ------------------------------------------------------------------ handshake
    def hello(self, hello: m.Hello) -> bytes:
        """Device: the first frame of a (new) socket."""
        if self.role != "device" or self.state is State.OPEN:
            raise ProtocolError(f"the {self.role} cannot send a Hello now ({self.state.value})")
        self.state = State.AWAIT_WELCOME
        return self._frame(hello)

    def refuse(self, error: DragonError) -> list[Event]:
        """Cloud: refuse the device (a handshake timeout, a frame that is not binary, ...)."""
        self.state = State.CLOSED
        return [Send(self._frame(m.Error(error.code, str(error)))), Refused(error)]

    def lost(self) -> None:
        """The socket is gone (cut, or its peer silent past the deadline)."""
        self.state = State.CLOSED

    @property
    def is_open(self) -> bool:
        return self.state is State.OPEN

    # ------------------------------------------------------------------ frames in
    def receive(self, frame: bytes, now: float) -> list[Event]:
        """A binary frame from the peer at ``now``. On the device a handshake reply other than a
        Welcome raises (``HandshakeError``: refused; ``ProtocolError``: not a reply; a
        ``CodecError``); everything else is an event."""
        self.traffic.received += len(frame)
        if self.state is State.AWAIT_WELCOME:
            return self._on_welcome(frame, now)
        if self.state is State.AWAIT_HELLO:
            return self._on_hello(frame, now)
        if self.state is not State.OPEN:
            return []  # a frame of a socket given up
        self.liveness.heard(now)  # any frame is life
        try:
            msg = codec.decode(frame, self.max_frame_bytes)
        except CodecError as exc:
            return self._bad(exc)
        return self._dispatch(msg, len(frame), now)

    def receive_text(self) -> list[Event]:
        """A text frame: not part of the protocol (the cloud says so; the device only reports it)."""
        if self.state is not State.OPEN:
            return []
        return self._bad(MalformedFrame("text frames are not part of the protocol"))

    def _on_welcome(self, frame: bytes, now: float) -> list[Event]:
        self.state = State.CLOSED  # unless this is the Welcome
        msg = codec.decode(frame, self.max_frame_bytes)
        if isinstance(msg, m.Error):
            raise HandshakeError(f"cloud refused the link: {msg.code}: {msg.message}")
        if not isinstance(msg, m.Welcome):
            raise ProtocolError(f"unexpected handshake reply {type(msg).__name__}")
        self._open(now)
        self.welcome = msg
        return [Welcomed(msg)]

    def _on_hello(self, frame: bytes, now: float) -> list[Event]:
        try:
            hello = codec.decode(frame, self.max_frame_bytes)
            if not isinstance(hello, m.Hello):
                raise HandshakeError(f"expected Hello, got {type(hello).__name__}")
            t = self.terms
            name = admit(hello, t.identity, t.auth_token, t.device_tokens)
        except DragonError as exc:
            return self.refuse(exc)
        self._open(now)
        welcome = m.Welcome(m.PROTOCOL_VERSION, f"dragon-cloud/{t.identity.model}", t.max_k, t.max_tokens,
                            self.max_frame_bytes)
        return [Send(self._frame(welcome)), Admitted(hello, name)]

    def _open(self, now: float) -> None:
        self.state = State.OPEN
        self.liveness = PeerLiveness.for_link(self.peer_timeout_s, now)

    def _dispatch(self, msg: m.Message, size: int, now: float) -> list[Event]:
        if isinstance(msg, m.Ping):
            return [Send(self._frame(m.Pong(msg.nonce, msg.sent_at)))]
        if isinstance(msg, m.Pong):  # sent_at is our own clock's, from ping()
            self.rtt_ms = (now - msg.sent_at) * 1000
            return [RoundTrip(self.rtt_ms)]
        if isinstance(msg, m.Error) and msg.request_id is None:
            return [PeerError(msg)]
        if isinstance(msg, m.Open) and self.role == "cloud":
            return self._on_open(msg, size)
        if isinstance(msg, _ROUTED[self.role]):
            return self._route(msg, size)
        return self._bad(ProtocolError(f"unexpected {type(msg).__name__} after the handshake"))

    def _bad(self, error: DragonError) -> list[Event]:
        """The cloud tells the device what it did wrong; the device only reports it."""
        if self.role == "device":
            return [BadFrame(error)]
        return [Send(self._frame(m.Error(error.code, str(error)))), BadFrame(error)]

    # ------------------------------------------------------------------ the table of requests
    def _on_open(self, req: m.Open, size: int) -> list[Event]:
        rid = req.request_id
        problem = None
        if rid in self._requests:
            problem = f"request id {rid} is already in use on this connection"
        elif len(self._requests) >= self.terms.max_requests:
            problem = f"too many concurrent requests on this connection (limit {self.terms.max_requests})"
        if problem:
            return [Send(self._frame(m.Error(RequestRejected.code, problem, rid)))]
        self._requests[rid] = _Request(running=False)
        self._requests[rid].traffic.received += size
        return [RequestOpened(req)]

    def _route(self, msg: m.Message, size: int) -> list[Event]:
        req = self._requests.get(msg.request_id)
        if req is None:
            return []  # a request that already ended: late frames are harmless
        req.traffic.received += size
        if not req.running:
            req.held.append(msg)
            return []
        return [RequestMessage(msg.request_id, msg)]

    def new_request_id(self) -> int:
        """Device: an id no other request of this link has had."""
        return next(self._ids)

    def start(self, request_id: int) -> list[m.Message]:
        """Cloud: the request runs now; returns the frames that arrived while it was opening."""
        req = self._requests.get(request_id)
        if req is None:
            return []
        req.running = True
        held, req.held = req.held, []
        return held

    def refuse_request(self, request_id: int, code: str, message: str) -> bytes:
        """Cloud: the request leaves the table; the frame tells the device why."""
        self._requests.pop(request_id, None)
        return self._frame(m.Error(code, message, request_id))

    def end(self, request_id: int) -> Traffic:
        """The request leaves the table; its traffic on the link while it was there."""
        req = self._requests.pop(request_id, None)
        return req.traffic if req is not None else Traffic()

    def request_traffic(self, request_id: int) -> Traffic:
        req = self._requests.get(request_id)
        return Traffic(req.traffic.sent, req.traffic.received) if req is not None else Traffic()

    @property
    def requests(self) -> list[int]:
        """The request ids in the table."""
        return list(self._requests)

    # ------------------------------------------------------------------ frames out
    def send(self, msg: m.Message) -> bytes:
        """The frame for ``msg`` (after the handshake only). A device's ``Open`` puts its request
        in the table first, so that the cloud's first reply already routes."""
        if self.state is not State.OPEN:
            raise ProtocolError(f"cannot send {type(msg).__name__} before the handshake ({self.state.value})")
        if isinstance(msg, m.Open) and self.role == "device":
            self._requests.setdefault(msg.request_id, _Request(running=True))
        frame = self._frame(msg)
        req = self._requests.get(getattr(msg, "request_id", None))
        if req is not None:
            req.traffic.sent += len(frame)
        return frame

    def ping(self, now: float) -> bytes:
        return self.send(m.Ping(next(self._nonce), now))

    def _frame(self, msg: m.Message) -> bytes:
        frame = codec.encode(msg)
        self.traffic.sent += len(frame)
        return frame
