"""The asyncio driver runs two sessions under real concurrency (asyncio tasks, real sleeps),
with in-memory engines; the output must equal centralized aggregation token for token."""

from __future__ import annotations

import asyncio
import pytest

from dragon_core import codec
from dragon_core import messages as m
from dragon_core import session as s
from dragon_host.driver import SessionDriver
from dragon_core.testing.reference import centralized_decode

from fakes import EOS, ListStreams, side_spec


async def run_pair(config: s.SessionConfig, world: int, one_way_s: float):
    dev_docs, dev_scores = [1, 2], [3.0, 2.5]
    cloud_docs, cloud_scores = [3, 4, 5], [2.8, 2.0, 1.0]
    sessions = {
        "device": s.Session("device", config, side_spec(dev_docs, dev_scores, world).log_h),
        "cloud": s.Session("cloud", config, side_spec(cloud_docs, cloud_scores, world).log_h),
    }
    drivers: dict[str, SessionDriver] = {}
    wire: list[bytes] = []

    def sender(to: str):
        async def send(msg: m.Message) -> None:
            frame = codec.encode(msg)
            wire.append(frame)

            async def deliver():
                await asyncio.sleep(one_way_s)
                drivers[to].feed(s.PeerMessage(codec.decode(frame)))

            asyncio.get_running_loop().create_task(deliver())

        return send

    committed: list[int] = []
    drivers["device"] = SessionDriver(sessions["device"], ListStreams(dev_docs, world, 0.004), dev_scores,
                                      sender("cloud"), on_commit=committed.extend)
    drivers["cloud"] = SessionDriver(sessions["cloud"], ListStreams(cloud_docs, world, 0.001), cloud_scores,
                                     sender("device"))
    fin_dev, fin_cloud = await asyncio.wait_for(
        asyncio.gather(drivers["device"].run(), drivers["cloud"].run()), timeout=60)
    want = centralized_decode(config, side_spec(dev_docs, dev_scores, world), side_spec(cloud_docs, cloud_scores, world))
    return committed, want, fin_dev, fin_cloud, sessions


@pytest.mark.parametrize("one_way_ms", [0, 5, 25])
@pytest.mark.parametrize("aggregator", ["device", "cloud"])
def test_drivers_over_asyncio_equal_centralized(one_way_ms, aggregator):
    for world in range(3):
        config = s.SessionConfig(request_id=7, max_tokens=20, seed=world, eos_ids=frozenset({EOS}),
                                 aggregator=aggregator, scheduling=False, max_depth=5)
        committed, want, fin_dev, fin_cloud, sessions = asyncio.run(run_pair(config, world, one_way_ms / 1000))
        assert committed == want
        assert sessions["cloud"].committed == want
        assert fin_dev.reason in ("eos", "length") and not fin_dev.degraded

