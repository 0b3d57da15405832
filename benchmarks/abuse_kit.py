"""Abusing a real ``dragon-cloud serve`` over real sockets, for the abuse tests and
``bench_abuse.py``: the kinds of bad and slow requests, a flood of them from many connections,
a good client's latency, the fuzzed OpenAI bodies and the rule they must obey, and the server's
resources (streams, KV blocks, file descriptors, processes) to compare with a baseline.

Every request is raw HTTP/1.1 on its own connection (``Connection: close``), so that a slow or
half-open one is exactly what a hostile client sends, with nothing a client library would fix.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import random
import statistics
import time
import urllib.request
from collections import Counter
from dataclasses import asdict, dataclass
from typing import Any, Awaitable, Callable

MODEL = "smollm2-135m"
CHAT, COMP = "/v1/chat/completions", "/v1/completions"
GOOD_BODY = {"model": MODEL, "messages": [{"role": "user", "content": "What is Lyon famous for?"}],
             "max_tokens": 16, "temperature": 0, "k": 2}
HANG_S = 60.0  # a request not finished in this long is a hang (the server's own timeouts are shorter)


# ---------------------------------------------------------------------------- raw HTTP
@dataclass
class Reply:
    status: int | None  # None: the server closed the connection without an answer
    body: bytes
    seconds: float


async def raw_request(port: int, head: bytes, body: bytes = b"", *, hold_s: float = 0.0,
                      close_after_s: float | None = None) -> Reply:
    """Send ``head`` (request line + headers, without the blank line's end) and ``body``; wait
    ``hold_s`` before the body (a slow client); with ``close_after_s``, hang up that long after
    sending (a client that leaves). Returns the status and body the server sent."""
    t0 = time.perf_counter()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(head)
        await writer.drain()
        if hold_s:
            await asyncio.sleep(hold_s)
        writer.write(body)
        await writer.drain()
        if close_after_s is not None:
            await asyncio.sleep(close_after_s)
            return Reply(None, b"", time.perf_counter() - t0)
        status, body = await asyncio.wait_for(_read_response(reader), HANG_S)
    except (ConnectionError, OSError, asyncio.IncompleteReadError):
        status, body = None, b""
    finally:
        writer.close()
    return Reply(status, body, time.perf_counter() - t0)


async def _read_response(reader: asyncio.StreamReader) -> tuple[int | None, bytes]:
    """Status and body of one response: as soon as it is complete (the server may keep the
    connection open a while after, e.g. reading the rest of a refused body)."""
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ", 2)
    status = int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else None
    headers = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:] if ln)}
    if "content-length" in headers:
        return status, await reader.readexactly(int(headers["content-length"]))
    if headers.get("transfer-encoding", "").lower() == "chunked":
        body = bytearray()
        while size := int((await reader.readuntil(b"\r\n")).split(b";")[0], 16):
            body += await reader.readexactly(size)
            await reader.readexactly(2)
        return status, bytes(body)
    return status, await reader.read()


def post_head(path: str, length: int, key: str | None, extra: str = "") -> bytes:
    auth = f"Authorization: Bearer {key}\r\n" if key else ""
    return (f"POST {path} HTTP/1.1\r\nHost: dragon\r\nContent-Type: application/json\r\nConnection: close\r\n"
            f"{auth}Content-Length: {length}\r\n{extra}\r\n").encode()


async def post_json(port: int, path: str, body: Any, key: str | None, **kw) -> Reply:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    return await raw_request(port, post_head(path, len(data), key), data, **kw)


# ---------------------------------------------------------------------------- the abuses
Abuse = Callable[[int, str | None], Awaitable[Reply]]


def _chat(**kw) -> dict:
    return {**GOOD_BODY, **kw}


def abuses() -> dict[str, Abuse]:
    """Each abuse by name: (port, key) -> the server's reply. Bad input (must get a 4xx), slow
    or half-open requests (must be cut by the server's timeouts), departures mid-answer (must
    free their streams)."""
    junk = {
        "negative_max_tokens": _chat(max_tokens=-5),
        "zero_max_tokens": _chat(max_tokens=0),
        "huge_max_tokens": _chat(max_tokens=10**9),
        "temperature_9": _chat(temperature=9),
        "top_p_0": _chat(top_p=0),
        "n_0": _chat(n=0),
        "k_string": _chat(k="2"),
        "k_huge": _chat(k=10**6),
        "unsupported_tools": _chat(tools=[{"type": "function", "function": {"name": "f"}}]),
        "lone_surrogate": _chat(messages=[{"role": "user", "content": "caf\ud800"}]),
        "no_user_message": _chat(messages=[{"role": "system", "content": "x"}]),
        "prompt_missing": {"model": MODEL, "max_tokens": 4},
        "over_context": _chat(messages=[{"role": "user", "content": "Lyon " * 19_000}], retrieval=False),
    }
    out: dict[str, Abuse] = {}
    for name, body in junk.items():
        path = COMP if "prompt" in name else CHAT
        out[name] = lambda port, key, body=body, path=path: post_json(port, path, body, key)
    out["not_json"] = lambda port, key: post_json(port, CHAT, b"{not json", key)
    out["wrong_key"] = lambda port, key: post_json(port, CHAT, GOOD_BODY, "wrong-key" if key else None)
    out["body_too_large"] = lambda port, key: raw_request(port, post_head(CHAT, 50 << 20, key), b"{")
    out["slow_body"] = lambda port, key: raw_request(port, post_head(CHAT, 1000, key), b'{"model": ')
    out["half_open_headers"] = lambda port, key: raw_request(port, b"POST /v1/chat/completions HTTP/1.1\r\nHost: d")
    out["leave_mid_answer"] = lambda port, key: post_json(
        port, CHAT, _chat(max_tokens=200, retrieval=False), key, close_after_s=0.3)
    out["leave_mid_stream"] = lambda port, key: post_json(
        port, CHAT, _chat(max_tokens=200, stream=True), key, close_after_s=0.3)
    return out


SLOW = {"slow_body", "half_open_headers"}  # cut by the server's timeouts: no status, or 408
LEAVE = {"leave_mid_answer", "leave_mid_stream"}  # the client hangs up: no status to judge


def judge(name: str, reply: Reply) -> str:
    """``ok`` (what the abuse must get), ``5xx``, ``hang`` or ``wrong:<status>``."""
    if reply.seconds >= HANG_S:
        return "hang"
    if name in LEAVE:
        return "ok"
    if name in SLOW:
        return "ok" if reply.status in (None, 408) else f"wrong:{reply.status}"
    if reply.status is not None and reply.status >= 500:
        return "5xx"
    return "ok" if reply.status is not None and 400 <= reply.status < 500 else f"wrong:{reply.status}"


async def flood(port: int, key: str | None, n_requests: int, connections: int, seed: int = 0,
                weights: dict[str, float] | None = None, until: asyncio.Future | None = None) -> dict:
    """At least ``n_requests`` abuses from ``connections`` concurrent clients (more while
    ``until`` is not done, up to 10x); the kinds are drawn with ``weights`` (default: slow ones
    rarer, they each hold a client for the server's timeout)."""
    kinds = abuses()
    weights = weights or {name: (0.25 if name in SLOW else 1.0) for name in kinds}
    rng = random.Random(seed)
    verdicts: Counter = Counter()
    by_kind: Counter = Counter()
    failures: list[str] = []
    sent = 0

    def more() -> bool:
        return sent < n_requests or (until is not None and not until.done() and sent < 10 * n_requests)

    async def client() -> None:
        nonlocal sent
        while more():
            sent += 1
            name = rng.choices(list(weights), weights=list(weights.values()))[0]
            reply = await kinds[name](port, key)
            verdict = judge(name, reply)
            verdicts[verdict] += 1
            by_kind[name] += 1
            if verdict != "ok" and len(failures) < 20:
                failures.append(f"{name}: {verdict} {reply.body[:200]!r}")

    t0 = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(connections)))
    return dict(requests=sent, connections=connections, seconds=round(time.perf_counter() - t0, 2),
                verdicts=dict(verdicts), by_kind=dict(by_kind), failures=failures)


