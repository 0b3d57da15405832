"""The link under abuse (issue 11, items 2 and 6): nothing a device does can hold the cloud's
streams forever or starve another device.

* request idle timeout: a device that keeps its connection alive (it answers pings) but never
  sends a draft or a target for its open request loses that request after the deadline, with a
  typed ``Error("request_idle_timeout")``, and its streams and KV reservation return; a slow but
  live device, a slow cloud engine and a cloud-only request (the device sends nothing, by design)
  are never timed out;
* quotas per device identity hold across connections (requests and streams), named tokens are
  the identities, a wrong token is refused;
* the engine's admission serves identities round robin: one identity's queue of requests delays
  another's by one request, not by all of them (FIFO, the old rule, fails these tests);
* a bounded flood (a greedy identity on 16 connections opening idle requests and sending garbage)
  leaves a good device served within 3x its latency on an idle server; the same flood against a
  cloud without the limits starves it (the control shows the test can fail);
* the device and the SDK see the typed error (``on_cloud_error="raise"`` raises it);
* on the real cloud (vLLM): a ``Target`` with a token id outside the vocabulary is refused with a
  typed error before it is committed; after every fault the cloud's streams, KV blocks, file
  descriptors and processes are back to baseline.

The link tests run the real ``LinkServer`` over real sockets with test_link.py's in-memory
streams, whose engine admission is the real ``dragon_vllm.admission.Admission``.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import statistics
import time
from types import SimpleNamespace

import aiohttp
import pytest
from aiohttp import web

from dragon_core import codec
from dragon_core import messages as m
from dragon_core import session as s
from dragon_core.errors import InvalidOptions, QuotaExceeded, RequestIdleTimeout, error_from_code
from dragon_core.handshake import LINK_PATH
from dragon_core.scheduler import Estimates
from dragon_edge.link import CloudLink, LinkOptions
from dragon_vllm.admission import Admission
from dragon_vllm.device_tokens import parse_device_tokens
from dragon_vllm.link import LinkLimits, LinkServer, OpenedRequest
from test_link import CLOUD_DOCS, IDENTITY, CountingEngine, FakeBackend, ask, ask_cloud_only, central

GREEDY, GOOD = "greedy-device-token-0001", "good-device-token-000002"
DEVICE_TOKENS = {"greedy": GREEDY, "good": GOOD}
K = len(CLOUD_DOCS)  # streams per request in these tests (the quota counts the k an Open asks for)


# ---------------------------------------------------------------------------- a cloud with real admission
class AdmittedBackend(FakeBackend):
    """test_link's in-memory cloud, whose k streams per request go through the engine's real
    admission control (slots and KV blocks, fair per identity), released when the group closes."""

    def __init__(self, slots: int, delay_s: float = 0.004) -> None:
        super().__init__(delay_s=delay_s)
        self.engine = SimpleNamespace(admission=Admission(slots, 4 * slots))

    async def open_request(self, req: m.Open) -> OpenedRequest:
        admission = self.engine.admission
        ticket = await admission.acquire(K, 2 * K)
        try:
            opened = await super().open_request(req)
        except BaseException:
            admission.release(ticket)
            raise
        group, close = opened.group, opened.group.close

        async def release_then_close() -> None:
            if not group.closed:
                admission.release(ticket)
            await close()

        group.close = release_then_close
        return opened


@contextlib.asynccontextmanager
async def link_server(backend: FakeBackend, limits: LinkLimits):
    server = LinkServer(backend, None, limits, device_tokens=DEVICE_TOKENS)
    app = web.Application()
    server.add_routes(app)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield server, f"http://127.0.0.1:{runner.addresses[0][1]}"
    finally:
        await server.close_all()
        await runner.cleanup()


def limits(**kw) -> LinkLimits:
    base = dict(ping_interval_s=0.05, max_requests_per_identity=0, max_streams_per_identity=0,
                request_idle_timeout_s=0)
    return LinkLimits(**{**base, **kw})


def held(server: LinkServer, backend: AdmittedBackend) -> dict:
    """Everything a request can hold on the cloud (all zero when it is idle)."""
    a = backend.engine.admission
    return dict(requests=server.active_requests, slots=a.slots, blocks=a.blocks, queued=a.queued,
                identities=len(server.quotas.usage()), tasks=sum(len(c.tasks) for c in server.connections))


IDLE = dict(requests=0, slots=0, blocks=0, queued=0, identities=0, tasks=0)


async def wait_for(predicate, timeout_s: float, step_s: float = 0.01) -> bool:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(step_s)
    return True


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


# ---------------------------------------------------------------------------- a hostile device
class SilentDevice:
    """A device that handshakes, answers the cloud's pings (so the connection stays alive and the
    peer timeout never fires), opens requests and then sends nothing for them."""

    def __init__(self, http: aiohttp.ClientSession, url: str, token: str) -> None:
        self.http, self.url, self.token = http, url, token
        self.errors: dict[int, m.Error] = {}
        self.opened: set[int] = set()
        self.ws: aiohttp.ClientWebSocketResponse | None = None
        self._reader: asyncio.Task | None = None

    async def connect(self) -> "SilentDevice":
        self.ws = await self.http.ws_connect(self.url + LINK_PATH)
        await self.ws.send_bytes(codec.encode(IDENTITY.hello(self.token)))
        reply = codec.decode((await self.ws.receive()).data)
        assert isinstance(reply, m.Welcome), reply
        self._reader = asyncio.create_task(self._read())
        return self

    async def _read(self) -> None:
        async for raw in self.ws:
            if raw.type != aiohttp.WSMsgType.BINARY:
                continue
            msg = codec.decode(raw.data)
            if isinstance(msg, m.Ping):
                await self.ws.send_bytes(codec.encode(m.Pong(msg.nonce, msg.sent_at)))
            elif isinstance(msg, m.Error) and msg.request_id is not None:
                self.errors[msg.request_id] = msg
            elif isinstance(msg, m.Opened):
                self.opened.add(msg.request_id)

    async def open(self, rid: int, **kw) -> None:
        fields = dict(k=K, max_tokens=64, seed=0, scheduling=False, **kw)
        await self.ws.send_bytes(codec.encode(m.Open(rid, "world 0", **fields)))

    async def send_raw(self, data: bytes) -> None:
        await self.ws.send_bytes(data)

    async def close(self) -> None:
        await self.ws.close()
        if self._reader is not None:
            self._reader.cancel()
            await asyncio.gather(self._reader, return_exceptions=True)


# ---------------------------------------------------------------------------- idle timeout
@pytest.mark.parametrize("timeout_s", [0.5, 0], ids=["idle-timeout", "control-without"])
def test_a_request_the_device_abandons_is_ended_with_a_typed_error_and_frees_its_streams(timeout_s):
    async def main():
        backend = AdmittedBackend(slots=12)
        async with link_server(backend, limits(request_idle_timeout_s=timeout_s)) as (server, url):
            async with aiohttp.ClientSession() as http:
                device = await SilentDevice(http, url, GREEDY).connect()
                await device.open(1)  # the device aggregates: the cloud drafts, then waits for targets
                assert await wait_for(lambda: 1 in device.opened, 5)
                opened_at = time.monotonic()
                ended = await wait_for(lambda: 1 in device.errors, 1.5)
                took = time.monotonic() - opened_at
                await asyncio.sleep(0.1)
                state, alive = held(server, backend), not device.ws.closed
                await device.close()
            return ended, took, device.errors.get(1), state, alive, dict(server.refused)

    ended, took, error, state, alive, refused = asyncio.run(main())
    if not timeout_s:  # without the limit the abandoned request holds its streams for good
        assert not ended and state["slots"] == K and state["requests"] == 1
        return
    assert ended and error.code == RequestIdleTimeout.code and "idle timeout" in error.message
    # the cloud drafts max_depth tokens (a few ms), then the deadline runs (+ a watchdog tick)
    assert timeout_s < took < timeout_s + 0.5, took
    assert state == IDLE and alive  # streams and KV back; the connection itself still serves
    assert refused[RequestIdleTimeout.code] == 1


def test_slow_devices_slow_cloud_engines_and_cloud_only_requests_are_never_idle():
    """Only the time the cloud spends waiting on the device counts: a device whose every step
    takes 60% of the deadline, a cloud engine whose steps take 150% of it and a cloud-only
    answer (the device sends nothing at all) all run well past the deadline, undisturbed."""
    timeout = 0.2

    async def main():
        out = {}
        for name, cloud_delay in (("slow device", 0.002), ("slow cloud", 0.3), ("cloud only", 0.06)):
            backend = AdmittedBackend(slots=12, delay_s=cloud_delay)
            async with link_server(backend, limits(request_idle_timeout_s=timeout)) as (server, url):
                async with CloudLink(url, IDENTITY, GOOD, LinkOptions(ping_interval_s=0.05)) as link:
                    t0 = time.monotonic()
                    if name == "cloud only":
                        tokens, finish, _ = await ask_cloud_only(link, CountingEngine(), 24)
                    else:
                        tokens, finish, _ = await ask(link, dict(max_tokens=4 if name == "slow cloud" else 8),
                                                      delay_s=0.12 if name == "slow device" else 0.004)
                    out[name] = (tokens, finish, time.monotonic() - t0, dict(server.refused))
        return out

    for name, (tokens, finish, took, refused) in asyncio.run(main()).items():
        assert not finish.degraded and refused[RequestIdleTimeout.code] == 0, name
        assert took > 2 * timeout, (name, took)  # the answer did outlast the deadline
        if name != "cloud only":
            assert tokens == central(0, len(tokens))[:len(tokens)], name


def test_the_device_session_and_the_sdk_see_the_typed_error():
    """A device stalled for longer than the deadline (each of its steps takes 1 s, the cloud's
    deadline is 0.3 s): the cloud ends the request with the typed error; the device's session
    records it and finishes alone (degraded); the error maps back to its class, which the SDK
    raises with on_cloud_error="raise"."""
    async def main():
        backend = AdmittedBackend(slots=12)
        async with link_server(backend, limits(request_idle_timeout_s=0.3)) as (server, url):
            async with CloudLink(url, IDENTITY, GOOD, LinkOptions(ping_interval_s=0.05)) as link:
                tokens, finish, session = await ask(link, dict(max_tokens=3), delay_s=1.0)
            await wait_for(lambda: held(server, backend) == IDLE, 2)
            return tokens, finish, session, held(server, backend)

    tokens, finish, session, state = asyncio.run(main())
    assert finish.degraded and finish.reason in ("eos", "length") and len(tokens) >= 1
    assert session.peer_error is not None and session.peer_error.code == RequestIdleTimeout.code
    exc = error_from_code(session.peer_error.code, session.peer_error.message)
    assert isinstance(exc, RequestIdleTimeout) and "idle timeout" in str(exc)
    assert state == IDLE


def test_sdk_raises_the_clouds_typed_error_when_asked():
    from dragon_edge.runtime import AnswerStats, Piece
    from dragon_edge.sdk import AsyncDragonClient

    class RefusedRuntime:  # what EdgeRuntime.answer yields when the cloud refused the request
        async def answer(self, query, opts):
            yield Piece("device-only text", (1,))
            yield Piece("", (), finished=AnswerStats(tokens=1, degraded=True, finish_reason="length",
                                                     cloud_error=dict(code="quota_exceeded", message="over quota")))

    async def main():
        quiet = AsyncDragonClient(runtime=RefusedRuntime())
        reply = await quiet.chat.completions.create(messages=[{"role": "user", "content": "q"}])
        strict = AsyncDragonClient(runtime=RefusedRuntime(), on_cloud_error="raise")
        with pytest.raises(QuotaExceeded, match="over quota"):
            await strict.chat.completions.create(messages=[{"role": "user", "content": "q"}])
        with pytest.raises(QuotaExceeded):
            async for _ in await strict.chat.completions.create(messages=[{"role": "user", "content": "q"}],
                                                                 stream=True):
                pass
        return reply

    reply = asyncio.run(main())
    assert reply.dragon["cloud_error"]["code"] == "quota_exceeded" and reply.dragon["degraded"]
    with pytest.raises(InvalidOptions):
        AsyncDragonClient(on_cloud_error="ignore")


# ---------------------------------------------------------------------------- quotas
@pytest.mark.parametrize("quota,served", [(dict(max_requests_per_identity=4), 4),
                                          (dict(max_streams_per_identity=2 * K), 2)], ids=["requests", "streams"])
def test_quotas_per_identity_hold_across_connections(quota, served):
    async def main():
        backend = AdmittedBackend(slots=64)
        async with link_server(backend, limits(request_idle_timeout_s=0, **quota)) as (server, url):
            async with aiohttp.ClientSession() as http:
                greedy = [await SilentDevice(http, url, GREEDY).connect() for _ in range(3)]
                for conn in greedy:  # 3 connections x 3 requests: well within the per-connection cap
                    for rid in (1, 2, 3):
                        await conn.open(rid)
                good = await SilentDevice(http, url, GOOD).connect()
                await good.open(1)
                await wait_for(lambda: sum(len(c.opened) + len(c.errors) for c in greedy) == 9 and good.opened, 5)
                usage = server.quotas.usage()
                for conn in [*greedy, good]:
                    await conn.close()
            await wait_for(lambda: held(server, backend) == IDLE, 2)
            return greedy, good, usage, held(server, backend)

    greedy, good, usage, state = asyncio.run(main())
    codes = [e.code for c in greedy for e in c.errors.values()]
    assert sum(len(c.opened) for c in greedy) == served and codes == [QuotaExceeded.code] * (9 - served)
    assert good.opened == {1} and not good.errors  # another identity is not charged for it
    assert usage["greedy"].requests == served and usage["good"].requests == 1
    assert state == IDLE  # all released when the connections went


def test_identities_come_from_named_tokens_and_a_wrong_token_is_refused():
    assert parse_device_tokens("# devices\nalice aaaaaaaaaaaaaaaa1\n\nbob   bbbbbbbbbbbbbbbb2  # lab\n") == \
        {"alice": "aaaaaaaaaaaaaaaa1", "bob": "bbbbbbbbbbbbbbbb2"}
    for bad in ("alice", "alice short", "a xxxxxxxxxxxxxxxx1\na yyyyyyyyyyyyyyyy2", "a xxxxxxxxxxxxxxxx1\nb xxxxxxxxxxxxxxxx1"):
        with pytest.raises(InvalidOptions):
            parse_device_tokens(bad)

    async def main():
        async with link_server(AdmittedBackend(slots=8), limits()) as (server, url):
            link = CloudLink(url, IDENTITY, "not-a-device-token", LinkOptions(connect_attempts=1))
            with pytest.raises(Exception, match="auth"):
                await link.connect()
            await link.close()
            async with CloudLink(url, IDENTITY, GOOD) as ok:
                assert ok.connected
                return sorted(c.identity for c in server.connections)

    assert asyncio.run(main()) == ["good"]


# ---------------------------------------------------------------------------- fair admission
def test_admission_serves_tenants_round_robin_and_a_large_group_is_not_overtaken():
    async def main():
        adm = Admission(max_slots=4, max_blocks=100)
        first = await adm.acquire(4, 1, tenant="greedy")
        order: list[str] = []

        async def want(tenant: str, slots: int = 2) -> None:
            ticket = await adm.acquire(slots, 1, tenant=tenant)
            order.append(tenant)
            await asyncio.sleep(0.01)
            adm.release(ticket)

        tasks = [asyncio.create_task(want("greedy")) for _ in range(5)]
        await asyncio.sleep(0)
        tasks.append(asyncio.create_task(want("good")))
        await asyncio.sleep(0)
        assert adm.queued_by_tenant() == {"greedy": 5, "good": 1}
        adm.release(first)
        await asyncio.gather(*tasks)
        # a group of 4 at the head waits for the whole capacity; smaller ones do not overtake it
        holder = await adm.acquire(2, 1, tenant="a")
        big = asyncio.create_task(adm.acquire(4, 1, tenant="b"))
        await asyncio.sleep(0)
        small = asyncio.create_task(adm.acquire(1, 1, tenant="c"))
        await asyncio.sleep(0.01)
        blocked = not big.done() and not small.done()
        adm.release(holder)
        adm.release(await big)
        adm.release(await small)
        return order, blocked, (adm.slots, adm.blocks, adm.queued)

    order, blocked, left = asyncio.run(main())
    assert "good" in order[:2], order  # FIFO would serve it last, after all five greedy groups
    assert blocked and left == (0, 0, 0)


def test_the_links_identities_are_the_admission_tenants():
    """One greedy identity queues 8 cloud-only requests on an engine that admits one at a time;
    a good identity's request, sent after them, is served after at most one of them."""
    async def main():
        backend = AdmittedBackend(slots=K, delay_s=0.01)
        async with link_server(backend, limits()) as (server, url):
            async with CloudLink(url, IDENTITY, GREEDY) as greedy, CloudLink(url, IDENTITY, GOOD) as good:
                finished: list[str] = []

                async def one(link, who):
                    await ask_cloud_only(link, CountingEngine(), 12)
                    finished.append(who)

                tasks = [asyncio.create_task(one(greedy, "greedy")) for _ in range(8)]
                await wait_for(lambda: backend.engine.admission.queued >= 7, 5)
                tasks.append(asyncio.create_task(one(good, "good")))
                await asyncio.gather(*tasks)
            return finished

    finished = asyncio.run(main())
    assert finished.index("good") <= 2, finished


