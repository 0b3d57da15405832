"""The network emulator (benchmarks/netem.py): its timing model alone, then the real proxy over
real sockets on loopback with an asyncio echo server (and an aiohttp WebSocket one) upstream,
in-process and as a subprocess. Timing bounds are generous: the machine has 2 busy cores."""

from __future__ import annotations

import asyncio
import contextlib
import random
import statistics
import time

import aiohttp
import pytest
from aiohttp import web

from benchmarks.netem import (MSS, Link, NetemProxy, Shape, build_parser, capture_path, cut_proxy, read_capture,
                              shapes_from_args, spawn_proxy, stop_proxy)


# ---------------------------------------------------------------------------- helpers
@contextlib.asynccontextmanager
async def loopback_server(handle):
    """A TCP server on 127.0.0.1 running ``handle`` per connection; yields its address."""
    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    try:
        yield ("127.0.0.1", server.sockets[0].getsockname()[1])
    finally:
        server.close()


@contextlib.asynccontextmanager
async def echo_server():
    """Echoes every byte back; passes a half-close on."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError):
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
            writer.write_eof()
        writer.close()

    async with loopback_server(handle) as addr:
        yield addr


@contextlib.asynccontextmanager
async def proxied(up: Shape = Shape(), down: Shape = Shape(), **kw):
    async with echo_server() as upstream, NetemProxy(upstream, up=up, down=down, **kw) as proxy:
        yield proxy


async def connect(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", port)


async def round_trips_ms(port: int, n: int = 5, size: int = 16) -> list[float]:
    reader, writer = await connect(port)
    out = []
    for _ in range(n):
        msg = random.randbytes(size)
        t0 = time.perf_counter()
        writer.write(msg)
        await writer.drain()
        assert await reader.readexactly(size) == msg
        out.append((time.perf_counter() - t0) * 1e3)
    writer.close()
    return out


async def echo(port: int, payload: bytes) -> tuple[bytes, float]:
    """Send ``payload`` while reading the echo concurrently; returns (echo, seconds)."""
    reader, writer = await connect(port)
    t0 = time.perf_counter()

    async def send() -> None:
        for off in range(0, len(payload), 32768):
            writer.write(payload[off:off + 32768])
            await writer.drain()
        writer.write_eof()

    sender = asyncio.create_task(send())
    back = await reader.read(-1)  # until EOF: the half-close went through the proxy and back
    await sender
    writer.close()
    return back, time.perf_counter() - t0


async def ends_within(reader: asyncio.StreamReader, timeout_s: float) -> bool:
    """True if the connection is closed (EOF or reset) within the timeout, False if still open."""
    try:
        return await asyncio.wait_for(reader.read(1), timeout_s) == b""
    except (ConnectionResetError, BrokenPipeError):
        return True
    except asyncio.TimeoutError:
        return False


async def until(cond, timeout_s: float = 2.0) -> None:
    deadline = time.perf_counter() + timeout_s
    while not cond():
        assert time.perf_counter() < deadline, "condition not reached in time"
        await asyncio.sleep(0.01)


# ---------------------------------------------------------------------------- timing model
def test_jitter_never_reorders_and_the_seed_fixes_the_schedule():
    shape = Shape(latency_ms=10, jitter_ms=30)

    def run(seed: int) -> list[float]:
        link = Link(shape, random.Random(seed))
        return [link.schedule(100, i * 1e-3)[0][0] for i in range(2000)]

    a = run(1)
    assert all(x <= y for x, y in zip(a, a[1:]))  # in order
    assert all(t >= i * 1e-3 + 0.010 for i, t in enumerate(a))  # never earlier than the latency
    delays = [t - i * 1e-3 for i, t in enumerate(a)]
    assert statistics.mean(delays) > 0.010 + 0.005  # jitter really adds delay
    assert run(1) == a and run(2) != a


def test_bandwidth_is_a_serialisation_delay_in_small_pieces():
    link = Link(Shape(latency_ms=20, bandwidth_mbps=8), random.Random(0))
    pieces = link.schedule(1_000_000, now=0.0)
    assert sum(n for _, n in pieces) == 1_000_000
    assert max(n for _, n in pieces) <= 5_000  # 5 ms of line time at 1 MB/s
    assert pieces[-1][0] == pytest.approx(1.0 + 0.020)
    assert pieces[0][0] == pytest.approx(0.005 + 0.020)
    # The bottleneck is busy for 1 s: bytes arriving at 0.5 s queue behind the first megabyte.
    assert link.schedule(MSS, now=0.5)[0][0] == pytest.approx(1.0 + MSS * 8 / 8e6 + 0.020)


def test_each_lost_segment_costs_one_rto():
    link = Link(Shape(loss=1.0, rto_ms=200), random.Random(0))
    assert link.schedule(3 * MSS, now=0.0) == [(pytest.approx(0.6), 3 * MSS)]
    link = Link(Shape(loss=0.1), random.Random(0))
    for i in range(100):
        link.schedule(10 * MSS, now=float(i))
    assert 60 <= link.losses <= 140  # binomial(1000, 0.1)


def test_cli_direction_flags_override_the_symmetric_ones():
    args = build_parser().parse_args(
        ["--upstream", "127.0.0.1:8000", "--latency-ms", "150", "--jitter-ms", "30", "--down-latency-ms", "40",
         "--up-bandwidth-mbps", "2", "--loss", "0.01"])
    up, down = shapes_from_args(args)
    assert up == Shape(latency_ms=150, jitter_ms=30, bandwidth_mbps=2, loss=0.01)
    assert down == Shape(latency_ms=40, jitter_ms=30, loss=0.01)
    assert shapes_from_args(build_parser().parse_args(["--upstream", ":1", *up.to_args("up")]))[0] == up
    with pytest.raises(ValueError):
        Shape(loss=1.5)


# ---------------------------------------------------------------------------- real sockets
@pytest.mark.parametrize("up_ms,down_ms,lo,hi", [(50, 50, 95, 160), (80, 0, 75, 140)])
def test_round_trip_is_the_sum_of_both_latencies(up_ms, down_ms, lo, hi):
    async def main():
        async with proxied(Shape(latency_ms=up_ms), Shape(latency_ms=down_ms)) as proxy:
            return await round_trips_ms(proxy.port)

    rtts = asyncio.run(main())
    assert lo <= statistics.median(rtts) <= hi, rtts
    assert min(rtts) >= up_ms + down_ms - 2  # a delay is never shortened


@pytest.mark.parametrize("direction", ["up", "down"])
def test_one_megabyte_at_8_mbits_takes_about_a_second(direction):
    shaped = Shape(bandwidth_mbps=8)
    payload = random.randbytes(1_000_000)

    async def main():
        async with proxied(**{direction: shaped}) as proxy:
            back, took = await echo(proxy.port, payload)
            return back, took, proxy.stats

    back, took, stats = asyncio.run(main())
    assert back == payload
    assert 0.8 <= took <= 1.6, took
    assert stats.bytes_up == stats.bytes_down == len(payload)


def test_jitter_keeps_every_stream_intact_and_in_order_across_concurrent_connections():
    payloads = [random.randbytes(2_000_000), random.randbytes(300_000), random.randbytes(300_000)]
    jittery = Shape(latency_ms=5, jitter_ms=20)

    async def main():
        async with proxied(jittery, jittery, seed=7) as proxy:
            results = await asyncio.gather(*(echo(proxy.port, p) for p in payloads))
            await until(lambda: proxy.active == 0)
            return [r[0] for r in results], proxy.stats

    backs, stats = asyncio.run(main())
    assert backs == payloads
    assert stats.opened == stats.closed == 3
    assert stats.bytes_up == stats.bytes_down == sum(map(len, payloads))


def test_loss_adds_retransmission_delay_but_never_corrupts():
    async def main():
        async with proxied(Shape(loss=1.0, rto_ms=100), Shape(loss=1.0, rto_ms=100)) as proxy:
            rtts = await round_trips_ms(proxy.port, n=3)  # one segment lost each way, every time
        lossy = Shape(loss=0.01, rto_ms=30)
        payload = random.randbytes(1_000_000)
        async with proxied(lossy, lossy, seed=3) as proxy:
            back, took = await echo(proxy.port, payload)
            return rtts, back == payload, took, proxy.stats

    rtts, intact, took, stats = asyncio.run(main())
    assert all(195 <= r <= 300 for r in rtts), rtts
    assert intact
    assert stats.losses_up > 0 and stats.losses_down > 0
    assert took >= 0.030  # a lost segment holds back its bytes (and all behind them) by one RTO


def test_cut_all_resets_every_connection_and_new_ones_still_work():
    async def main():
        async with proxied(seed=1) as proxy:
            conns = [await connect(proxy.port) for _ in range(3)]
            for reader, writer in conns:
                writer.write(b"hi")
                assert await reader.readexactly(2) == b"hi"
            assert proxy.cut_all() == 3
            closed = [await ends_within(reader, 1.0) for reader, _ in conns]
            await until(lambda: proxy.active == 0)
            after = await round_trips_ms(proxy.port, n=1)
            return closed, proxy.stats, after

    closed, stats, after = asyncio.run(main())
    assert closed == [True, True, True]
    assert stats.cut == 3 and stats.opened == 4 and len(after) == 1


def test_cut_after_s_kills_each_connection_on_schedule():
    async def main():
        async with proxied(cut_after_s=0.3) as proxy:
            reader, writer = await connect(proxy.port)
            t0 = time.perf_counter()
            writer.write(b"x")
            assert await reader.readexactly(1) == b"x"
            closed = await ends_within(reader, 2.0)
            return closed, time.perf_counter() - t0

    closed, took = asyncio.run(main())
    assert closed and 0.25 <= took <= 0.9, took


def test_blackhole_goes_silent_without_closing(tmp_path):
    async def main():
        async with proxied(cut_mode="blackhole", capture_dir=tmp_path) as proxy:
            reader, writer = await connect(proxy.port)
            writer.write(b"a")
            assert await reader.readexactly(1) == b"a"
            proxy.cut_all()
            writer.write(b"b")
            await writer.drain()
            silent_and_open = not await ends_within(reader, 0.4)
            still_tracked = proxy.active == 1
            writer.close()
            return silent_and_open, still_tracked, proxy.stats.bytes_up

    silent_and_open, still_tracked, bytes_up = asyncio.run(main())
    assert silent_and_open and still_tracked and bytes_up == 1
    # the capture is what the client sent, including what the blackhole swallowed
    assert read_capture(tmp_path) == {0: {"up": b"ab", "down": b"a"}}


def test_max_connections_and_down_refuse_new_connections():
    async def main():
        async with proxied(max_connections=1) as proxy:
            first = await connect(proxy.port)
            second, _ = await connect(proxy.port)  # accepted by the kernel, then reset by the proxy
            refused_when_full = await ends_within(second, 1.0)
            first[1].close()
            await until(lambda: proxy.active == 0)
            proxy.set_down(True)
            third, _ = await connect(proxy.port)
            refused_when_down = await ends_within(third, 1.0)
            proxy.set_down(False)
            ok = await round_trips_ms(proxy.port, n=1)
            return refused_when_full, refused_when_down, ok, proxy.stats

    full, down, ok, stats = asyncio.run(main())
    assert full and down and len(ok) == 1
    assert stats.refused == 2


def test_websocket_frames_cross_the_proxy_with_its_latency():
    async def ws_echo(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        async for msg in ws:
            await ws.send_bytes(msg.data)
        return ws

    async def main():
        app = web.Application()
        app.router.add_get("/ws", ws_echo)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        try:
            shape = Shape(latency_ms=20, jitter_ms=5)
            async with NetemProxy(("127.0.0.1", port), up=shape, down=shape, seed=5) as proxy:
                async with aiohttp.ClientSession() as http, http.ws_connect(f"http://127.0.0.1:{proxy.port}/ws") as ws:
                    rtts, intact = [], True
                    for i in range(5):
                        msg = random.randbytes(100 + 50_000 * i)
                        t0 = time.perf_counter()
                        await ws.send_bytes(msg)
                        intact &= (await ws.receive_bytes(timeout=5)) == msg
                        rtts.append((time.perf_counter() - t0) * 1e3)
                    return rtts, intact
        finally:
            await runner.cleanup()

    rtts, intact = asyncio.run(main())
    assert intact
    assert 38 <= statistics.median(rtts) <= 150, rtts


def test_subprocess_prints_its_port_forwards_cuts_and_reports_stats():
    async def main():
        async with echo_server() as upstream:
            shape = Shape(latency_ms=30)
            proc, port = await asyncio.to_thread(spawn_proxy, upstream, up=shape, down=shape, seed=1)
            try:
                rtts = await round_trips_ms(port, n=3, size=10)
                reader, writer = await connect(port)
                writer.write(b"y")
                assert await reader.readexactly(1) == b"y"
                cut_proxy(proc)
                closed = await ends_within(reader, 2.0)
            finally:
                stats = await asyncio.to_thread(stop_proxy, proc)
            return rtts, closed, stats, proc.returncode

    rtts, closed, stats, code = asyncio.run(main())
    assert all(58 <= r <= 150 for r in rtts), rtts
    assert closed and code == 0
    assert stats["bytes_up"] == stats["bytes_down"] == 31 and stats["cut"] == 1 and stats["opened"] == 2


# ---------------------------------------------------------------------------- capture
@contextlib.asynccontextmanager
async def answer_server():
    """Reads until the client's half-close, then answers with different bytes (the input
    reversed, twice): each direction carries its own bytes."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        data = await reader.read(-1)
        writer.write(data[::-1] * 2)
        await writer.drain()
        writer.close()

    async with loopback_server(handle) as addr:
        yield addr


