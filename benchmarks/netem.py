"""A network emulator for experiments: a real TCP proxy that shapes each direction of a link.

`tc netem` is not available on these machines (no netem qdisc), so the device reaches the cloud
through this proxy on loopback. It is byte-level (it parses nothing, so WebSocket, HTTP, anything
works) and adds, per direction (up = client->upstream, down = upstream->client):

* latency + jitter: each chunk read is delayed by ``latency + max(0, N(0, jitter))`` (the same
  model as ``dragon_core.testing.netsim``), but bytes are NEVER reordered: a chunk's release time is
  ``max(previous release, arrival + delay)``, as TCP would deliver it;
* bandwidth: a serialisation delay through one bottleneck per direction (``size * 8 / rate``),
  released in pieces of ~5 ms of line time so a slow link trickles rather than bursts;
* loss: TCP hides loss as delay, so each lost segment (one per ``MSS`` bytes, probability
  ``loss``) delays its bytes, and everything behind them, by one retransmission timeout;
* disconnects: ``cut_after_s`` kills each connection that long after it opened, ``cut_all()``
  (SIGUSR1 in the CLI) kills every current one, ``set_down(True)`` (SIGUSR2 toggles) resets new
  ones at once. A cut is a TCP reset, a FIN, or a silent blackhole (``cut_mode``).

It can also record what it carries: with ``capture_dir`` (``--capture DIR``) every byte each
peer sends into the link is appended, raw and in order, to ``conn-<N>-up.bin`` /
``conn-<N>-down.bin`` in that folder (N: the connection's number, from 0), as the proxy reads it
(HTTP upgrade, WebSocket framing and masks included): what an eavesdropper on that side would
see, including bytes that a blackhole, a cut or the end of the connection then keeps from the
other peer. ``read_capture(dir)`` loads them back.

Run as a process: ``python -m benchmarks.netem --listen 127.0.0.1:9100 --upstream
127.0.0.1:8000 --latency-ms 150 --jitter-ms 30`` (first stdout line: ``LISTENING <port>``, last:
``STATS <json>``). Import for tests: ``async with NetemProxy(...) as proxy`` or ``spawn_proxy``.
See docs/NETEM.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import logging
import math
import os
import random
import select
import signal
import socket
import struct
import subprocess
import sys
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Literal

log = logging.getLogger("netem")

CHUNK = 64 * 1024  # bytes per read: one timestamp per chunk
MSS = 1448  # an Ethernet-sized TCP segment: the unit of loss (loopback's own MSS is ~64 KiB)
SLICE_S = 0.005  # a bandwidth-limited chunk is released in pieces of at most this much line time
RCVBUF = 64 * 1024  # kernel receive buffer of a socket carrying a bandwidth-limited direction
CutMode = Literal["reset", "close", "blackhole"]
CUT_MODES: tuple[str, ...] = ("reset", "close", "blackhole")
DIRECTIONS: tuple[str, ...] = ("up", "down")  # up = client -> upstream, down = upstream -> client


@dataclass(frozen=True)
class Shape:
    """How one direction of the link behaves. All zero: a transparent proxy."""

    latency_ms: float = 0.0  # one-way delay
    jitter_ms: float = 0.0  # std of a normal added to the latency per chunk (clipped at 0)
    bandwidth_mbps: float = 0.0  # 1 Mbit/s = 1e6 bit/s; 0: unlimited
    loss: float = 0.0  # probability that a segment of MSS bytes is lost once
    rto_ms: float = 200.0  # what one lost segment costs (Linux's minimum RTO)

    def __post_init__(self) -> None:
        for f in fields(self):
            if not math.isfinite(getattr(self, f.name)) or getattr(self, f.name) < 0:
                raise ValueError(f"{f.name} must be a finite number >= 0")
        if self.loss > 1:
            raise ValueError("loss is a probability in [0, 1]")

    def to_args(self, prefix: str) -> list[str]:
        """CLI flags that rebuild this shape for one direction (``prefix`` "up" or "down")."""
        out: list[str] = []
        for f in fields(self):
            out += [f"--{prefix}-{f.name.replace('_', '-')}", repr(getattr(self, f.name))]
        return out


class Link:
    """When the bytes of one direction are delivered. Sans-I/O: times in seconds, any clock."""

    def __init__(self, shape: Shape, rng: random.Random) -> None:
        self.shape, self.rng = shape, rng
        self.free_at = -math.inf  # when the bottleneck finishes sending what it already has
        self.last_release = -math.inf
        self.losses = 0

    def schedule(self, size: int, now: float) -> list[tuple[float, int]]:
        """(release time, byte count) pieces covering ``size`` bytes that arrived at ``now``."""
        s = self.shape
        delay = s.latency_ms + (max(0.0, self.rng.gauss(0.0, s.jitter_ms)) if s.jitter_ms else 0.0)
        pieces = []
        for n in self._split(size):
            done = now
            if s.bandwidth_mbps:
                self.free_at = max(now, self.free_at) + n * 8 / (s.bandwidth_mbps * 1e6)
                done = self.free_at
            lost = self._lost_segments(n)
            self.losses += lost
            release = max(self.last_release, done + (delay + lost * s.rto_ms) / 1e3)
            self.last_release = release
            pieces.append((release, n))
        return pieces

    def _split(self, size: int) -> list[int]:
        if not self.shape.bandwidth_mbps:
            return [size]
        step = max(MSS, int(self.shape.bandwidth_mbps * 1e6 / 8 * SLICE_S))
        return [min(step, size - off) for off in range(0, size, step)]

    def _lost_segments(self, n: int) -> int:
        p = self.shape.loss
        if not p:
            return 0
        return sum(self.rng.random() < p for _ in range(-(-n // MSS)))


@dataclass
class Stats:
    bytes_up: int = 0  # delivered to the upstream
    bytes_down: int = 0  # delivered to the client
    opened: int = 0
    closed: int = 0
    refused: int = 0  # over max_connections, upstream unreachable, or set_down
    cut: int = 0
    losses_up: int = 0
    losses_down: int = 0

    def as_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)


class _Conn:
    """One client connection and its upstream twin."""

    def __init__(self, cid: int, client: asyncio.StreamWriter, upstream: asyncio.StreamWriter) -> None:
        self.cid, self.client, self.upstream = cid, client, upstream
        self.tasks: list[asyncio.Task[None]] = []
        self.blackholed = False
        self.cut_reason: str | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.capture: _Capture | None = None

    def cut(self, mode: CutMode, reason: str) -> None:
        """Idempotent; a blackholed connection can still be closed (e.g. at shutdown)."""
        self.cut_reason = self.cut_reason or f"{reason} ({mode})"
        if mode == "blackhole":  # both peers keep a socket that goes silent: only timeouts notice
            self.blackholed = True
            return
        for w in (self.client, self.upstream):
            _abort(w, rst=mode == "reset")
        for t in self.tasks:
            t.cancel()


class _Capture:
    """Appends each direction's bytes of one connection, as read from their sender, to its own
    file, unbuffered (a reader of the file sees every byte as soon as the proxy has it)."""

    def __init__(self, folder: Path, cid: int) -> None:
        self.files = {d: open(capture_path(folder, cid, d), "xb", buffering=0) for d in DIRECTIONS}

    def write(self, direction: str, data: bytes) -> None:
        self.files[direction].write(data)

    def close(self) -> None:
        for f in self.files.values():
            f.close()


def _prepare_capture_dir(folder: Path) -> None:
    """Create the folder; refuse one holding earlier captures (connection numbers restart at 0)."""
    folder.mkdir(parents=True, exist_ok=True)
    if earlier := sorted(p.name for p in folder.glob("conn-*-*.bin")):
        raise FileExistsError(f"{folder} already holds captures ({earlier[0]}, ...): use one empty folder per proxy")


def capture_path(folder: str | os.PathLike[str], cid: int, direction: str) -> Path:
    """Where connection ``cid``'s ``direction`` ("up" or "down") bytes are recorded."""
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be one of {DIRECTIONS}")
    return Path(folder) / f"conn-{cid}-{direction}.bin"