# ---------------------------------------------------------------------------- the bounded flood
FLOOD_CONNECTIONS, FLOOD_OPENS = 16, 8


async def good_latency(url: str, n: int) -> list[float]:
    out = []
    async with CloudLink(url, IDENTITY, GOOD, LinkOptions(ping_interval_s=0.05)) as link:
        for _ in range(n):
            t0 = time.monotonic()
            tokens, finish, _ = await asyncio.wait_for(ask(link, dict(max_tokens=16), delay_s=0.01), 10)
            assert not finish.degraded and tokens == central(0, 16)[:len(tokens)]
            out.append(time.monotonic() - t0)
    return out


async def flood(http, url: str) -> list[SilentDevice]:
    """16 connections of one identity, each opening 8 requests it abandons, with garbage between."""
    conns = [await SilentDevice(http, url, GREEDY).connect() for _ in range(FLOOD_CONNECTIONS)]
    for conn in conns:
        for rid in range(1, FLOOD_OPENS + 1):
            await conn.open(rid)
            await conn.send_raw(b"DG\x01\xff garbage")
            await conn.open(rid)  # the same id again: refused
    return conns


@pytest.mark.parametrize("protected", [True, False], ids=["with-limits", "control-without"])
def test_a_flood_from_one_identity_leaves_a_good_device_within_3x_its_latency(protected):
    slots = 8 * K  # the engine admits 8 requests at once
    guard = dict(request_idle_timeout_s=1.0, max_requests_per_identity=16, max_streams_per_identity=slots // 2)

    async def main():
        backend = AdmittedBackend(slots=slots, delay_s=0.005)
        async with link_server(backend, limits(**(guard if protected else {}))) as (server, url):
            baseline_fds = open_fds()
            idle = await good_latency(url, 3)
            async with aiohttp.ClientSession() as http:
                conns = await flood(http, url)
                await asyncio.sleep(0.2)  # the flood's requests are in: admitted, queued or refused
                under = held(server, backend)
                try:
                    busy = await asyncio.wait_for(good_latency(url, 3), 3 * max(idle) * 3 + 1)
                except asyncio.TimeoutError:
                    busy = None
                for conn in conns:
                    await conn.close()
            drained = await wait_for(lambda: held(server, backend) == IDLE and not server.connections, 5)
            await asyncio.sleep(0.1)
            return idle, busy, under, drained, open_fds() - baseline_fds, dict(server.refused)

    idle, busy, under, drained, fds, refused = asyncio.run(main())
    normal = statistics.median(idle)
    print(f"\nflood {'with' if protected else 'without'} limits: good device idle {normal * 1000:.0f} ms, "
          f"under flood {[round(b * 1000) for b in busy] if busy else 'starved'} ms; held under flood {under}")
    assert drained and fds <= 0, (drained, fds)  # streams, KV, tasks, connections, fds back to baseline
    if not protected:  # the control: the flood fills the engine and the good device waits
        assert under["slots"] == slots and (busy is None or max(busy) > 3 * normal)
        return
    assert busy is not None and max(busy) <= 3 * normal, (busy, normal)
    assert under["slots"] <= slots // 2 + K  # the greedy identity holds at most its quota
    assert refused[QuotaExceeded.code] >= FLOOD_CONNECTIONS * FLOOD_OPENS - 16


# ---------------------------------------------------------------------------- scheduler priors
def test_non_finite_scheduler_priors_are_refused_and_never_produced():
    bad = m.SchedulerPrior(math.nan, 1.0, 1.0, 0.5, 0.5)
    with pytest.raises(InvalidOptions, match="finite"):
        Estimates().seed(bad, "device", 2)
    with pytest.raises(InvalidOptions):
        Estimates().seed(m.SchedulerPrior(1.0, math.inf, 1.0, 0.5, 0.5), "cloud", 2)
    config = s.SessionConfig(request_id=1, max_tokens=4, seed=0, eos_ids=frozenset({0}), prior=bad)
    with pytest.raises(InvalidOptions):
        s.Session("cloud", config, 0.0)
    est = Estimates()
    for e in (est.c_local, est.c_remote, est.rtt, est.alpha_local, est.alpha_remote):
        e.update(1.0)
    est.rtt.update(math.nan)
    assert est.prior("device") is None


# ---------------------------------------------------------------------------- the real cloud (vLLM)
def cloud_resources(cloud) -> dict:
    """What the real cloud holds: link requests, engine streams, KV blocks and queue (from
    /health), its open file descriptors and its child processes (from /proc)."""
    import procs

    h = cloud.health()
    engine = h["engine"]
    return dict(links=h["device_links"], requests=h["link_requests"], streams=engine["open_streams"],
                blocks=engine["reserved_blocks"], queued=engine["queued_groups"],
                fds=len(os.listdir(f"/proc/{cloud.proc.pid}/fd")),
                children=sorted(p.pid for p in procs.children(cloud.proc.pid)))


@pytest.mark.slow
def test_real_cloud_refuses_an_out_of_vocabulary_target_before_committing_it(cloud):
    """The cloud drafts (the device aggregates); the device's Target carries a token id past the
    model's vocabulary. The cloud answers a typed protocol error naming the vocabulary (before
    the fix it committed the id and only vLLM failed on it), ends the request, and every resource
    returns to what it was."""
    from e2e_world import TOKEN

    async def main():
        baseline = await asyncio.to_thread(cloud_resources, cloud)
        async with aiohttp.ClientSession() as http:
            ws = await http.ws_connect(cloud.url + LINK_PATH)
            await ws.send_bytes(codec.encode(cloud_hello(TOKEN)))
            assert isinstance(codec.decode((await ws.receive()).data), m.Welcome)
            await ws.send_bytes(codec.encode(m.Open(1, "What is Lyon famous for?", k=2, max_tokens=16, seed=0,
                                                    scheduling=False, aggregator="device", dist_top_k=20)))
            draft = error = None
            deadline = time.monotonic() + 60
            while error is None and time.monotonic() < deadline:
                raw = await ws.receive(timeout=60)
                msg = codec.decode(raw.data)
                if isinstance(msg, m.Draft) and draft is None:
                    draft = msg
                    bogus = draft.dist.vocab_size + 1000  # in the wire's range, past the model's
                    await ws.send_bytes(codec.encode(m.Target(1, 0, bogus, False, 1, 0)))
                elif isinstance(msg, m.Error):
                    error = msg
            await ws.close()
        back = False
        for _ in range(100):
            now = await asyncio.to_thread(cloud_resources, cloud)
            if now == baseline:
                back = True
                break
            await asyncio.sleep(0.1)
        return draft, error, baseline, now, back

    draft, error, baseline, now, back = asyncio.run(main())
    assert draft is not None and error is not None
    assert error.code == "protocol_error" and "vocabulary" in error.message and error.request_id == 1
    assert back, (baseline, now)


def cloud_hello(token: str) -> m.Hello:
    from dragon_host.identity import local_identity

    return local_identity("smollm2-135m", "hf").hello(token, "test_link_abuse")