def test_capture_records_exactly_the_bytes_sent_each_way_per_connection(tmp_path):
    payloads = [random.randbytes(700_000), random.randbytes(3), random.randbytes(150_000)]
    shape = Shape(latency_ms=2, jitter_ms=3, bandwidth_mbps=400)  # split into pieces, interleaved

    async def main():
        async with answer_server() as upstream, NetemProxy(upstream, up=shape, down=shape, seed=2,
                                                           capture_dir=tmp_path / "cap") as proxy:
            backs = await asyncio.gather(*(echo(proxy.port, p) for p in payloads))
            await until(lambda: proxy.active == 0)
            return [b for b, _ in backs], proxy.stats

    backs, stats = asyncio.run(main())
    assert backs == [p[::-1] * 2 for p in payloads]
    cap = read_capture(tmp_path / "cap")
    assert sorted(cap) == [0, 1, 2]
    # connection numbers follow accept order, which the gather does not fix: match by content
    assert sorted((c["up"], c["down"]) for c in cap.values()) == sorted((p, p[::-1] * 2) for p in payloads)
    assert sum(len(c["up"]) for c in cap.values()) == stats.bytes_up
    assert sum(len(c["down"]) for c in cap.values()) == stats.bytes_down
    assert capture_path(tmp_path / "cap", 1, "down").name == "conn-1-down.bin"
    with pytest.raises(FileExistsError):  # connection numbers restart at 0: never mix two runs
        asyncio.run(NetemProxy(("127.0.0.1", 9), capture_dir=tmp_path / "cap").start())


def test_capture_of_a_subprocess_ends_at_a_cut(tmp_path):
    async def main():
        async with echo_server() as upstream:
            proc, port = await asyncio.to_thread(spawn_proxy, upstream, capture_dir=tmp_path, seed=1)
            try:
                reader, writer = await connect(port)
                writer.write(b"before the cut")
                assert await reader.readexactly(14) == b"before the cut"
                cut_proxy(proc)
                assert await ends_within(reader, 2.0)
                with contextlib.suppress(ConnectionError):
                    writer.write(b"after")
                    await writer.drain()
            finally:
                stats = await asyncio.to_thread(stop_proxy, proc)
            return stats

    stats = asyncio.run(main())
    assert read_capture(tmp_path) == {0: {"up": b"before the cut", "down": b"before the cut"}}
    assert stats["bytes_up"] == stats["bytes_down"] == 14
