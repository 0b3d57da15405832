"""The device link over real sockets on loopback (aiohttp server + client), with in-memory
engines standing in for vLLM / llama.cpp (those have their own tests and the e2e tests)."""

from __future__ import annotations

import asyncio
import contextlib
import time

import aiohttp
import pytest
from aiohttp import web

from dragon_core import codec
from dragon_core import messages as m
from dragon_core import session as s
from dragon_core.aggregate import log_mass
from dragon_host.driver import SessionDriver
from dragon_core.errors import HandshakeError
from dragon_core.handshake import Identity
from dragon_core.liveness import PeerLiveness
from dragon_core.testing.reference import centralized_decode, solo_decode
from dragon_demo import free_port
from dragon_edge.baselines import LazyGroup
from dragon_edge.link import CloudLink, CloudRefused, LinkOptions, LinkUnavailable
from dragon_vllm.link import LINK_PATH, LinkLimits, LinkServer, OpenedRequest

from benchmarks.netem import NetemProxy
from fakes import EOS, ListStreams, side_spec

IDENTITY = Identity("fake-model", "mfp", "tfp", "rfp", "cosine*10")
TOKEN = "s3cret"
DEV_DOCS, DEV_SCORES = [1, 2], [3.0, 2.5]
CLOUD_DOCS, CLOUD_SCORES = [3, 4, 5], [2.8, 2.0, 1.0]


class FakeBackend:
    identity = IDENTITY
    eos_ids = frozenset({EOS})

    def __init__(self, world: int = 0, delay_s: float = 0.002, prefill_s: float = 0.0) -> None:
        self.world, self.delay_s, self.prefill_s = world, delay_s, prefill_s
        self.groups: list[ListStreams] = []

    async def open_request(self, req: m.Open) -> OpenedRequest:
        await asyncio.sleep(self.prefill_s)
        # a query "world N" (see ask()) picks the documents' world, so requests differ
        world = int(req.query.split()[1]) if req.query.startswith("world ") else self.world
        group = ListStreams(CLOUD_DOCS, world, self.delay_s)
        self.groups.append(group)
        return OpenedRequest(group, CLOUD_SCORES, [f"public-{d}" for d in CLOUD_DOCS])

    async def public_passages(self, req: m.Open) -> m.Opened:
        if req.query == "fail":
            raise RuntimeError("index offline")
        docs = CLOUD_DOCS[:req.k]
        return m.Opened(req.request_id, [f"public-{d}" for d in docs], [f"text of {d}" for d in docs],
                        CLOUD_SCORES[:req.k])


@contextlib.asynccontextmanager
async def cloud_server(backend: FakeBackend, limits: LinkLimits | None = None):
    server = LinkServer(backend, TOKEN, limits or LinkLimits(ping_interval_s=0.05))
    app = web.Application()
    server.add_routes(app)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)  # the kernel picks a free port, bound at once
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield server, f"http://127.0.0.1:{port}"
    finally:
        await server.close_all()
        await runner.cleanup()


async def ask(link: CloudLink | None, config_kw: dict, world: int = 0, delay_s: float = 0.004,
              tokens: list[int] | None = None):
    """One device request over the link in ``world`` (both sides' documents and the seed);
    returns (tokens, finish, session). ``tokens`` fills as tokens are committed."""
    rid = link.new_request_id() if link else 1
    open_msg = m.Open(rid, f"world {world}", k=len(CLOUD_DOCS), seed=world, **{"scheduling": False, **config_kw})
    config = s.SessionConfig.from_open(open_msg, [EOS])
    session = s.Session("device", config, log_mass(DEV_SCORES), solo=link is None)
    tokens = [] if tokens is None else tokens

    async def send(msg):
        if link is not None:
            await link.send(msg)

    driver = SessionDriver(session, ListStreams(DEV_DOCS, world, delay_s), DEV_SCORES, send, tokens.extend)
    if link is not None:
        await link.open(open_msg, driver)
    try:
        finish = await asyncio.wait_for(driver.run(), 30)
    finally:
        if link is not None:
            link.release(rid)
    return tokens, finish, session