async def good_latencies(port: int, key: str | None, n: int | None = None,
                         until: asyncio.Future | None = None) -> list[float]:
    """A well-behaved client's answer latencies (seconds), one request at a time: ``n`` of them,
    or until ``until`` is done. Any answer but a 200 fails."""
    out: list[float] = []
    while (n is not None and len(out) < n) or (until is not None and not until.done()):
        reply = await post_json(port, CHAT, GOOD_BODY, key)
        if reply.status != 200:
            raise AssertionError(f"the good client got {reply.status}: {reply.body[:300]!r}")
        out.append(reply.seconds)
    return out


def percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, math.ceil(q / 100 * len(xs)) - 1))]


def latency_summary(xs: list[float]) -> dict:
    return dict(n=len(xs), p50=round(statistics.median(xs), 4), p99=round(percentile(xs, 99), 4),
                max=round(max(xs), 4), mean=round(statistics.fmean(xs), 4))


# ---------------------------------------------------------------------------- resources
@dataclass(frozen=True)
class Resources:
    open_streams: int
    reserved_blocks: int
    queued_groups: int
    fds: int
    processes: int


def resources(url: str, pid: int, key: str | None = None) -> Resources:
    """The server's streams, KV reservation and admission queue (``/health``), its open file
    descriptors and its process tree (vLLM's engine core and workers included)."""
    req = urllib.request.Request(f"{url}/health", headers={"Authorization": f"Bearer {key}"} if key else {})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            engine = json.loads(r.read())["engine"]
    except urllib.error.HTTPError as exc:  # 503 (saturated) still carries the stats
        engine = json.loads(exc.read())["engine"]
    return Resources(engine["open_streams"], engine["reserved_blocks"], engine["queued_groups"],
                     len(os.listdir(f"/proc/{pid}/fd")), len(_descendants(pid)) + 1)


