"""The dead-peer deadline end to end: the real cloud process (vLLM), the device runtime
(llama.cpp) and a netem proxy process between them whose cut is a *blackhole*: both sockets stay
open and nothing passes either way, so neither TCP nor the WebSocket library ever reports a
failure. Only the link's own deadline (``peer_timeout_s``, default 3 s) notices.

* the device gives the cloud up within the deadline (+ a watchdog tick) and finishes the answer
  alone, flagged degraded; every token it committed before that is exact DRAGON (the prefix of
  the same answer over the same proxy, uncut);
* the cloud gives the silent device up too and frees the request's streams and KV blocks;
* the next answer over the same proxy (a fresh connection) is served normally.
"""

from __future__ import annotations

import asyncio
import time

import pytest

from benchmarks.netem import Shape, cut_proxy, spawn_proxy, stop_proxy
from dragon_core.liveness import DEFAULT_PEER_TIMEOUT_S
from e2e_world import LONG_QUESTION, ask, options, run

pytestmark = pytest.mark.slow

DEADLINE_S = DEFAULT_PEER_TIMEOUT_S  # the links' default: what a user gets


@pytest.fixture(scope="module")
def loop(e2e_loop):
    return e2e_loop


def _idle(cloud, baseline: dict) -> bool:
    h = cloud.health()
    return (h["link_requests"] == 0 and h["engine"]["open_streams"] == baseline["open_streams"]
            and h["engine"]["reserved_blocks"] == baseline["reserved_blocks"])


def test_blackholed_cloud_mid_answer_completes_degraded_within_the_deadline(loop, runtime, cloud):
    proc, port = spawn_proxy(("127.0.0.1", cloud.port), up=Shape(latency_ms=25), down=Shape(latency_ms=25),
                             cut_mode="blackhole")
    url = f"http://127.0.0.1:{port}"
    opts = options(max_tokens=40, aggregator="device")
    try:
        baseline = cloud.health()["engine"]
        # the same answer over the same proxy, uncut; it must still be decoding when the cut comes
        # (1 s after its second token), so it must run to the token limit (LONG_QUESTION does)
        want, ref_stats = run(loop, ask(runtime, url, opts, question=LONG_QUESTION))
        assert not ref_stats.degraded and ref_stats.finish_reason == "length", (ref_stats.finish_reason, len(want))
        steps_ms = sorted(ref_stats.per_token_latency_ms[1:])
        step_s = steps_ms[len(steps_ms) // 2] / 1000  # median time per committed piece, uncut

        events: dict = {}
        arrivals: list = []  # (time, tokens so far) per piece of the cut answer

        def blackhole():
            link = runtime.link
            if not link._drivers:  # the answer is over: nothing left to cut
                events["too_late"] = time.monotonic()
                return
            (driver,) = link._drivers.values()
            real_on_lost = link._on_lost

            def on_lost(ws, reason):
                events.setdefault("lost", (time.monotonic(), reason, len(driver.session.committed)))
                events.setdefault("last_heard", link._conn.liveness.last_heard)
                real_on_lost(ws, reason)

            link._on_lost = on_lost
            events["cut"] = (time.monotonic(), len(driver.session.committed))
            cut_proxy(proc)  # SIGUSR1: every current connection goes silent

        def later():  # the hook runs after the second token; cut a few tokens further on
            asyncio.get_running_loop().call_later(1.0, blackhole)

        async def cloud_idle_again():
            """When the cloud, by its own deadline, has ended the silent device's request."""
            while "cut" not in events:
                if "too_late" in events:
                    return None
                await asyncio.sleep(0.05)
            while time.monotonic() - events["cut"][0] < DEADLINE_S + 10:
                if await asyncio.to_thread(_idle, cloud, baseline):
                    return time.monotonic()
                await asyncio.sleep(0.1)
            return None

        async def both():
            return await asyncio.gather(ask(runtime, url, opts, hook=later, arrivals=arrivals, question=LONG_QUESTION),
                                        cloud_idle_again())

        t0 = time.monotonic()
        (ids, stats), cloud_freed = run(loop, both(), timeout=60)
        answered = events["answered"] = time.monotonic()
        assert "too_late" not in events, "the answer was over before the cut"
        assert cloud_freed is not None, cloud.health()
        again, again_stats = run(loop, ask(runtime, url, opts, question=LONG_QUESTION))  # a new connection
    finally:
        stop_proxy(proc)

    cut_at, n_cut = events["cut"]
    lost_at, reason, n_lost = events["lost"]
    stall_s = max(stats.per_token_latency_ms[1:]) / 1000
    resumed_at = min(t for t, _ in arrivals if t >= lost_at)  # the first piece after the loss
    print(f"\nblackhole: cloud lost {lost_at - cut_at:.2f} s after the cut ({reason}); longest wait for a "
          f"token {stall_s:.2f} s (uncut median step {step_s * 1000:.0f} ms); answer done "
          f"{answered - cut_at:.2f} s after the cut ({answered - t0:.2f} s in all); cloud idle again "
          f"{cloud_freed - cut_at:.2f} s after the cut; tokens exact before the loss: {n_lost} of {len(ids)}")
    assert stats.degraded and stats.finish_reason in ("eos", "length") and not stats.device_only
    assert "silent" in reason
    # the rule itself: lost a deadline (+ a watch tick) after the last frame heard, and nothing
    # was heard after the cut. (The last frame usually comes within a ping interval, 0.5 s, of the
    # cut; on a loaded box the cloud's last pong or draft came 0.86 s before it in a CI-like run.)
    last_heard = events["last_heard"]
    assert last_heard <= cut_at + 0.05, (last_heard, cut_at)  # the blackhole held
    assert DEADLINE_S <= lost_at - last_heard < DEADLINE_S + 0.5, lost_at - last_heard
    assert lost_at - cut_at < DEADLINE_S + 0.5
    # the answer waited for the deadline, then went on at once: the first piece after the loss
    # comes within about one decode (the device's pending drafts are committed at once). Pieces
    # between the cut and the loss may still come from cloud distributions that arrived before
    # the cut (a slow device lags the cloud), so the longest gap alone can be shorter than the
    # deadline.
    assert resumed_at - lost_at < 2 * step_s + 1.0, resumed_at - lost_at
    # (the longest gap itself is not bounded further: it starts at the last piece before the cut,
    # which under the whole suite's load can come a good part of a second before it; the two
    # bounds above are the deadline's own)
    assert 3 <= n_cut <= n_lost < len(ids)
    assert ids[:n_lost] == want[:n_lost]  # every token decided with the cloud is exact DRAGON
    # + a tick, health polling, slack; no lower bound: the cloud's deadline counts from the device's
    # last frame, which under the whole suite's load can come well before the cut (a run freed it
    # 1.75 s after the cut: this loaded test process had already stopped pinging)
    assert 0 < cloud_freed - cut_at < DEADLINE_S + 2.0
    assert again == want and not again_stats.degraded