def central(world: int, max_tokens: int, sampling: m.Sampling = m.Sampling()) -> list[int]:
    config = s.SessionConfig(request_id=0, max_tokens=max_tokens, seed=world, eos_ids=frozenset({EOS}),
                             sampling=sampling)
    return centralized_decode(config, side_spec(DEV_DOCS, DEV_SCORES, world), side_spec(CLOUD_DOCS, CLOUD_SCORES, world))


def cloud_alone(world: int, max_tokens: int) -> list[int]:
    config = s.SessionConfig(request_id=0, max_tokens=max_tokens, seed=world, eos_ids=frozenset({EOS}), mode="cloud")
    return solo_decode(config, side_spec(CLOUD_DOCS, CLOUD_SCORES, world), "cloud")


SAMPLED = m.Sampling(greedy=False, temperature=1.0)
# Six different requests at once on one connection: each its own world (documents, seed), length
# and mode, so an answer routed to, or computed from, the wrong request is caught.
MIXED = [  # (world, Open fields, expected tokens)
    (0, dict(max_tokens=18), lambda: central(0, 18)),
    (1, dict(max_tokens=12, aggregator="cloud"), lambda: central(1, 12)),
    (2, dict(max_tokens=15, mode="vdrag", sampling=SAMPLED), lambda: central(2, 15, SAMPLED)),
    (3, dict(max_tokens=20, mode="sw"), lambda: central(3, 20)),
    (4, dict(max_tokens=16, mode="cloud"), lambda: cloud_alone(4, 16)),
    (5, dict(max_tokens=25, mode="vdrag"), lambda: central(5, 25)),
]


def test_many_different_concurrent_requests_on_one_connection_are_each_exact():
    wants = [want() for _, _, want in MIXED]
    assert len({tuple(w) for w in wants}) == len(MIXED)  # all different: a mix-up cannot go unseen

    async def main():
        backend = FakeBackend()
        async with cloud_server(backend) as (server, url):
            async with CloudLink(url, IDENTITY, TOKEN) as link:
                results = await asyncio.gather(*(ask(link, kw, world=w) for w, kw, _ in MIXED))
            for (world, kw, _), want, (tokens, finish, session) in zip(MIXED, wants, results):
                assert tokens == want, f"request in world {world} ({kw})"
                assert not finish.degraded
                if kw.get("mode") != "cloud":
                    assert session.stats.decided_here == (len(tokens) if kw.get("aggregator") != "cloud" else 0)
            await asyncio.sleep(0.05)
            assert all(g.closed for g in backend.groups) and len(backend.groups) == 6
            assert server.active_requests == 0

    asyncio.run(main())


@pytest.mark.parametrize("what", ["token", "fingerprint", "score_function"])
def test_handshake_refusals_are_typed(what):
    async def main():
        async with cloud_server(FakeBackend()) as (_, url):
            ident, token = IDENTITY, TOKEN
            if what == "token":
                token = "wrong"
            elif what == "fingerprint":
                ident = Identity("fake-model", "other", "tfp", "rfp", "cosine*10")
            else:
                ident = Identity("fake-model", "mfp", "tfp", "rfp", "dot")
            link = CloudLink(url, ident, token)
            with pytest.raises(HandshakeError) as err:
                await link.connect()
            await link.close()
            return str(err.value)

    message = asyncio.run(main())
    assert {"token": "auth", "fingerprint": "model fingerprint", "score_function": "score function"}[what] in message