def read_capture(folder: str | os.PathLike[str]) -> dict[int, dict[str, bytes]]:
    """Every recorded connection of a capture folder: ``{connection number: {"up": bytes, "down": bytes}}``."""
    out: dict[int, dict[str, bytes]] = {}
    for path in Path(folder).glob("conn-*-*.bin"):
        _, cid, direction = path.stem.split("-")
        if direction in DIRECTIONS and cid.isdigit():
            out.setdefault(int(cid), {d: b"" for d in DIRECTIONS})[direction] = path.read_bytes()
    return dict(sorted(out.items()))


def _cap_rcvbuf(writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(OSError, AttributeError):
        writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RCVBUF)


def _abort(writer: asyncio.StreamWriter, rst: bool) -> None:
    """Close now, dropping what is buffered; ``rst``: the peer sees a reset instead of a FIN."""
    if rst:
        with contextlib.suppress(OSError, AttributeError):
            sock = writer.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.transport.abort()
    else:
        writer.transport.close()


class NetemProxy:
    """``async with NetemProxy(upstream=(host, port), up=Shape(...), down=Shape(...)) as p: p.port``.

    ``capture_dir``: record every byte each peer sends, per connection and direction (``capture_path``).
    """

    def __init__(
        self,
        upstream: tuple[str, int],
        listen: tuple[str, int] = ("127.0.0.1", 0),
        up: Shape = Shape(),
        down: Shape = Shape(),
        seed: int | None = None,
        cut_after_s: float | None = None,
        cut_mode: CutMode = "reset",
        max_connections: int | None = None,
        queue_chunks: int = 8,
        capture_dir: str | os.PathLike[str] | None = None,
    ) -> None:
        if cut_mode not in CUT_MODES:
            raise ValueError(f"cut_mode must be one of {CUT_MODES}")
        self.upstream, self.listen, self.up, self.down = upstream, listen, up, down
        self.seed, self.cut_after_s, self.cut_mode = seed, cut_after_s, cut_mode
        self.max_connections, self.queue_chunks = max_connections, queue_chunks
        self.capture_dir = None if capture_dir is None else Path(capture_dir)
        self.stats = Stats()
        self._conns: dict[int, _Conn] = {}
        self._handlers: set[asyncio.Task[None]] = set()
        self._server: asyncio.Server | None = None
        self._down = False
        self._next_id = 0

    # -------------------------------------------------------------- lifecycle
    async def start(self) -> NetemProxy:
        if self.capture_dir is not None:
            _prepare_capture_dir(self.capture_dir)
        self._server = await asyncio.start_server(self._handle, *self.listen, limit=2 * CHUNK)
        log.info("listening on %s:%d -> %s:%d up=%s down=%s seed=%s", *self.listen[:1], self.port,
                 *self.upstream, self.up, self.down, self.seed)
        return self

    async def stop(self) -> None:
        """Stop accepting, close every connection with a FIN, wait for the handlers to end."""
        if self._server is not None:
            self._server.close()
        for conn in list(self._conns.values()):
            conn.cut("close", "shutdown")  # not counted as a cut
        if self._handlers:
            await asyncio.wait(set(self._handlers), timeout=5)
        if self._server is not None:
            await self._server.wait_closed()  # 3.12+ waits for the connections: cut them first

    async def __aenter__(self) -> NetemProxy:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    @property
    def port(self) -> int:
        assert self._server is not None, "start() first"
        return self._server.sockets[0].getsockname()[1]

    @property
    def active(self) -> int:
        return len(self._conns)

    @property
    def bytes_up(self) -> int:
        return self.stats.bytes_up

    @property
    def bytes_down(self) -> int:
        return self.stats.bytes_down

    # -------------------------------------------------------------- controls
    def cut_all(self, mode: CutMode | None = None, reason: str = "cut_all") -> int:
        """Cut every current connection now; returns how many."""
        conns = list(self._conns.values())
        for conn in conns:
            self._cut(conn, mode or self.cut_mode, reason)
        return len(conns)

    def set_down(self, down: bool) -> None:
        """While down, new connections are reset as soon as they are accepted."""
        self._down = down
        log.info("link %s", "DOWN: refusing new connections" if down else "UP")

    @property
    def is_down(self) -> bool:
        return self._down

    def _cut(self, conn: _Conn, mode: CutMode, reason: str) -> None:
        if conn.cut_reason is None:
            self.stats.cut += 1
        conn.cut(mode, reason)

    # -------------------------------------------------------------- connections
    async def _handle(self, creader: asyncio.StreamReader, cwriter: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        try:
            await self._serve_conn(creader, cwriter)
        finally:
            self._handlers.discard(task)

    async def _serve_conn(self, creader: asyncio.StreamReader, cwriter: asyncio.StreamWriter) -> None:
        peer = cwriter.get_extra_info("peername")
        full = self.max_connections is not None and len(self._conns) >= self.max_connections
        if self._down or full:
            self.stats.refused += 1
            log.info("refused %s (%s)", peer, "down" if self._down else "max_connections")
            _abort(cwriter, rst=True)
            return
        try:
            ureader, uwriter = await asyncio.open_connection(*self.upstream, limit=2 * CHUNK)
        except OSError as e:
            self.stats.refused += 1
            log.info("refused %s: upstream %s:%d unreachable (%s)", peer, *self.upstream, e)
            _abort(cwriter, rst=True)
            return
        # A bandwidth-limited direction is a bottleneck: cap the kernel buffer the proxy reads it
        # from, or loopback autotuning (up to tcp_rmem's max, 32 MiB here) would hide seconds of
        # queue inside the "link" and the sender would never feel the limit.
        if self.up.bandwidth_mbps:
            _cap_rcvbuf(cwriter)
        if self.down.bandwidth_mbps:
            _cap_rcvbuf(uwriter)
        cid, self._next_id = self._next_id, self._next_id + 1
        conn = _Conn(cid, cwriter, uwriter)
        if self.capture_dir is not None:
            conn.capture = _Capture(self.capture_dir, cid)
        self._conns[cid] = conn
        self.stats.opened += 1
        log.info("open #%d %s", cid, peer)
        if self.cut_after_s is not None:
            loop = asyncio.get_running_loop()
            conn.timer = loop.call_later(self.cut_after_s, self._cut, conn, self.cut_mode, "cut_after_s")
        up, down = self._links(cid)
        conn.tasks = [
            asyncio.create_task(self._pump(conn, creader, uwriter, up, "up")),
            asyncio.create_task(self._pump(conn, ureader, cwriter, down, "down")),
        ]
        reason = await self._run(conn)
        if conn.timer is not None:
            conn.timer.cancel()
        for w in (cwriter, uwriter):
            _abort(w, rst=False)
        if conn.capture is not None:
            conn.capture.close()
        del self._conns[cid]
        self.stats.closed += 1
        log.info("close #%d: %s", cid, conn.cut_reason or reason)

    async def _run(self, conn: _Conn) -> str:
        """Wait for both directions to end (EOF each way), or the first failure, or a cut."""
        done, pending = await asyncio.wait(conn.tasks, return_when=asyncio.FIRST_EXCEPTION)
        for t in pending:
            t.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        errors = [t.exception() for t in done if not t.cancelled() and t.exception()]
        return f"error: {errors[0]!r}" if errors else "eof"

    def _count(self, name: str, n: int) -> None:
        setattr(self.stats, name, getattr(self.stats, name) + n)

    def _links(self, cid: int) -> tuple[Link, Link]:
        # One RNG per connection and direction: concurrent connections do not perturb each other.
        def rng(direction: str) -> random.Random:
            return random.Random(None if self.seed is None else f"{self.seed}/{cid}/{direction}")

        return Link(self.up, rng("up")), Link(self.down, rng("down"))

    async def _pump(self, conn: _Conn, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                    link: Link, direction: str) -> None:
        """Read, timestamp, schedule; a bounded queue holds the sender back (bounded memory)."""
        queue: asyncio.Queue[tuple[bytes, list[tuple[float, int]]] | None] = asyncio.Queue(self.queue_chunks)
        tasks = {asyncio.create_task(self._feed(conn, reader, link, queue, direction)),
                 asyncio.create_task(self._deliver(conn, writer, queue, direction))}
        try:  # ends when both end (EOF delivered) or either fails (a reset on either socket)
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
            for t in done:
                if not t.cancelled() and (e := t.exception()) is not None:
                    raise e
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _feed(self, conn: _Conn, reader: asyncio.StreamReader, link: Link,
                    queue: asyncio.Queue[tuple[bytes, list[tuple[float, int]]] | None], direction: str) -> None:
        loop = asyncio.get_running_loop()
        while data := await reader.read(CHUNK):
            if conn.capture is not None:  # what the sender put on the wire, whatever happens to it
                conn.capture.write(direction, data)
            if conn.blackholed:
                continue  # keep reading so the sender is not blocked: the bytes just vanish
            before = link.losses
            pieces = link.schedule(len(data), loop.time())
            self._count(f"losses_{direction}", link.losses - before)
            await queue.put((data, pieces))
        await queue.put(None)

    async def _deliver(self, conn: _Conn, writer: asyncio.StreamWriter,
                       queue: asyncio.Queue[tuple[bytes, list[tuple[float, int]]] | None],
                       direction: str) -> None:
        loop = asyncio.get_running_loop()
        while (item := await queue.get()) is not None:
            data, pieces = item
            off = 0
            for release, n in pieces:
                if (wait := release - loop.time()) > 0:
                    await asyncio.sleep(wait)
                if conn.blackholed:
                    break
                writer.write(data[off:off + n])
                await writer.drain()
                off += n
                self._count(f"bytes_{direction}", n)
        # Pass the half-close on, after the data, as TCP would. A blackhole passes nothing: the
        # connection lasts until both peers give up (or the proxy stops).
        if not conn.blackholed and writer.can_write_eof():
            writer.write_eof()


# ---------------------------------------------------------------------------- subprocess helpers
REPO_ROOT = Path(__file__).resolve().parents[1]


def spawn_proxy(
    upstream: tuple[str, int],
    listen: tuple[str, int] = ("127.0.0.1", 0),
    up: Shape = Shape(),
    down: Shape = Shape(),
    seed: int | None = None,
    cut_after_s: float | None = None,
    cut_mode: CutMode = "reset",
    max_connections: int | None = None,
    capture_dir: str | os.PathLike[str] | None = None,
    stderr: int | None = subprocess.DEVNULL,
    timeout_s: float = 15.0,
) -> tuple[subprocess.Popen[str], int]:
    """Start the proxy as a child process; returns it and the port it listens on.

    Control it with signals: ``cut_proxy`` (SIGUSR1), ``stop_proxy`` (SIGTERM, returns stats).
    ``capture_dir``: record every byte each peer sends there (``--capture``; read with
    ``read_capture`` once ``stop_proxy`` returned, or any time for what was sent so far).
    """
    argv = [sys.executable, "-m", "benchmarks.netem", "--listen", _fmt(listen), "--upstream", _fmt(upstream),
            *up.to_args("up"), *down.to_args("down"), "--cut-mode", cut_mode]
    if seed is not None:
        argv += ["--seed", str(seed)]
    if cut_after_s is not None:
        argv += ["--cut-after-s", repr(cut_after_s)]
    if max_connections is not None:
        argv += ["--max-connections", str(max_connections)]
    if capture_dir is not None:
        argv += ["--capture", os.fspath(capture_dir)]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])))
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=stderr, text=True, env=env)
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], timeout_s)
    line = proc.stdout.readline() if ready else ""
    if not line.startswith("LISTENING "):
        proc.kill()
        proc.wait()
        raise RuntimeError(f"netem proxy did not start (first line {line!r}, exit code {proc.returncode})")
    return proc, int(line.split()[1])


