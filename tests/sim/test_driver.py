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

from fakes import EOS, ListStreams, iterative_side_spec, retrieved_docs, side_spec


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



async def run_iterative_pair(config: s.SessionConfig, world: int, one_way_s: float):
    """Both sides re-retrieve from their pools every ``config.retrieve_every`` tokens: the drivers
    swap their fake streams (the new ones get the generated tokens appended)."""
    pools = {"device": [1, 2, 3, 4], "cloud": [5, 6, 7, 8, 9]}
    opened: dict[str, list[ListStreams]] = {"device": [], "cloud": []}
    drivers: dict[str, SessionDriver] = {}

    def reopen(side: str):
        async def go(prefix):
            docs, scores = retrieved_docs(pools[side], tuple(prefix), world)
            opened[side].append(ListStreams(docs, world, 0.001))
            return opened[side][-1], scores
        return go

    def sender(to: str):
        async def send(msg: m.Message) -> None:
            frame = codec.encode(msg)

            async def deliver():
                await asyncio.sleep(one_way_s)
                drivers[to].feed(s.PeerMessage(codec.decode(frame)))

            asyncio.get_running_loop().create_task(deliver())
        return send

    committed: list[int] = []
    for side, other in (("device", "cloud"), ("cloud", "device")):
        docs, scores = retrieved_docs(pools[side], (), world)
        first = ListStreams(docs, world, 0.001)
        opened[side].append(first)
        session = s.Session(side, config, side_spec(docs, scores, world).log_h)
        drivers[side] = SessionDriver(session, first, scores, sender(other), reretrieve=reopen(side),
                                      on_commit=committed.extend if side == "device" else None)
    await asyncio.wait_for(asyncio.gather(drivers["device"].run(), drivers["cloud"].run()), timeout=60)
    want = centralized_decode(config, iterative_side_spec(pools["device"], world, config.retrieve_every),
                              iterative_side_spec(pools["cloud"], world, config.retrieve_every))
    return committed, want, drivers, opened


@pytest.mark.parametrize("aggregator", ["device", "cloud"])
def test_drivers_swap_their_streams_at_retrieval_boundaries(aggregator):
    for world in range(3):
        config = s.SessionConfig(request_id=7, max_tokens=20, seed=world, eos_ids=frozenset({EOS}),
                                 aggregator=aggregator, scheduling=False, max_depth=5, retrieve_every=3)
        committed, want, drivers, opened = asyncio.run(run_iterative_pair(config, world, 0.005))
        assert committed == want
        for side, driver in drivers.items():
            assert driver.stats.retrievals >= (len(want) - 1) // 3  # every boundary reached (more: rollbacks)
            assert all(g.closed for g in opened[side] if g is not driver.group)  # replaced groups are closed
            key = list(driver._docs_for)  # the last boundary's prefix: the answer so far was prefilled
            assert len(key) == 3 * ((len(want) - 1) // 3) and key == want[: len(key)] == driver.group.tokens[: len(key)]