def test_wrong_protocol_version_and_garbage_get_typed_errors_and_server_keeps_serving():
    async def main():
        async with cloud_server(FakeBackend()) as (_, url):
            async with aiohttp.ClientSession() as http:
                # 1. a frame of another protocol version
                ws = await http.ws_connect(url + LINK_PATH)
                frame = bytearray(codec.encode(IDENTITY.hello(TOKEN)))
                frame[2] = 99
                await ws.send_bytes(bytes(frame))
                reply = codec.decode((await ws.receive()).data)
                assert isinstance(reply, m.Error) and reply.code == "unsupported_version"
                await ws.close()
                # 2. after a good handshake: garbage, an oversized request, then a good request
                ws = await http.ws_connect(url + LINK_PATH)
                await ws.send_bytes(codec.encode(IDENTITY.hello(TOKEN)))
                assert isinstance(codec.decode((await ws.receive()).data), m.Welcome)
                await ws.send_bytes(b"\x00garbage\xff")
                await ws.send_bytes(codec.encode(m.Open(1, "q", k=1000, max_tokens=5, seed=0)))
                errors = []
                while len(errors) < 2:
                    msg = codec.decode((await ws.receive()).data)
                    if isinstance(msg, m.Error):
                        errors.append(msg)
                assert errors[0].code == "malformed_frame"
                assert errors[1].code == "request_rejected" and errors[1].request_id == 1
                await ws.close()
            # 3. a regular device is served normally afterwards
            async with CloudLink(url, IDENTITY, TOKEN) as link:
                tokens, finish, _ = await ask(link, dict(max_tokens=10))
            assert tokens == central(0, 10) and not finish.degraded

    asyncio.run(main())


def test_oversized_frame_closes_only_that_connection():
    async def main():
        limits = LinkLimits(max_frame_bytes=64 << 10, ping_interval_s=0.05)
        async with cloud_server(FakeBackend(), limits) as (_, url):
            async with CloudLink(url, IDENTITY, TOKEN) as good:
                async with aiohttp.ClientSession() as http:
                    ws = await http.ws_connect(url + LINK_PATH)
                    await ws.send_bytes(codec.encode(IDENTITY.hello(TOKEN)))
                    await ws.receive()
                    await ws.send_bytes(codec.HEADER + b"\x00" * (128 << 10))
                    msg = await ws.receive()
                    while msg.type == aiohttp.WSMsgType.BINARY:  # pings sent before the close
                        msg = await ws.receive()
                    assert msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED)
                    assert ws.close_code == 1009  # message too big
                tokens, finish, _ = await ask(good, dict(max_tokens=10))
                assert tokens == central(0, 10) and not finish.degraded

    asyncio.run(main())


def test_cloud_unreachable_at_start_raises_typed_error_quickly():
    async def main():
        link = CloudLink(f"http://127.0.0.1:{free_port()}", IDENTITY, TOKEN,
                         LinkOptions(connect_attempts=2, backoff_initial_s=0.01))
        with pytest.raises(LinkUnavailable):
            await link.connect()
        await link.close()

    asyncio.run(main())


def test_cloud_lost_mid_answer_device_finishes_degraded():
    async def main():
        backend = FakeBackend(delay_s=0.01)
        async with cloud_server(backend) as (server, url):
            async with CloudLink(url, IDENTITY, TOKEN) as link:
                task = asyncio.create_task(ask(link, dict(max_tokens=40), delay_s=0.01))
                await asyncio.sleep(0.15)
                await server.close_all()  # the cloud goes away mid-answer
                tokens, finish, session = await task
        assert finish.reason in ("eos", "length") and finish.degraded
        want = central(0, 40)
        assert 0 < len(session.stats.aggregator_by_step)
        assert tokens[0] == want[0]

    asyncio.run(main())


def test_device_disconnect_frees_the_cloud_streams():
    async def main():
        backend = FakeBackend(delay_s=0.01)
        async with cloud_server(backend) as (server, url):
            link = CloudLink(url, IDENTITY, TOKEN)
            await link.connect()
            task = asyncio.create_task(ask(link, dict(max_tokens=200), delay_s=0.01))
            for _ in range(100):
                await asyncio.sleep(0.02)
                if backend.groups:
                    break
            assert backend.groups and not backend.groups[0].closed
            await link.close()  # the device disappears
            for _ in range(100):
                await asyncio.sleep(0.02)
                if backend.groups[0].closed:
                    break
            assert backend.groups[0].closed and server.active_requests == 0
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    asyncio.run(main())


