"""The cloud's end of the device link: one aiohttp WebSocket per device, many requests on it.

The link's rules (handshake order, the table of requests and routing by ``request_id``,
ping/pong, byte counts) are ``dragon_core.connection.LinkConnection``'s; this module moves its
frames, runs the timers and runs the requests. Frame flow: the device sends ``Hello`` (checked
by ``dragon_core.handshake``), then any number of ``Open`` requests; each runs a cloud
``Session`` through a ``SessionDriver`` on the shared engine. ``Draft`` / ``Target`` / ``Cancel`` frames are routed by ``request_id``. A malformed
frame gets a typed ``Error`` (the connection survives); a broken handshake closes it. When the
device goes away, or stays silent for longer than ``peer_timeout_s`` (``dragon_core.liveness``:
a blackholed connection stays open for minutes otherwise), every request of that connection is
finished and its streams closed, so the engine's KV blocks return at once.

Abuse limits (docs/PROTOCOL.md, "Link limits"): a request the cloud has been waiting on for
longer than ``request_idle_timeout_s`` with nothing from the device for it (``dragon_core.idle``)
ends with ``Error("request_idle_timeout")`` and frees its streams, even on a connection that
answers its pings; each device identity (a named token of ``device_tokens``, else the peer's
address) has quotas of open requests and streams over all of its connections; and the engine's
admission queue serves identities round robin (``dragon_vllm.admission``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Mapping, Protocol, Sequence, get_args

from aiohttp import WSMsgType, web

from dragon_core import codec
from dragon_core import messages as m
from dragon_core import session as s
from dragon_core.aggregate import log_mass
from dragon_core.connection import (Admitted, CloudTerms, Event, LinkConnection, Refused, RequestMessage,
                                    RequestOpened, RoundTrip, Send)
from dragon_host.documents import Documents, DocumentSource, DocumentStats
from dragon_host.driver import SessionDriver
from dragon_core.engine import StreamGroup
from dragon_core import validation as v
from dragon_core.errors import (DragonError, HandshakeError, InvalidOptions, QuotaExceeded,
                                RequestIdleTimeout, RequestRejected)
from dragon_core.handshake import LINK_PATH, Identity
from dragon_core.idle import DEFAULT_REQUEST_IDLE_S, RequestIdle
from dragon_core.liveness import DEFAULT_PEER_TIMEOUT_S, PeerLiveness
from dragon_core.modes import mode_rule
from dragon_vllm.admission import TENANT
from dragon_vllm.quota import IdentityQuotas

log = logging.getLogger("dragon.cloud.link")


@dataclass(frozen=True)
class LinkLimits:
    max_frame_bytes: int = codec.DEFAULT_MAX_FRAME
    max_k: int = 16
    max_tokens: int = 1024
    max_requests_per_connection: int = 64
    handshake_timeout_s: float = 10.0
    ping_interval_s: float = 0.5
    # a device silent for this long is gone (its requests end, their streams are freed); <= 0
    # disables. See docs/PROTOCOL.md, "Dead peers".
    peer_timeout_s: float = DEFAULT_PEER_TIMEOUT_S
    # a request whose device sends nothing for it this long while the cloud waits on it ends
    # (Error "request_idle_timeout"); <= 0 disables. See dragon_core/idle.py.
    request_idle_timeout_s: float = DEFAULT_REQUEST_IDLE_S
    # per device identity, over all its connections (0: no limit). Streams are counted as the
    # k an Open asks for; None: half the engine's stream slots (so one identity never holds them all)
    max_requests_per_identity: int = 64
    max_streams_per_identity: int | None = None


@dataclass
class OpenedRequest:
    group: StreamGroup
    scores: Sequence[float]
    sources: list[str]
    ids: Sequence[int] = ()  # the passages' ids, in the group's order (iterative retrieval compares them)
    documents: DocumentSource | None = None  # iterative retrieval: where the next boundaries' documents come from


class CloudBackend(Protocol):
    """What the link needs from the cloud: its identity, a way to open a request's streams
    (public retrieval + prompt layout + engine admission) and, for DRCG/Text, its passages."""

    identity: Identity
    eos_ids: frozenset[int]

    async def open_request(self, req: m.Open) -> OpenedRequest: ...

    async def public_passages(self, req: m.Open) -> m.Opened:
        """Mode "text": the top-k public passages' names, text and scores; no streams."""
        ...