def back_to(baseline: Resources, now: Resources) -> bool:
    """No stream, KV block or queued request held, no process more, no file descriptor more."""
    return (now.open_streams, now.reserved_blocks, now.queued_groups, now.processes) == \
        (0, 0, 0, baseline.processes) and now.fds <= baseline.fds


def settled(url: str, pid: int, baseline: Resources, key: str | None, timeout_s: float = 30.0) -> Resources:
    """The server's resources once back to ``baseline`` (or the last reading after ``timeout_s``):
    connections the server has just closed take a moment to leave its fd table."""
    deadline = time.monotonic() + timeout_s
    while True:
        now = resources(url, pid, key)
        if back_to(baseline, now) or time.monotonic() > deadline:
            return now
        time.sleep(0.25)


def quiet(url: str, pid: int, key: str | None, timeout_s: float = 30.0) -> Resources:
    """A baseline: the server's resources once nothing is held and its fd count has stopped
    falling (connections of earlier clients closed)."""
    deadline = time.monotonic() + timeout_s
    last = resources(url, pid, key)
    while time.monotonic() < deadline:
        time.sleep(0.5)
        now = resources(url, pid, key)
        if now == last and now.open_streams == now.reserved_blocks == now.queued_groups == 0:
            return now
        last = now
    return last


def as_dict(r: Resources) -> dict:
    return asdict(r)


def _descendants(pid: int) -> list[int]:
    parents: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        ppid = int(stat[stat.rindex(")") + 2:].split()[1])
        parents.setdefault(ppid, []).append(int(name))
    out, todo = [], [pid]
    while todo:
        kids = parents.get(todo.pop(), [])
        out += kids
        todo += kids
    return out


# ---------------------------------------------------------------------------- a flood of its own
async def flood_in_a_process(port: int, key: str | None, n_requests: int, connections: int,
                             seed: int = 0) -> asyncio.subprocess.Process:
    """The flood from a separate process, so that a good client measured in this one is not
    slowed by its own event loop serving the flood's connections (a real attacker is another
    machine); ``await proc.communicate()`` gives ``flood``'s result as JSON."""
    import sys

    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "benchmarks.abuse_kit", str(port), key or "", str(n_requests), str(connections),
        str(seed), stdout=asyncio.subprocess.PIPE)


async def good_during(port: int, key: str | None, proc: asyncio.subprocess.Process) -> tuple[list[float], dict]:
    """The good client's latencies while ``proc``'s flood runs, and the flood's result."""
    done = asyncio.ensure_future(proc.communicate())
    latencies = await good_latencies(port, key, until=done)
    out, _ = await done
    return latencies, json.loads(out)


if __name__ == "__main__":
    import sys

    port_, key_, n_, conns_, seed_ = sys.argv[1:6]
    print(json.dumps(asyncio.run(flood(int(port_), key_ or None, int(n_), int(conns_), int(seed_)))))