# ---------------------------------------------------------------------------- dead peers
def test_liveness_rule():
    live = PeerLiveness(3.0, now=10.0)
    assert not live.lost(12.9) and not live.lost(13.0)  # silent for exactly the deadline: not yet
    assert live.lost(13.01) and live.silence(13.01) == pytest.approx(3.01)
    live.heard(13.5)  # any frame resets the silence
    assert not live.lost(16.4) and live.next_check(16.4) == pytest.approx(0.1) and live.lost(16.6)
    live.heard(12.0)  # an older timestamp never moves it back
    assert live.last_heard == 13.5
    # a late check (our own loop stalled) does not judge: frames may wait unread in the socket
    live = PeerLiveness.for_link(3.0, now=0.0)
    assert live.stall == 0.75 and live.tick == 0.1
    assert not live.lost(2.9)
    assert not live.lost(4.0)  # 1.1 s after the previous check: late, not judged
    assert live.lost(4.1)  # the next one is
    off = PeerLiveness.for_link(0.0, now=0.0)
    assert not off.enabled and not off.lost(1e9) and off.tick == float("inf")


def _tcp_port(proxy_or_url) -> int:
    return int(str(proxy_or_url).rsplit(":", 1)[1])


async def blackhole_proxy(url: str) -> NetemProxy:
    """An in-process netem proxy to the cloud; ``cut_all()`` blackholes its connections: both
    sockets stay open, nothing passes either way (what a dead NAT or a lost route looks like)."""
    return await NetemProxy(("127.0.0.1", _tcp_port(url)), cut_mode="blackhole").start()


def stall(server: LinkServer) -> None:
    """The cloud process hangs without closing anything: it stops reading its sockets, and its
    writes block (until the socket is aborted, as a write into a full buffer would)."""
    for conn in server.connections:
        transport = conn.transport
        transport.pause_reading()

        async def blocked(*args, transport=transport, **kw):
            while not transport.is_closing():
                await asyncio.sleep(0.01)
            raise ConnectionResetError("aborted")

        conn.ws.send_bytes = blocked


@pytest.mark.parametrize("silence", ["blackhole", "stalled"])
def test_silent_cloud_is_lost_after_the_peer_timeout_and_the_device_finishes_degraded(silence):
    """``blackhole``: a netem proxy stops passing bytes, both sockets stay open. ``stalled``:
    the cloud stops reading and answering (its own deadline, 1 s, then drops the device). The
    device's deadline (0.5 s) gives the cloud up; with the deadline off (blackhole) it waits."""
    timeout = 0.5

    async def main():
        backend = FakeBackend(delay_s=0.01)
        cloud_timeout = 0 if silence == "blackhole" else 1.0
        async with cloud_server(backend, LinkLimits(ping_interval_s=0.05, peer_timeout_s=cloud_timeout)) as (server, url):
            proxy = await blackhole_proxy(url) if silence == "blackhole" else None
            try:
                results = []
                for peer_timeout in (timeout, 0) if proxy else (timeout,):  # with the deadline, then without
                    link = CloudLink(f"http://127.0.0.1:{proxy.port}" if proxy else url, IDENTITY, TOKEN,
                                     LinkOptions(ping_interval_s=0.05, peer_timeout_s=peer_timeout))
                    lost_at = []
                    real_on_lost = link._on_lost
                    link._on_lost = lambda ws, reason: (lost_at.append((time.monotonic(), reason)),
                                                        real_on_lost(ws, reason))
                    await link.connect()
                    tokens: list[int] = []
                    task = asyncio.create_task(ask(link, dict(max_tokens=60), delay_s=0.01, tokens=tokens))
                    while len(tokens) < 3:
                        await asyncio.sleep(0.005)
                    if proxy:
                        assert proxy.cut_all() >= 1  # the cloud goes silent; no FIN, no RST
                    else:
                        stall(server)
                    cut_at, n_before = time.monotonic(), len(tokens)
                    done, _ = await asyncio.wait({task}, timeout=timeout + 1.0)
                    results.append((done, task, cut_at, n_before, lost_at))
                    if not done:
                        task.cancel()
                        await asyncio.gather(task, return_exceptions=True)
                    await link.close()
                if not proxy:  # the stalled cloud gives the silent device up by its own deadline
                    for _ in range(100):
                        if not server.connections:
                            break
                        await asyncio.sleep(0.02)
                    assert not server.connections and server.active_requests == 0
                return results
            finally:
                if proxy:
                    await proxy.stop()

    (done, task, cut_at, n_before, lost_at), *off = asyncio.run(main())
    assert done, "the device did not give up a silent cloud"
    tokens, finish, session = task.result()
    assert finish.degraded and finish.reason in ("eos", "length")
    (t_lost, reason), = lost_at[:1]
    assert "silent" in reason and "peer timeout" in reason
    # the last frame came up to a ping interval (0.05 s) before the cut; then the deadline + a tick
    assert timeout - 0.06 < t_lost - cut_at < timeout + 0.3, t_lost - cut_at
    assert tokens[:n_before] == central(0, 60)[:n_before]  # exact DRAGON before the cut
    if off:
        assert not off[0][0]  # without the deadline the same answer still waits on the silent socket