class LinkStats(Protocol):
    def on_request(self, event: str) -> None: ...

    def on_bytes(self, sent: int, received: int) -> None: ...

    def on_session(self, session: s.Session) -> None: ...

    def on_documents(self, stats: DocumentStats) -> None: ...


class LinkServer:
    """aiohttp handler for ``GET /v1/dragon/link`` (WebSocket upgrade)."""

    def __init__(self, backend: CloudBackend, auth_token: str | None, limits: LinkLimits | None = None,
                 stats: LinkStats | None = None, device_tokens: Mapping[str, str] | None = None) -> None:
        """``auth_token``: the shared token (None: no check); ``device_tokens``: ``{name: token}``,
        each device's own token (its name is the identity quotas count)."""
        self.backend = backend
        self.auth_token = auth_token
        self.device_tokens: dict[str, str] = dict(device_tokens or {})
        self.limits = limits or LinkLimits()
        self.stats = stats
        self.connections: set["_Connection"] = set()
        self.quotas = IdentityQuotas(self.limits.max_requests_per_identity, self._stream_quota())
        self.refused = {QuotaExceeded.code: 0, RequestIdleTimeout.code: 0}  # requests ended by a limit

    def _stream_quota(self) -> int:
        if self.limits.max_streams_per_identity is not None:
            return self.limits.max_streams_per_identity
        admission = getattr(getattr(self.backend, "engine", None), "admission", None)
        return max(1, admission.max_slots // 2) if admission is not None else 0

    def terms(self) -> CloudTerms:
        """What each new connection holds its device to (read per connection: the device tokens
        may be added after the server is built)."""
        lim = self.limits
        return CloudTerms(self.backend.identity, self.auth_token, self.device_tokens, lim.max_k, lim.max_tokens,
                          lim.max_requests_per_connection)

    def add_routes(self, app: web.Application) -> None:
        app.router.add_get(LINK_PATH, self.handle)

    async def handle(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(max_msg_size=self.limits.max_frame_bytes, autoping=True)
        await ws.prepare(request)
        conn = _Connection(self, ws, request.remote or "?", request.transport)
        self.connections.add(conn)
        try:
            await conn.serve()
        finally:
            self.connections.discard(conn)
        return ws

    async def close_all(self) -> None:
        await asyncio.gather(*(c.ws.close(code=1001, message=b"server shutdown") for c in list(self.connections)),
                             return_exceptions=True)

    @property
    def active_requests(self) -> int:
        return sum(len(c.drivers) for c in self.connections)

    def limits_report(self) -> dict:
        """Quota use per identity and the requests the limits ended (for /health or a test)."""
        usage = {name: dict(requests=u.requests, streams=u.streams) for name, u in self.quotas.usage().items()}
        return dict(identities=usage, refused=dict(self.refused),
                    quota=dict(requests=self.quotas.max_requests, streams=self.quotas.max_streams),
                    request_idle_timeout_s=self.limits.request_idle_timeout_s)


class _Connection:
    """The aiohttp shell around one device's ``LinkConnection`` (``dragon_core.connection``):
    it moves the connection's frames, runs the timers, and runs the requests it opens."""

    def __init__(self, server: LinkServer, ws: web.WebSocketResponse, peer: str,
                 transport: asyncio.BaseTransport | None = None) -> None:
        self.server, self.ws, self.peer, self.transport = server, ws, peer, transport
        self.limits = server.limits
        self.conn = LinkConnection("cloud", server.terms(), self.limits.peer_timeout_s, self.limits.max_frame_bytes)
        self.drivers: dict[int, SessionDriver] = {}
        self.tasks: dict[int, asyncio.Task] = {}
        self._send_lock = asyncio.Lock()
        self.silent: str | None = None  # why the device was given up for silence, if it was
        self.identity = ""  # set by the handshake: what quotas and fair admission count
        self.idle: dict[int, RequestIdle] = {}  # per running request: the idle rule's state
        self.expired: set[int] = set()  # requests ended by the idle timeout

    # ------------------------------------------------------------------ lifecycle
    async def serve(self) -> None:
        try:
            if not await self._handshake():
                return
            live = self.conn.liveness
            reader = asyncio.create_task(self._read_loop())
            others = [asyncio.create_task(self._ping_loop()), asyncio.create_task(self._watch_requests())]
            if live.enabled:
                others.append(asyncio.create_task(self._watch(live)))
            try:
                # the read loop ends when the device goes away; the watchdog when it goes silent
                await asyncio.wait([reader, *others[2:]], return_when=asyncio.FIRST_COMPLETED)
            finally:
                for task in (reader, *others):
                    task.cancel()
                await asyncio.gather(reader, *others, return_exceptions=True)
            if self.silent:
                await self._drop()
        finally:
            self.conn.lost()
            await self._peer_gone()

    async def _handshake(self) -> bool:
        """The device's first frame decides (the connection checks it): a Welcome or a refusal."""
        try:
            raw = await self.ws.receive(timeout=self.limits.handshake_timeout_s)
        except asyncio.TimeoutError:
            return await self._apply(self.conn.refuse(HandshakeError("no Hello within the handshake timeout")))
        if raw.type != WSMsgType.BINARY:
            return await self._apply(self.conn.refuse(HandshakeError("expected a binary Hello frame")))
        return await self._apply(self.conn.receive(raw.data, time.monotonic()))

    async def _fail(self, exc: DragonError) -> bool:
        log.warning("refusing device %s: %s", self.peer, exc)
        await self.ws.close(code=1008, message=exc.code.encode())
        return False

    async def _peer_gone(self) -> None:
        """Running requests finish through their session (PeerLost); opening ones are cancelled."""
        for rid, task in list(self.tasks.items()):
            if rid in self.drivers:
                self.drivers[rid].feed(s.PeerLost(self.silent or "device disconnected"))
            else:
                task.cancel()
        await asyncio.gather(*self.tasks.values(), return_exceptions=True)

    async def _watch(self, live: PeerLiveness) -> None:
        """Returns when the device has been silent for longer than the peer timeout."""
        while not self.ws.closed:
            await asyncio.sleep(live.tick)
            now = time.monotonic()
            if live.lost(now):
                self.silent = f"device silent for {live.silence(now):.1f} s (peer timeout {self.limits.peer_timeout_s:g} s)"
                log.warning("giving up device %s: %s", self.peer, self.silent)
                return

    async def _watch_requests(self) -> None:
        """The request idle rule (``dragon_core.idle``), checked for every running request."""
        tick = RequestIdle(self.limits.request_idle_timeout_s, 0.0).tick
        while not self.ws.closed and tick < float("inf"):
            await asyncio.sleep(tick)
            now = time.monotonic()
            for rid, driver in list(self.drivers.items()):
                idle = self.idle.get(rid)
                if idle is not None and idle.expired(driver.session.awaiting_peer, now):
                    await self._expire(rid, driver, idle.silence(now))

    async def _expire(self, rid: int, driver: SessionDriver, silence: float) -> None:
        """End an idle request: the device gets a typed error, the session ends (its streams close)."""
        reason = (f"request {rid}: nothing from the device for {silence:.1f} s while the cloud waited on it "
                  f"(request idle timeout {self.limits.request_idle_timeout_s:g} s)")
        log.warning("%s (%s)", reason, self.identity)
        self.idle.pop(rid, None)
        self.expired.add(rid)
        self.server.refused[RequestIdleTimeout.code] += 1
        await self.send(m.Error(RequestIdleTimeout.code, reason, rid))
        driver.feed(s.PeerLost(reason))

    async def _drop(self) -> None:
        """Drop a silent device's connection now: abort the socket (a send blocked on a full
        buffer towards a dead peer fails at once instead of holding its request), then mark the
        WebSocket closed so later sends return at once."""
        if self.transport is not None:
            self.transport.abort()
        try:
            await asyncio.wait_for(self.ws.close(code=1001, message=b"peer timeout"), 0.5)
        except (asyncio.TimeoutError, ConnectionError, RuntimeError):
            pass

    # ------------------------------------------------------------------ frames in
    async def _read_loop(self) -> None:
        async for raw in self.ws:
            if raw.type == WSMsgType.BINARY:
                if self.server.stats:
                    self.server.stats.on_bytes(0, len(raw.data))
                await self._apply(self.conn.receive(raw.data, time.monotonic()))
            elif raw.type == WSMsgType.TEXT:
                await self._apply(self.conn.receive_text())
            elif raw.type == WSMsgType.ERROR:
                log.warning("link to %s failed: %s", self.peer, self.ws.exception())
                return

    async def _apply(self, events: list[Event]) -> bool:
        """Carry out the connection's events, in order; False once the device is refused."""
        for event in events:
            if isinstance(event, Send):
                await self._write(event.frame)
            elif isinstance(event, RequestMessage):
                self._route(event.request_id, event.message)
            elif isinstance(event, RequestOpened):
                await self._on_open(event.open)
            elif isinstance(event, RoundTrip):
                for driver in self.drivers.values():
                    driver.feed(s.RttSample(event.rtt_ms))
            elif isinstance(event, Admitted):
                self.identity = event.device_name or f"address:{self.peer}"
                log.info("device %s connected as %s (%s)", self.peer, self.identity,
                         event.hello.client or "unnamed client")
            elif isinstance(event, Refused):
                return await self._fail(event.error)
        return True

    def _route(self, rid: int, msg: m.Message) -> None:
        driver = self.drivers.get(rid)
        if driver is None:
            return  # a text request (no session): nothing to tell
        if rid in self.idle:
            self.idle[rid].heard(time.monotonic())
        driver.feed(s.PeerMessage(msg, at_ms=time.monotonic() * 1000))

    # ------------------------------------------------------------------ requests
    async def _on_open(self, req: m.Open) -> None:
        """The connection has put the request in its table; the cloud's own limits come next."""
        problem = self._check_open(req)
        if problem:
            await self._write(self.conn.refuse_request(req.request_id, RequestRejected.code, problem))
            return
        rule = mode_rule(req.mode)  # known: _check_open refused any other
        streams = req.k if rule.cloud_streams else 0
        over = self.server.quotas.claim(self.identity, streams)
        if over:
            self.server.refused[QuotaExceeded.code] += 1
            await self._write(self.conn.refuse_request(req.request_id, QuotaExceeded.code, over))
            return
        run = self._run_request if rule.cloud_streams else self._serve_text
        task = asyncio.create_task(run(req))
        self.tasks[req.request_id] = task
        task.add_done_callback(lambda _: self._request_done(req.request_id, streams))

    def _request_done(self, rid: int, streams: int) -> None:
        self.tasks.pop(rid, None)
        self.server.quotas.release(self.identity, streams)

    def _check_open(self, req: m.Open) -> str | None:
        """The options this cloud serves (the request id and the count per connection are the
        connection's rules)."""
        lim = self.limits
        if not 1 <= req.k <= lim.max_k:
            return f"k={req.k} is outside 1..{lim.max_k}"
        if not 1 <= req.max_tokens <= lim.max_tokens:
            return f"max_tokens={req.max_tokens} is outside 1..{lim.max_tokens}"
        if req.dist_top_k < 0 or req.max_depth < 1:
            return "dist_top_k must be >= 0 and max_depth >= 1"
        # the rules every entrance shares (dragon_core.validation): the codec checked the types
        try:
            v.check_text("query", req.query)
            v.check_int("dist_top_k", req.dist_top_k, 0, v.MAX_TOP_K)
            v.check_int("max_depth", req.max_depth, 1, v.MAX_DEPTH)
            v.check_seed(req.seed)
            if not req.sampling.greedy:
                v.check_temperature(req.sampling.temperature, "sampling.temperature")
            v.check_sampling_temperature(req.sampling.greedy, req.sampling.temperature, "sampling.temperature")
            v.check_top_p(req.sampling.top_p, "sampling.top_p")
            v.check_int("sampling.top_k", req.sampling.top_k, 0, v.MAX_TOP_K)
            if req.prior is not None:
                v.check_prior(req.prior)
            v.check_retrieve_every(req.mode, req.retrieve_every)
        except InvalidOptions as exc:
            return str(exc)
        if req.mode not in get_args(m.Mode):
            return f"unknown mode {req.mode!r}"
        if req.aggregator not in get_args(m.Side):
            return f"unknown aggregator {req.aggregator!r}"
        return None

    async def _run_request(self, req: m.Open) -> None:
        rid = req.request_id
        group = driver = None
        TENANT.set(self.identity)  # this task's context: the engine's admission queues it under its identity
        try:
            opened = await self.server.backend.open_request(req)
            group = opened.group
            if self.ws.closed:
                return
            # the vocabulary bounds every token id the device sends (checked before it is committed)
            config = s.SessionConfig.from_open(req, self.server.backend.eos_ids, vocab_size=_vocab_size(self.server.backend))
            session = s.Session("cloud", config, log_mass(opened.scores))
            # iterative retrieval: the driver swaps the streams at each boundary (and closes them)
            driver = SessionDriver(session, group, opened.scores, self.send, documents=opened.documents,
                                   first_documents=Documents(tuple(opened.ids), tuple(float(x) for x in opened.scores)))
            self.drivers[rid] = driver
            self.idle[rid] = RequestIdle(self.limits.request_idle_timeout_s, time.monotonic())
            for msg in self.conn.start(rid):  # what the device sent while the request was opening
                driver.feed(s.PeerMessage(msg, at_ms=time.monotonic() * 1000))
            if self.server.stats:
                self.server.stats.on_request("started")
            await self.send(m.Opened(rid, opened.sources))
            finish = await driver.run()
            outcome = RequestIdleTimeout.code if rid in self.expired else finish.reason
            log.info("request %d finished: %s (%d tokens)", rid, outcome, len(session.committed))
            if self.server.stats:
                self.server.stats.on_request(outcome)
                self.server.stats.on_session(session)
                if driver.documents is not None:
                    self.server.stats.on_documents(driver.documents.stats)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # one request failing must not take the connection down
            log.exception("request %d failed", rid)
            await self.send(m.Error(getattr(exc, "code", "internal_error"), str(exc) or repr(exc), rid))
        finally:
            self.conn.end(rid)
            self.drivers.pop(rid, None)
            self.idle.pop(rid, None)
            self.expired.discard(rid)
            if driver is not None:
                await driver.group.close()  # the current group (the driver closed those it replaced)
            elif group is not None:
                await group.close()

    async def _serve_text(self, req: m.Open) -> None:
        """DRCG/Text: answer with the public passages' text; no streams, no session."""
        rid = req.request_id
        try:
            if self.server.stats:
                self.server.stats.on_request("started")
            opened = await self.server.backend.public_passages(req)
            await self.send(opened)
            if self.server.stats:
                self.server.stats.on_request("text")
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.exception("text request %d failed", rid)
            await self.send(m.Error(getattr(exc, "code", "internal_error"), str(exc) or repr(exc), rid))
            if self.server.stats:
                self.server.stats.on_request("error")
        finally:
            self.conn.end(rid)

    # ------------------------------------------------------------------ frames out
    async def send(self, msg: m.Message) -> None:
        if self.ws.closed or not self.conn.is_open:
            return
        await self._write(self.conn.send(msg))

    async def _write(self, frame: bytes) -> None:
        if self.ws.closed:
            return
        async with self._send_lock:  # one writer at a time; awaiting the write is the backpressure
            try:
                await self.ws.send_bytes(frame)
            except (ConnectionError, RuntimeError):
                return
        if self.server.stats:
            self.server.stats.on_bytes(len(frame), 0)

    async def _ping_loop(self) -> None:
        while not self.ws.closed and self.conn.is_open:
            await self._write(self.conn.ping(time.monotonic()))
            await asyncio.sleep(self.limits.ping_interval_s)


def _vocab_size(backend: CloudBackend) -> int:
    """The model's vocabulary (0: unknown, the session then checks only the wire's bound)."""
    size = getattr(backend, "vocab_size", None) or getattr(getattr(backend, "engine", None), "vocab_size", 0)
    return int(size or 0)
