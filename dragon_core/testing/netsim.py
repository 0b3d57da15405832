"""A deterministic discrete-event network simulator for running two sessions against each other.

* ``EventLoop``: virtual time in milliseconds, events ordered by (time, insertion order).
* ``Link``: one direction of a TCP-like connection: in-order delivery, latency + jitter,
  bandwidth (serialisation delay), loss modelled as a retransmission delay (TCP hides loss as
  delay), and an optional cut time after which nothing is delivered.
* ``SimulatedPair``: drives a device and a cloud ``Session`` over two links with fake engines
  that return given distributions after a given decode time. Frames go through the real codec,
  so sizes are real and the codec is exercised. Both sides ping; a side that hears nothing from
  its peer for ``peer_timeout_ms`` gets ``PeerLost`` (the links' rule, ``dragon_core.liveness``).

Nothing here sleeps or touches a socket: a run is a pure function of its inputs and seeds.
"""

from __future__ import annotations

import heapq
import itertools
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from dragon_core import codec
from dragon_core import iterative
from dragon_core import messages as m
from dragon_core import session as s
from dragon_core.dist import Dist
from dragon_core.liveness import PeerLiveness


class EventLoop:
    def __init__(self) -> None:
        self.now = 0.0
        self._queue: list[tuple[float, int, Callable[[], None]]] = []
        self._seq = itertools.count()

    def at(self, time_ms: float, fn: Callable[[], None]) -> None:
        heapq.heappush(self._queue, (max(time_ms, self.now), next(self._seq), fn))

    def after(self, delay_ms: float, fn: Callable[[], None]) -> None:
        self.at(self.now + delay_ms, fn)

    def run(self, until: Callable[[], bool], max_events: int = 500_000) -> None:
        # a normal simulated answer takes a few thousand events: a protocol that loops without
        # advancing (a zero-delay exchange) fails here in seconds, not after minutes
        for _ in range(max_events):
            if until() or not self._queue:
                return
            self.now, _, fn = heapq.heappop(self._queue)
            fn()
        raise RuntimeError("simulation did not finish within max_events")


@dataclass
class LinkSpec:
    latency_ms: float = 0.0
    jitter_ms: float = 0.0  # std of a normal added to the latency (clipped at 0)
    bandwidth_bps: float = 0.0  # 0: unlimited
    loss: float = 0.0  # per-frame probability of one retransmission
    rto_ms: float = 200.0
    cut_at_ms: float | None = None  # the connection dies at this time
    seed: int = 0


class Link:
    """One direction; ``send`` schedules ``deliver(frame)`` at the arrival time."""

    def __init__(self, loop: EventLoop, spec: LinkSpec) -> None:
        self.loop, self.spec = loop, spec
        self._rng = np.random.default_rng(spec.seed)
        self._free_at = 0.0  # when the sender's pipe finishes serialising the previous frame
        self._last_arrival = 0.0
        self.bytes_sent = 0
        self.frames: list[bytes] = []  # every frame, for privacy checks

    def cut(self) -> bool:
        return self.spec.cut_at_ms is not None and self.loop.now >= self.spec.cut_at_ms

    def send(self, frame: bytes, deliver: Callable[[bytes], None]) -> None:
        if self.cut():
            return
        sp = self.spec
        self.bytes_sent += len(frame)
        self.frames.append(frame)
        start = max(self.loop.now, self._free_at)
        self._free_at = start + (len(frame) * 8 / sp.bandwidth_bps * 1000 if sp.bandwidth_bps else 0.0)
        delay = sp.latency_ms + max(0.0, float(self._rng.normal(0, sp.jitter_ms))) if sp.jitter_ms else sp.latency_ms
        if sp.loss and self._rng.random() < sp.loss:
            delay += sp.rto_ms
        arrival = max(self._last_arrival, self._free_at + delay)  # TCP: in order
        self._last_arrival = arrival
        if sp.cut_at_ms is not None and arrival >= sp.cut_at_ms:
            return
        self.loop.at(arrival, lambda: deliver(frame))


# ---------------------------------------------------------------------------- fake engines
DistFn = Callable[[tuple[int, ...]], Dist]  # generated prefix -> this side's mixture
DecodeMs = Callable[[float, int], float]  # (now_ms, step) -> decode time of one draft