def test_silent_device_is_dropped_by_the_cloud_and_its_streams_freed():
    timeout = 0.5

    async def main():
        backend = FakeBackend(delay_s=0.01)
        limits = LinkLimits(ping_interval_s=0.05, peer_timeout_s=timeout)
        async with cloud_server(backend, limits) as (server, url):
            proxy = await blackhole_proxy(url)
            # the device never gives up on its own here: only the cloud's deadline acts
            link = CloudLink(f"http://127.0.0.1:{proxy.port}", IDENTITY, TOKEN, LinkOptions(peer_timeout_s=0))
            await link.connect()
            task = asyncio.create_task(ask(link, dict(max_tokens=200), delay_s=0.01))
            while not backend.groups or server.active_requests == 0:
                await asyncio.sleep(0.005)
            await asyncio.sleep(0.05)
            proxy.cut_all()
            cut_at = time.monotonic()
            while not backend.groups[0].closed and time.monotonic() - cut_at < 5:
                await asyncio.sleep(0.01)
            freed_after = time.monotonic() - cut_at
            active, conns = server.active_requests, len(server.connections)
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            await link.close()
            await proxy.stop()
            return freed_after, active, conns

    freed_after, active, conns = asyncio.run(main())
    assert timeout - 0.06 < freed_after < timeout + 0.3, freed_after
    assert active == 0 and conns == 0  # the request ended and the connection was dropped


def test_slow_prefill_and_slow_steps_longer_than_the_deadline_do_not_trigger_it():
    """Pings are answered by each side's read loop while its engine works: a cloud prefill and
    decode steps on both sides, each longer than the peer timeout, keep the link alive."""
    timeout = 0.3

    async def main():
        backend = FakeBackend(delay_s=0.45, prefill_s=0.45)
        limits = LinkLimits(ping_interval_s=0.05, peer_timeout_s=timeout)
        async with cloud_server(backend, limits) as (server, url):
            async with CloudLink(url, IDENTITY, TOKEN, LinkOptions(ping_interval_s=0.05, peer_timeout_s=timeout)) as link:
                return await ask(link, dict(max_tokens=3), delay_s=0.45)

    tokens, finish, _ = asyncio.run(main())
    assert tokens == central(0, 3) and not finish.degraded


class StuckStreams(ListStreams):
    """A cloud engine that stops producing after ``after`` tokens while its process, its loop
    and the link stay alive (pings answered): only this request is stuck."""

    def __init__(self, *args, after: int, **kw) -> None:
        super().__init__(*args, **kw)
        self.after = after

    async def next_dists(self):
        if len(self.tokens) >= self.after:
            await asyncio.Event().wait()  # never; cancelled when the request ends
        return await super().next_dists()


