"""Live Greedy Scheduling end to end: a real `dragon-cloud serve` process made slow with
``--emulate-decode-ms``, the device runtime (llama.cpp) and a netem proxy at RTT 100 ms.

* a slow cloud (slower than the device by more than an RTT, its drafts sometimes rejected): a
  request started on the device, with no estimates yet, ends with the aggregator on the cloud;
  the next request on the link starts there (warm prior); the answers equal the pinned ones;
* a slow device (slower than that cloud by more than an RTT): a request started on the cloud
  ends on the device (ΔZ = (1 - α_device)·rtt ≥ 0, and ties go to the device).

Each time the side it ends on is also the side the rule picks from the estimates the request
measured (``initial_aggregator`` over its prior), so the test checks the live decisions against
the formula, not against a hard-coded side alone. Latency comparisons live in
``benchmarks/bench_e2e.py`` (timing is no test on a shared 2-core machine).
"""

from __future__ import annotations

import asyncio

import pytest

from benchmarks.netem import Shape, spawn_proxy, stop_proxy
from dragon_core.scheduler import initial_aggregator
from dragon_demo import start_cloud, stop, wait_healthy
from dragon_edge.link import CloudLink
from dragon_edge.runtime import AnswerOptions

pytestmark = pytest.mark.slow

TOKEN = "sched-token"
QUESTION = "Where does my sister Lena live, and what is that city famous for?"
# Margins against a loaded 2-core machine: the full suite measured llama.cpp device steps up to
# ~400 ms (920 ms once); with the cloud slowed by only 250 ms such a spike made the device look
# slower than the cloud by more than an RTT, and the rule rightly moved back to the device
CLOUD_SLOW_MS = 600.0
DEVICE_SLOW_MS = 1000.0  # slower than the slowed cloud by more than the RTT
RTT_MS = 100.0


@pytest.fixture(scope="module")
def loop(e2e_loop):
    return e2e_loop


@pytest.fixture(scope="module")
def slow_cloud_url(world):
    """A second cloud process over the shared world's public index, slowed."""
    root = world[0]
    log = root / "slow-cloud.log"
    proc, port = start_cloud(root / "index", TOKEN, log, ("--emulate-decode-ms", str(CLOUD_SLOW_MS)))
    proxy = None
    try:
        wait_healthy(f"http://127.0.0.1:{port}", proc, timeout_s=300)
        one_way = Shape(latency_ms=RTT_MS / 2, jitter_ms=RTT_MS / 10)
        proxy, pport = spawn_proxy(("127.0.0.1", port), up=one_way, down=one_way, seed=7)
        yield f"http://127.0.0.1:{pport}"
    except BaseException:
        print(log.read_text()[-4000:])
        raise
    finally:
        if proxy is not None:
            stop_proxy(proxy)
        stop(proc)


def ask(loop, runtime, url: str, max_tokens: int = 20, **kw):
    async def go():
        runtime.link = CloudLink(url, runtime.identity, TOKEN)
        ids, stats = [], None
        try:
            async for piece in runtime.answer(QUESTION, AnswerOptions(max_tokens=max_tokens, dist_top_k=32, **kw)):
                ids.extend(piece.token_ids)
                stats = piece.finished or stats
        finally:
            await runtime.link.close()
        return ids, stats

    return loop.run_until_complete(asyncio.wait_for(go(), 300))


def rule_says(runtime, max_tokens: int | None = None) -> str:
    """The side the ΔZ rule picks from the estimates the last request measured (for an answer of
    up to ``max_tokens``: a start on the cloud must repay its round trip over the answer)."""
    return initial_aggregator(runtime.priors[runtime.link.url], max_tokens=max_tokens)


# A move to the cloud must repay one RTT over the tokens left: ΔZ·left > RTT, and with the cloud
# slower by more than an RTT ΔZ = (1 - α_cloud)·RTT, so it pays only while (1 - α_cloud)·left > 1.
# The cloud's drafts on this question are accepted ~0.6 of the time (measured), and the answer
# ends by EOS after ~23 tokens; asking up to 40 leaves the rule a horizon that repays the move.
LONG_ANSWER = 40


def test_slow_cloud_moves_the_aggregator_to_the_cloud_and_the_next_request_starts_there(loop, runtime, slow_cloud_url):
    n = LONG_ANSWER
    pinned, _ = ask(loop, runtime, slow_cloud_url, n, aggregator="device", scheduling=False)
    runtime.priors.clear()  # cold: nothing measured on this link yet
    ids, stats = ask(loop, runtime, slow_cloud_url, n, aggregator="device", scheduling=True)
    assert not stats.degraded and ids == pinned  # moving the aggregator changes no token
    assert stats.acceptance_cloud < 1.0  # else ΔZ = 0 and staying would be right too
    prior = runtime.priors.get(runtime.link.url)
    # the move happened and held at the end; under the whole suite's load the device's steps
    # swing (35-900 ms measured), and one run moved back and forth before settling (3 handovers)
    assert stats.final_aggregator == "cloud" and stats.handovers >= 1, \
        (stats.aggregator_runs, stats.delta_z_ms, prior)
    assert rule_says(runtime, n) == "cloud", prior
    # warm: the prior from that request places the next one on the cloud from its first token
    ids2, warm = ask(loop, runtime, slow_cloud_url, n, aggregator="auto", scheduling=True)
    assert ids2 == pinned
    # it starts there: its first token is decided on the cloud (with no prior a request starts
    # on the device: `initial_aggregator(None)`). The prior seeds the live estimates, so from its
    # first steps on the rule may move it back and forth: CI saw [cloud 12, device 4, cloud 4,
    # device 3] when a loaded box made the device's steps swing (391 ms mean vs the cloud's
    # 631), the rule at work on those numbers, not the prior's failure; how long it stays is
    # timing, and timing is no test on 2 shared cores
    runs = warm.aggregator_runs
    assert runs[0][0] == "cloud", (runs, warm.delta_z_ms, prior)
    assert initial_aggregator(None, max_tokens=n) == "device"  # so the start came from the prior


def test_slow_device_moves_the_aggregator_to_the_device(loop, runtime, slow_cloud_url):
    runtime.priors.clear()
    ids, stats = ask(loop, runtime, slow_cloud_url, aggregator="cloud", scheduling=True,
                     emulate_decode_ms=DEVICE_SLOW_MS)
    assert not stats.degraded
    assert stats.final_aggregator == "device" and stats.handovers == 1, stats.aggregator_steps
    assert rule_says(runtime) == "device"