@dataclass
class Speculation:
    """RaLMSpec on a simulated side: at each retrieval boundary past the first, the side decodes
    over documents from its cache at once and checks them against the real retrieval
    ``verify_ms`` later. ``right(boundary prefix)``: the cache gave the real documents; where it
    did not, ``dist_fn`` / ``log_h_fn`` are the side's mixture and mass over the cache's ones."""

    right: Callable[[tuple[int, ...]], bool]
    dist_fn: DistFn
    log_h_fn: Callable[[tuple[int, ...]], float]
    verify_ms: float = 30.0


@dataclass
class SideSpec:
    log_h: float
    dist_fn: DistFn
    decode_ms: DecodeMs = lambda now, step: 10.0
    # iterative retrieval: the retrieval mass of the documents a prefix's step is computed over
    # (None: ``log_h`` throughout). ``dist_fn`` then mixes those same documents.
    log_h_fn: Callable[[tuple[int, ...]], float] | None = None
    speculation: Speculation | None = None
    # iterative retrieval's cost: a step at a boundary (past the first) waits this long for its
    # real retrieval, unless it speculates (then the real retrieval runs beside, ``verify_ms``)
    retrieve_ms: float = 0.0

    def log_h_at(self, prefix: tuple[int, ...]) -> float:
        return self.log_h if self.log_h_fn is None else self.log_h_fn(prefix)


@dataclass
class SideRecord:
    commits: list[tuple[float, int]] = field(default_factory=list)  # (time, token)
    finish: s.Finish | None = None
    finish_ms: float | None = None
    engine_calls: int = 0
    aggregator_changes: list[tuple[float, str]] = field(default_factory=list)

    @property
    def tokens(self) -> list[int]:
        return [t for _, t in self.commits]


class _SimSide:
    """The driver of one side: executes a session's actions on a fake engine and a link."""

    def __init__(self, pair: "SimulatedPair", side: m.Side, sess: s.Session, spec: SideSpec) -> None:
        self.pair, self.side, self.session, self.spec = pair, side, sess, spec
        self.stream: list[int] = []
        self.busy_until = 0.0
        self.out_link: Link | None = None
        self.record = SideRecord()
        self.peer_lost = False
        self.liveness = PeerLiveness(pair.peer_timeout_ms, 0.0)  # the links' dead-peer rule, in ms
        self.checked: dict[tuple[int, ...], bool] = {}  # RaLMSpec: boundary prefix -> the cache was right
        self.checking: set[tuple[int, ...]] = set()
        self.retrieved: set[tuple[int, ...]] = set()  # boundary prefixes retrieved for real (cached)

    def handle(self, event: s.Event) -> None:
        before = self.session.aggregator
        for action in self.session.handle(event):
            self._execute(action)
        if self.session.aggregator != before:
            self.record.aggregator_changes.append((self.pair.loop.now, self.session.aggregator))

    def _computed(self, ev: s.LocalDist) -> None:
        self.pair._progress_ms = self.pair.loop.now
        self.handle(ev)

    def _documents(self, prefix: tuple[int, ...]):
        """(mixture, log h or None, speculated boundary or None) of the step after ``prefix``."""
        spec, every = self.spec, self.session.config.retrieve_every
        log_h = None if spec.log_h_fn is None else spec.log_h_at(prefix)
        b = iterative.boundary(len(prefix), every)
        key = prefix[:b]
        if spec.speculation is None or b == 0 or key in self.checked:
            return spec.dist_fn(prefix), log_h, None
        sp = spec.speculation
        if key not in self.checking:  # the real retrieval starts with the speculation
            self.checking.add(key)
            self.pair.loop.after(sp.verify_ms, lambda: self._checked(key))
        if sp.right(key):
            return spec.dist_fn(prefix), log_h, b
        return sp.dist_fn(prefix), sp.log_h_fn(prefix), b

    def _retrieval_wait(self, prefix: tuple[int, ...], speculated: int | None) -> float:
        """A boundary's first compute waits for its real retrieval, unless it speculated."""
        every = self.session.config.retrieve_every
        b = iterative.boundary(len(prefix), every)
        if not every or b == 0 or speculated is not None or prefix[:b] in self.retrieved:
            return 0.0
        self.retrieved.add(prefix[:b])
        return self.spec.retrieve_ms

    def _checked(self, key: tuple[int, ...]) -> None:
        self.checking.discard(key)
        self.retrieved.add(key)
        self.checked[key] = ok = self.spec.speculation.right(key)
        self.pair._progress_ms = self.pair.loop.now
        self.handle(s.RetrievalChecked(key, ok))

    def _execute(self, a: s.Action) -> None:
        loop = self.pair.loop
        if isinstance(a, s.Rollback):
            del self.stream[a.length:]
        elif isinstance(a, s.Append):
            self.stream.extend(a.tokens)
        elif isinstance(a, s.ComputeDist):
            assert len(self.stream) == a.step, "driver invariant: streams hold `step` tokens"
            prefix = tuple(self.stream)
            dist, log_h, speculated = self._documents(prefix)
            cost = self.spec.decode_ms(loop.now, a.step) + self._retrieval_wait(prefix, speculated)
            self.busy_until = max(loop.now, self.busy_until) + cost
            self.record.engine_calls += 1
            done = self.busy_until
            ev = s.LocalDist(a.epoch, a.step, dist, cost, at_ms=done, log_h=log_h, speculated=speculated)
            loop.at(done, lambda: self._computed(ev))
        elif isinstance(a, s.Send):
            self.pair.send(self, a.msg)
        elif isinstance(a, s.Commit):
            self.record.commits.extend((loop.now, t) for t in a.tokens)
        elif isinstance(a, s.Finish):
            self.record.finish, self.record.finish_ms = a, loop.now


