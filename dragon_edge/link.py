"""The device's end of the cloud link: one aiohttp WebSocket carrying many concurrent requests.

``CloudLink`` connects (with timeouts and exponential backoff), does the handshake, pings for
RTT samples (fed to every running session's scheduler) and routes frames to sessions by
``request_id``. When the connection dies, or the cloud stays silent for longer than
``peer_timeout_s`` (``dragon_core.liveness``: a blackholed connection that TCP would notice
only after minutes), every running session gets ``PeerLost`` and goes on device-only from its
last committed token; the next request reconnects. A live cloud that sends nothing for one
request while the device waits on it, for longer than ``request_idle_timeout_s`` (the cloud's
own rule, ``dragon_core.idle``), loses that request alone: it goes on device-only, degraded, and
the cloud gets a ``Cancel``, so no answer waits forever on a stuck cloud request. Nothing here raises into the application
once a request runs. The link's rules are ``dragon_core.connection.LinkConnection``'s (one for the
link's life, across reconnections); this module only moves its frames and runs its timers.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from dataclasses import dataclass
from typing import Callable

import aiohttp

from dragon_core import codec
from dragon_core import messages as m
from dragon_core import session as s
from dragon_core.connection import (BadFrame, Event, LinkConnection, PeerError, RequestMessage, RoundTrip, Send,
                                    Traffic)
from dragon_host.driver import SessionDriver
from dragon_core.errors import DragonError, HandshakeError, ProtocolError
from dragon_core.handshake import LINK_PATH, Identity
from dragon_core.idle import DEFAULT_REQUEST_IDLE_S, RequestIdle
from dragon_core.liveness import DEFAULT_PEER_TIMEOUT_S, PeerLiveness

log = logging.getLogger("dragon.edge.link")


class LinkUnavailable(DragonError):
    code = "cloud_unavailable"


class CloudRefused(DragonError):
    """The cloud answered a request with an ``Error`` (a DRCG/Text request has no session to tell)."""

    code = "cloud_refused"


@dataclass(frozen=True)
class LinkOptions:
    connect_timeout_s: float = 5.0
    ping_interval_s: float = 0.5
    max_frame_bytes: int = codec.DEFAULT_MAX_FRAME
    backoff_initial_s: float = 0.2
    backoff_max_s: float = 10.0
    connect_attempts: int = 3
    # the cloud is lost after this long without a frame from it (pings every ping_interval_s
    # keep a live link talking); <= 0 disables. See docs/PROTOCOL.md, "Dead peers".
    peer_timeout_s: float = DEFAULT_PEER_TIMEOUT_S
    # a request the device waits on, with no frame for it from a live cloud for this long, goes on
    # device-only (degraded) and is cancelled on the cloud; <= 0 disables. See dragon_core/idle.py.
    request_idle_timeout_s: float = DEFAULT_REQUEST_IDLE_S


class CloudLink:
    """The aiohttp shell around the device's ``LinkConnection`` (``dragon_core.connection``):
    it moves the connection's frames, runs its timers and hands its events to the sessions."""

    def __init__(self, url: str, identity: Identity, auth_token: str = "", options: LinkOptions | None = None,
                 client_name: str = "dragon-edge") -> None:
        self.url = url.rstrip("/") + LINK_PATH if not url.rstrip("/").endswith(LINK_PATH) else url
        self.identity, self.auth_token = identity, auth_token
        self.options = options or LinkOptions()
        self.client_name = client_name
        self.tap: Callable[[str, bytes], None] | None = None  # sees every frame: ("up"|"down", bytes)
        # one connection for the link's life: request ids and byte counts outlive a socket
        self._conn = LinkConnection("device", peer_timeout_s=self.options.peer_timeout_s,
                                    max_frame_bytes=self.options.max_frame_bytes)
        self._http: aiohttp.ClientSession | None = None
        self._ws: aiohttp.ClientWebSocketResponse | None = None
        self._drivers: dict[int, SessionDriver] = {}
        self._idle: dict[int, RequestIdle] = {}  # per running request: the idle rule's state
        self._opened: dict[int, asyncio.Future[m.Opened]] = {}
        self._tasks: list[asyncio.Task] = []
        self._send_lock = asyncio.Lock()
        self._connect_lock = asyncio.Lock()
        self._closed = False

    # ------------------------------------------------------------------ what the connection knows
    @property
    def welcome(self) -> m.Welcome | None:
        return self._conn.welcome

    @property
    def rtt_ms(self) -> float | None:
        return self._conn.rtt_ms

    @property
    def bytes_sent(self) -> int:
        return self._conn.traffic.sent

    @property
    def bytes_received(self) -> int:
        return self._conn.traffic.received

    def traffic(self, request_id: int) -> Traffic:
        """The bytes of one request's frames so far (``release`` returns the final count)."""
        return self._conn.request_traffic(request_id)

    # ------------------------------------------------------------------ connection
    @property
    def connected(self) -> bool:
        return self._ws is not None and not self._ws.closed

    async def connect(self) -> None:
        """Connect and handshake, retrying with backoff; ``LinkUnavailable`` if all attempts fail.
        A handshake refusal (wrong token, fingerprint, version) is not retried."""
        async with self._connect_lock:
            if self.connected:
                return
            delay = self.options.backoff_initial_s
            for attempt in range(1, self.options.connect_attempts + 1):
                try:
                    await self._connect_once()
                    return
                except HandshakeError:
                    raise
                except (aiohttp.ClientError, asyncio.TimeoutError, OSError, LinkUnavailable) as exc:
                    log.info("cloud link attempt %d/%d failed: %s", attempt, self.options.connect_attempts, exc)
                    if attempt == self.options.connect_attempts:
                        raise LinkUnavailable(f"cannot reach the cloud at {self.url}: {exc}") from exc
                    await asyncio.sleep(delay * (1 + random.random() / 2))
                    delay = min(delay * 2, self.options.backoff_max_s)

    async def _connect_once(self) -> None:
        if self._http is None:
            self._http = aiohttp.ClientSession()
        timeout = aiohttp.ClientWSTimeout(ws_close=self.options.connect_timeout_s)
        ws = await asyncio.wait_for(
            self._http.ws_connect(self.url, max_msg_size=self.options.max_frame_bytes, timeout=timeout,
                                  autoping=True, heartbeat=None),
            self.options.connect_timeout_s)
        await self._handshake(ws)
        self._ws = ws
        live = self._conn.liveness
        self._tasks = [t for t in self._tasks if not t.done()]
        self._tasks += [asyncio.create_task(self._read_loop(ws)), asyncio.create_task(self._ping_loop(ws))]
        if live.enabled:
            self._tasks.append(asyncio.create_task(self._watch(ws, live)))
        if RequestIdle(self.options.request_idle_timeout_s, 0.0).enabled:
            self._tasks.append(asyncio.create_task(self._watch_requests(ws)))
        log.info("connected to %s (%s)", self.url, self.welcome.server)

    async def _handshake(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        """Hello up, the cloud's reply down (the connection raises on anything but a Welcome)."""
        hello = self._conn.hello(self.identity.hello(self.auth_token, self.client_name))
        await ws.send_bytes(hello)
        if self.tap is not None:
            self.tap("up", hello)
        raw = await ws.receive(timeout=self.options.connect_timeout_s)
        try:
            if raw.type != aiohttp.WSMsgType.BINARY:
                self._conn.lost()
                raise LinkUnavailable(f"cloud closed the link during the handshake ({raw.type.name})")
            self._conn.receive(raw.data, time.monotonic())
        except (HandshakeError, ProtocolError, LinkUnavailable) as exc:
            await ws.close()
            if isinstance(exc, ProtocolError):
                raise LinkUnavailable(str(exc)) from exc
            raise

    async def close(self) -> None:
        self._closed = True
        for t in self._tasks:
            t.cancel()
        if self._ws is not None:  # a live cloud answers the close frame within an RTT; a silent one never
            await _drop(self._ws, grace_s=min(self.options.connect_timeout_s, 1.0))
        if self._http is not None:
            await self._http.close()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def __aenter__(self) -> "CloudLink":
        await self.connect()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    # ------------------------------------------------------------------ requests
    def new_request_id(self) -> int:
        return self._conn.new_request_id()

    async def open(self, req: m.Open, driver: SessionDriver) -> None:
        """Register the request's driver, then ask the cloud to join. Failures reach the session
        as ``PeerLost`` (it continues device-only), never as an exception."""
        self._drivers[req.request_id] = driver
        self._idle[req.request_id] = RequestIdle(self.options.request_idle_timeout_s, time.monotonic())
        self._opened[req.request_id] = asyncio.get_running_loop().create_future()
        if not await self.send(req):
            driver.feed(s.PeerLost("cloud link unavailable"))

    async def fetch_passages(self, req: m.Open, timeout_s: float) -> m.Opened:
        """DRCG/Text (``req.mode == "text"``): send the query, wait for the cloud's public passages.
        No session runs on either side. ``LinkUnavailable`` / ``CloudRefused`` if none come."""
        fut = asyncio.get_running_loop().create_future()
        self._opened[req.request_id] = fut  # kept until release(), so opened_now() sees it too
        if not await self.send(req):
            raise LinkUnavailable("cloud link unavailable")
        # wait() rather than await: a future cancelled by _on_lost must not look like our cancellation
        await asyncio.wait({fut}, timeout=timeout_s)
        if not fut.done():
            raise LinkUnavailable(f"no passages from the cloud within {timeout_s:.0f} s")
        if fut.cancelled():
            raise LinkUnavailable("cloud connection lost before the passages arrived")
        return fut.result()  # raises CloudRefused if the cloud sent an Error

    def opened_now(self, request_id: int) -> m.Opened | None:
        """The cloud's ``Opened`` for a request, if it has arrived (it names the public sources)."""
        fut = self._opened.get(request_id)
        if fut is None or not fut.done() or fut.cancelled() or fut.exception() is not None:
            return None
        return fut.result()

    def release(self, request_id: int) -> Traffic:
        """The request is over on the device; returns the bytes its frames took on the link."""
        self._drivers.pop(request_id, None)
        self._idle.pop(request_id, None)
        fut = self._opened.pop(request_id, None)
        if fut is not None and not fut.done():
            fut.cancel()
        return self._conn.end(request_id)

    async def send(self, msg: m.Message) -> bool:
        ws = self._ws
        if ws is None or ws.closed:
            return False
        return await self._write(ws, self._conn.send(msg))

    async def _write(self, ws: aiohttp.ClientWebSocketResponse, frame: bytes) -> bool:
        async with self._send_lock:
            try:
                await ws.send_bytes(frame)
            except (ConnectionError, RuntimeError, aiohttp.ClientError):
                return False
        if self.tap is not None:
            self.tap("up", frame)
        return True

    # ------------------------------------------------------------------ frames in
    async def _read_loop(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        try:
            async for raw in ws:
                if raw.type == aiohttp.WSMsgType.BINARY:
                    if self.tap is not None:
                        self.tap("down", raw.data)
                    for event in self._conn.receive(raw.data, time.monotonic()):
                        self._on_event(ws, event)
                elif raw.type == aiohttp.WSMsgType.ERROR:
                    break
        finally:
            self._on_lost(ws, "cloud connection lost")

    def _on_event(self, ws: aiohttp.ClientWebSocketResponse, event: Event) -> None:
        if isinstance(event, RequestMessage):
            self._on_request_message(event.message)
        elif isinstance(event, Send):  # a pong
            asyncio.get_running_loop().create_task(self._write(ws, event.frame))
        elif isinstance(event, RoundTrip):
            for driver in self._drivers.values():
                driver.feed(s.RttSample(event.rtt_ms))
        elif isinstance(event, PeerError):
            log.warning("cloud error: %s: %s", event.error.code, event.error.message)
        elif isinstance(event, BadFrame):
            log.warning("dropping a frame from the cloud: %s", event.error)

    def _on_request_message(self, msg: m.Message) -> None:
        rid = msg.request_id
        if isinstance(msg, m.Opened):
            self._resolve(rid, msg)
        elif isinstance(msg, m.Error) and rid not in self._drivers:
            # a request without a session (DRCG/Text) waits on its Opened future
            self._resolve(rid, CloudRefused(f"{msg.code}: {msg.message}"))
        elif rid in self._drivers:
            if rid in self._idle:
                self._idle[rid].heard(time.monotonic())
            if isinstance(msg, m.Error):  # the session records it (Session.peer_error) and goes on device-only
                log.warning("cloud ended request %d: %s: %s", rid, msg.code, msg.message)
            self._drivers[rid].feed(s.PeerMessage(msg, at_ms=time.monotonic() * 1000))

    def _resolve(self, request_id: int, result: m.Opened | Exception) -> None:
        fut = self._opened.get(request_id)
        if fut is None or fut.done():
            return
        if isinstance(result, Exception):
            fut.set_exception(result)
        else:
            fut.set_result(result)

    def _on_lost(self, ws: aiohttp.ClientWebSocketResponse, reason: str) -> None:
        if ws is not self._ws:
            return  # that connection was already given up (peer timeout) or replaced
        self._ws = None
        self._conn.lost()
        for driver in self._drivers.values():
            driver.feed(s.PeerLost(reason))
        for fut in self._opened.values():
            if not fut.done():
                fut.cancel()
        if not self._closed:
            log.warning("%s; running answers continue on the device", reason)

    async def _ping_loop(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        while not ws.closed and ws is self._ws:
            await self._write(ws, self._conn.ping(time.monotonic()))
            await asyncio.sleep(self.options.ping_interval_s)

    async def _watch(self, ws: aiohttp.ClientWebSocketResponse, live: PeerLiveness) -> None:
        """The dead-peer deadline: a cloud silent for longer than ``peer_timeout_s`` is lost,
        exactly as if the connection had been cut; the socket is then dropped without waiting."""
        while ws is self._ws and not ws.closed:
            await asyncio.sleep(live.tick)
            now = time.monotonic()
            if live.lost(now):
                self._on_lost(ws, f"cloud silent for {live.silence(now):.1f} s "
                                  f"(peer timeout {self.options.peer_timeout_s:g} s)")
                for t in self._tasks:
                    if t is not asyncio.current_task() and not t.done():
                        t.cancel()  # this connection's read and ping loops
                _abort(ws)
                await _drop(ws)
                return


    async def _watch_requests(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        """The request idle rule (``dragon_core.idle``), checked for every running request: only
        time the session spends waiting on the cloud counts, never the device's own decoding."""
        idle_s = self.options.request_idle_timeout_s
        tick = RequestIdle(idle_s, 0.0).tick
        while ws is self._ws and not ws.closed:
            await asyncio.sleep(tick)
            now = time.monotonic()
            for rid, idle in list(self._idle.items()):
                driver = self._drivers.get(rid)
                if driver is None or not idle.expired(driver.session.awaiting_peer, now):
                    continue
                del self._idle[rid]
                reason = (f"cloud sent nothing for request {rid} for {idle.silence(now):.1f} s "
                          f"(request idle timeout {idle_s:g} s)")
                log.warning("%s; that answer continues on the device", reason)
                driver.feed(s.PeerLost(reason))
                await self.send(m.Cancel(rid, "request_idle_timeout"))


def _abort(ws: aiohttp.ClientWebSocketResponse) -> None:
    """Abort the socket under a WebSocket now: a send blocked on a full buffer towards a dead
    peer fails at once instead of holding its session (aiohttp has no public way to reach it)."""
    conn = getattr(getattr(ws, "_response", None), "connection", None)
    transport = getattr(conn, "transport", None)
    if transport is not None:
        transport.abort()


async def _drop(ws: aiohttp.ClientWebSocketResponse, grace_s: float = 0.5) -> None:
    """Close a connection to a silent peer: a close frame, but no waiting for the peer's."""
    try:
        await asyncio.wait_for(ws.close(code=aiohttp.WSCloseCode.GOING_AWAY, message=b"peer timeout"), grace_s)
    except (asyncio.TimeoutError, ConnectionError, RuntimeError, aiohttp.ClientError):
        pass  # a timed-out close() has already closed the transport