class StuckBackend(FakeBackend):
    async def open_request(self, req: m.Open) -> OpenedRequest:
        opened = await super().open_request(req)
        group = StuckStreams(CLOUD_DOCS, self.world, self.delay_s, after=3)
        self.groups[-1] = group
        return OpenedRequest(group, opened.scores, opened.sources)


@pytest.mark.parametrize("idle_s", [0.4, 0.0])
def test_a_cloud_request_stuck_on_a_live_link_goes_on_device_only_and_is_cancelled(idle_s):
    """The link is alive (pings both ways) but the cloud sends nothing more for the request: the
    device, waiting on its drafts, gives that request up after its request idle timeout, goes on
    device-only (degraded, all of max_tokens) and cancels it on the cloud, which frees its
    streams. With the timeout off (0) it still waits when the test gives up."""

    async def main():
        backend = StuckBackend(delay_s=0.01)
        limits = LinkLimits(ping_interval_s=0.05, peer_timeout_s=1.0)
        async with cloud_server(backend, limits) as (server, url):
            options = LinkOptions(ping_interval_s=0.05, peer_timeout_s=1.0, request_idle_timeout_s=idle_s)
            async with CloudLink(url, IDENTITY, TOKEN, options) as link:
                started = time.monotonic()
                try:
                    tokens, finish, _ = await asyncio.wait_for(ask(link, dict(max_tokens=12), delay_s=0.01), 3.0)
                except asyncio.TimeoutError:
                    return None, None, backend, server, link
                took = time.monotonic() - started
                for _ in range(100):  # the Cancel reaches the cloud, which ends the request
                    if backend.groups[0].closed and server.active_requests == 0:
                        break
                    await asyncio.sleep(0.02)
                return (tokens, finish, took), backend.groups[0].closed, backend, server, link

    result, closed, backend, server, link = asyncio.run(main())
    if idle_s == 0:
        assert result is None  # no rule: the answer was still waiting after 3 s
        return
    (tokens, finish, took), = [result]
    assert finish.degraded and finish.reason in ("eos", "length") and len(tokens) >= 3
    assert took < 2.5, took  # the idle timeout (0.4 s), not the peer timeout (the link stayed up)
    assert closed, "the cloud's stuck request was not cancelled"