class SimulatedPair:
    """Device and cloud sessions of one request over simulated links."""

    def __init__(self, config: s.SessionConfig, device: SideSpec, cloud: SideSpec,
                 up: LinkSpec | None = None, down: LinkSpec | None = None,
                 ping_every_ms: float = 50.0, peer_timeout_ms: float = 1000.0, stall_ms: float = 60_000.0) -> None:
        self.loop = EventLoop()
        # simulated time without a message other than Ping/Pong, a computed step or a commit: the
        # pings would keep a deadlocked pair alive forever, so it fails with the sides' state
        self.stall_ms, self._progress_ms = stall_ms, 0.0
        self.config = config
        self.ping_every_ms, self.peer_timeout_ms = ping_every_ms, peer_timeout_ms
        self.up = Link(self.loop, up or LinkSpec(seed=1))  # device -> cloud
        self.down = Link(self.loop, down or LinkSpec(seed=2))  # cloud -> device
        self.device = _SimSide(self, "device", s.Session("device", config, device.log_h), device)
        self.cloud = _SimSide(self, "cloud", s.Session("cloud", config, cloud.log_h), cloud)
        self.device.out_link, self.cloud.out_link = self.up, self.down
        self._nonce = itertools.count()

    def send(self, sender: _SimSide, msg: m.Message) -> None:
        receiver = self.cloud if sender is self.device else self.device
        sender.out_link.send(codec.encode(msg), lambda frame: self._deliver(receiver, frame))

    def _deliver(self, receiver: _SimSide, frame: bytes) -> None:
        msg = codec.decode(frame)
        receiver.liveness.heard(self.loop.now)  # any frame is life
        if not isinstance(msg, (m.Ping, m.Pong)):
            self._progress_ms = self.loop.now
        if isinstance(msg, m.Ping):
            self.send(receiver, m.Pong(msg.nonce, msg.sent_at))
        elif isinstance(msg, m.Pong):
            receiver.handle(s.RttSample(self.loop.now - msg.sent_at))
        else:
            receiver.handle(s.PeerMessage(msg, at_ms=self.loop.now))

    def _ping(self, side: _SimSide) -> None:
        if self.done() or side.session.finished is not None:
            return
        if not side.peer_lost and side.liveness.lost(self.loop.now):
            side.peer_lost = True  # the link layer's dead-peer deadline (dragon_core.liveness)
            side.handle(s.PeerLost("peer silent"))
        elif not side.out_link.cut():
            self.send(side, m.Ping(next(self._nonce), self.loop.now))
        self.loop.after(self.ping_every_ms, lambda: self._ping(side))

    def done(self) -> bool:
        dev_done = self.device.session.finished is not None
        return dev_done and (self.cloud.session.finished is not None or self.down.cut() or self.up.cut())

    def run(self) -> "SimulatedPair":
        for side in (self.device, self.cloud):
            self.loop.at(0.0, lambda side=side: side.handle(s.Start()))
            self.loop.at(0.0, lambda side=side: self._ping(side))
        self.loop.run(lambda: self.done() or self._stalled())
        return self

    def _stalled(self) -> bool:
        if self.loop.now - self._progress_ms <= self.stall_ms:
            return False
        state = {side.side: (len(side.session.committed), side.session._computing, side.session.finished)
                 for side in (self.device, self.cloud)}
        raise RuntimeError(f"simulation stalled: nothing but pings for {self.stall_ms:.0f} simulated ms "
                           f"(side: committed, computing, finished): {state}")