def cut_proxy(proc: subprocess.Popen[str]) -> None:
    """Ask a spawned proxy to cut every current connection (asynchronous: a signal)."""
    proc.send_signal(signal.SIGUSR1)


def stop_proxy(proc: subprocess.Popen[str], timeout_s: float = 10.0) -> dict[str, int]:
    """SIGTERM a spawned proxy, wait for it, return its final ``Stats`` as a dict."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=timeout_s)
    for line in out.splitlines():
        if line.startswith("STATS "):
            return json.loads(line[len("STATS "):])
    raise RuntimeError(f"netem proxy exited with {proc.returncode} without stats")


def _fmt(addr: tuple[str, int]) -> str:
    host, port = addr
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def parse_addr(text: str) -> tuple[str, int]:
    """``host:port``, ``[v6]:port`` or ``:port`` (127.0.0.1)."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        raise argparse.ArgumentTypeError(f"expected host:port, got {text!r}")
    return host.strip("[]") or "127.0.0.1", int(port)


# ---------------------------------------------------------------------------- CLI
_HELP = {
    "latency_ms": "one-way delay in ms",
    "jitter_ms": "std (ms) of a normal added to the delay of each chunk, clipped at 0; never reorders",
    "bandwidth_mbps": "bottleneck rate in Mbit/s (1e6 bit/s); 0 = unlimited",
    "loss": "probability that a TCP segment (1448 B) is lost; each loss delays the stream by rto-ms",
    "rto_ms": "delay one lost segment costs (retransmission timeout)",
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.netem",
        description="TCP proxy that emulates a network link (latency, jitter, bandwidth, loss, disconnects) "
                    "per direction: up = client->upstream, down = upstream->client. "
                    "Prints 'LISTENING <port>' first, 'STATS <json>' on exit. "
                    "Signals: SIGUSR1 cuts all current connections, SIGUSR2 toggles refusing new ones, "
                    "SIGTERM/SIGINT shut down gracefully.")
    p.add_argument("--listen", type=parse_addr, default=("127.0.0.1", 0), help="host:port (port 0: any free one)")
    p.add_argument("--upstream", type=parse_addr, required=True, help="host:port to forward to")
    for f in fields(Shape):
        flag, default = f.name.replace("_", "-"), f.default
        p.add_argument(f"--{flag}", type=float, default=default, help=f"{_HELP[f.name]} (both directions; default {default})")
        for d in ("up", "down"):
            p.add_argument(f"--{d}-{flag}", type=float, default=None, help=f"override --{flag} for {d}")
    p.add_argument("--seed", type=int, default=None, help="RNG seed for jitter and loss (default: random)")
    p.add_argument("--cut-after-s", type=float, default=None, help="cut each connection this long after it opened")
    p.add_argument("--cut-mode", choices=CUT_MODES, default="reset",
                   help="reset: TCP RST both peers; close: FIN both peers; blackhole: stop forwarding silently")
    p.add_argument("--max-connections", type=int, default=None, help="reset connections beyond this many")
    p.add_argument("--queue-chunks", type=int, default=8, help="64 KiB chunks buffered per direction (back-pressure)")
    p.add_argument("--capture", metavar="DIR", default=None,
                   help="append every byte each peer sends to DIR/conn-<N>-up.bin / conn-<N>-down.bin (raw)")
    p.add_argument("--log-level", default="INFO", help="logging level, to stderr")
    return p