def test_connecting_to_a_silent_endpoint_is_bounded_by_the_connect_timeout():
    """A reconnect into a blackhole (the TCP connect succeeds, nothing ever answers) fails with
    LinkUnavailable after connect_attempts x connect_timeout_s (+ backoff), not a TCP timeout."""

    async def main():
        accepted = []

        async def swallow(reader, writer):
            accepted.append(writer)
            await reader.read()  # reads, never answers

        server = await asyncio.start_server(swallow, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        link = CloudLink(f"http://127.0.0.1:{port}", IDENTITY, TOKEN,
                         LinkOptions(connect_timeout_s=0.3, connect_attempts=2, backoff_initial_s=0.05))
        t0 = time.monotonic()
        with pytest.raises(LinkUnavailable):
            await link.connect()
        took = time.monotonic() - t0
        await link.close()
        for w in accepted:
            w.close()
        server.close()
        return took, len(accepted)

    took, attempts = asyncio.run(main())
    assert attempts == 2 and 0.6 <= took < 1.5, took


# ---------------------------------------------------------------------------- baselines
class CountingEngine:
    """Opens ListStreams over the device's documents and counts what it computes."""

    vocab_size = 30

    def __init__(self, delay_s: float = 0.004) -> None:
        self.delay_s, self.groups = delay_s, []

    async def open_group(self, prompts, temperature=1.0):
        self.groups.append(ListStreams(DEV_DOCS, 0, self.delay_s))
        return self.groups[-1]


async def ask_cloud_only(link: CloudLink, engine: CountingEngine, max_tokens: int):
    rid = link.new_request_id()
    open_msg = m.Open(rid, "what?", k=len(CLOUD_DOCS), max_tokens=max_tokens, seed=0, mode="cloud")
    session = s.Session("device", s.SessionConfig.from_open(open_msg, [EOS]), log_mass(DEV_SCORES))
    tokens: list[int] = []

    async def send(msg):
        await link.send(msg)

    group = LazyGroup(engine, [[1], [2]], 1.0)
    driver = SessionDriver(session, group, DEV_SCORES, send, tokens.extend)
    await link.open(open_msg, driver)
    try:
        return tokens, await asyncio.wait_for(driver.run(), 30), session
    finally:
        link.release(rid)
        await group.close()


def test_cloud_only_streams_the_clouds_solo_decode_and_the_device_computes_nothing():
    async def main():
        backend, engine = FakeBackend(), CountingEngine()
        async with cloud_server(backend) as (server, url):
            async with CloudLink(url, IDENTITY, TOKEN) as link:
                tokens, finish, session = await ask_cloud_only(link, engine, 18)
        config = s.SessionConfig(request_id=0, max_tokens=18, seed=0, eos_ids=frozenset({EOS}), mode="cloud")
        assert tokens == solo_decode(config, side_spec(CLOUD_DOCS, CLOUD_SCORES, 0), "cloud")
        assert tokens != solo_decode(config, side_spec(DEV_DOCS, DEV_SCORES, 0), "device")
        assert not finish.degraded and engine.groups == []  # never prefilled, never decoded
        assert session.stats.aggregator_by_step == ["cloud"] * len(tokens)

    asyncio.run(main())


def test_cloud_only_cloud_lost_device_finishes_from_the_committed_tokens():
    async def main():
        backend, engine = FakeBackend(delay_s=0.02), CountingEngine(delay_s=0.005)
        async with cloud_server(backend) as (server, url):
            async with CloudLink(url, IDENTITY, TOKEN) as link:
                task = asyncio.create_task(ask_cloud_only(link, engine, 40))
                await asyncio.sleep(0.15)
                await server.close_all()  # the cloud goes away mid-answer
                tokens, finish, session = await task
        config = s.SessionConfig(request_id=0, max_tokens=40, seed=0, eos_ids=frozenset({EOS}), mode="cloud")
        by_step = session.stats.aggregator_by_step
        cut = by_step.count("cloud")
        assert finish.degraded and finish.reason in ("eos", "length") and 0 < cut < len(tokens)
        assert by_step == ["cloud"] * cut + ["device"] * (len(tokens) - cut)
        assert tokens[:cut] == solo_decode(config, side_spec(CLOUD_DOCS, CLOUD_SCORES, 0), "cloud")[:cut]
        assert tokens == solo_decode(config, side_spec(DEV_DOCS, DEV_SCORES, 0), "device", tuple(tokens[:cut]))
        assert len(engine.groups) == 1 and engine.groups[0].tokens == tokens[:-1]  # prefilled once, on the loss

    asyncio.run(main())


def test_text_mode_returns_public_passages_and_opens_no_streams():
    async def main():
        backend = FakeBackend()
        async with cloud_server(backend) as (server, url):
            async with CloudLink(url, IDENTITY, TOKEN) as link:
                opened = await link.fetch_passages(m.Open(link.new_request_id(), "what?", 2, 8, 0, mode="text"), 5)
                with pytest.raises(CloudRefused, match="index offline"):
                    await link.fetch_passages(m.Open(link.new_request_id(), "fail", 2, 8, 0, mode="text"), 5)
                tokens, finish, _ = await ask(link, dict(max_tokens=10))  # the connection still serves
            assert tokens == central(0, 10) and not finish.degraded
            assert opened.sources == ["public-3", "public-4"] and opened.passages == ["text of 3", "text of 4"]
            assert opened.scores == CLOUD_SCORES[:2]
            assert len(backend.groups) == 1  # only the DRAGON request opened streams
            assert server.active_requests == 0

    asyncio.run(main())