def shapes_from_args(args: argparse.Namespace) -> tuple[Shape, Shape]:
    def shape(d: str) -> Shape:
        vals = {f.name: getattr(args, f"{d}_{f.name}") for f in fields(Shape)}
        return Shape(**{k: getattr(args, k) if v is None else v for k, v in vals.items()})

    return shape("up"), shape("down")


async def serve(args: argparse.Namespace) -> Stats:
    up, down = shapes_from_args(args)
    proxy = NetemProxy(args.upstream, args.listen, up, down, seed=args.seed, cut_after_s=args.cut_after_s,
                       cut_mode=args.cut_mode, max_connections=args.max_connections, queue_chunks=args.queue_chunks,
                       capture_dir=args.capture)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    async with proxy:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        loop.add_signal_handler(signal.SIGUSR1, lambda: log.info("SIGUSR1: cut %d", proxy.cut_all(reason="SIGUSR1")))
        loop.add_signal_handler(signal.SIGUSR2, lambda: proxy.set_down(not proxy.is_down))
        print(f"LISTENING {proxy.port}", flush=True)
        await stop.wait()
        log.info("shutting down")
    return proxy.stats


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s netem %(levelname)s %(message)s")
    try:
        shapes_from_args(args)
    except ValueError as e:
        build_parser().error(str(e))
    stats = asyncio.run(serve(args))
    print("STATS " + json.dumps(stats.as_dict()), flush=True)


if __name__ == "__main__":
    main()
