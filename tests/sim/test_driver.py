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
from dragon_host.documents import Documents
import numpy as np


def wire_to(drivers: dict[str, SessionDriver], to: str, one_way_s: float):
    """A driver's ``send``: each message encoded, delivered to ``drivers[to]`` after ``one_way_s``."""
    async def send(msg: m.Message) -> None:
        frame = codec.encode(msg)

        async def deliver():
            await asyncio.sleep(one_way_s)
            drivers[to].feed(s.PeerMessage(codec.decode(frame)))

        asyncio.get_running_loop().create_task(deliver())

    return send


async def run_pair(config: s.SessionConfig, world: int, one_way_s: float):
    dev_docs, dev_scores = [1, 2], [3.0, 2.5]
    cloud_docs, cloud_scores = [3, 4, 5], [2.8, 2.0, 1.0]
    sessions = {
        "device": s.Session("device", config, side_spec(dev_docs, dev_scores, world).log_h),
        "cloud": s.Session("cloud", config, side_spec(cloud_docs, cloud_scores, world).log_h),
    }
    drivers: dict[str, SessionDriver] = {}
    committed: list[int] = []
    drivers["device"] = SessionDriver(sessions["device"], ListStreams(dev_docs, world, 0.004), dev_scores,
                                      wire_to(drivers, "cloud", one_way_s), on_commit=committed.extend)
    drivers["cloud"] = SessionDriver(sessions["cloud"], ListStreams(cloud_docs, world, 0.001), cloud_scores,
                                     wire_to(drivers, "device", one_way_s))
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



class FakeSource:
    """A side's documents at the boundaries: ``retrieved_docs`` of its pool for the boundary
    prefix, after ``retrieve_s``; ``speculate``: at once, the real ones where the fake cache
    ``hit``s (per prefix), others where it misses (None: it does not speculate)."""

    def __init__(self, pool, world: int, hit: float | None, retrieve_s: float = 0.01) -> None:
        self.pool, self.world, self.hit, self.retrieve_s = pool, world, hit, retrieve_s
        self.opened: list[ListStreams] = []
        self.open_while_previous_open = 0

    async def retrieve(self, prefix):
        await asyncio.sleep(self.retrieve_s)
        docs, scores = retrieved_docs(self.pool, tuple(prefix), self.world)
        return Documents(tuple(docs), tuple(scores))

    async def speculate(self, prefix):
        if self.hit is None:
            return None
        if np.random.default_rng([self.world, 31, *prefix]).random() < self.hit:
            docs, scores = retrieved_docs(self.pool, tuple(prefix), self.world)
        else:
            docs, scores = retrieved_docs(self.pool[::-1], tuple(prefix) + (999,), self.world)
        return Documents(tuple(docs), tuple(scores))

    async def open(self, docs):
        # the group it replaces is closed first (its KV is what the new one may reuse)
        self.open_while_previous_open += bool(self.opened) and not self.opened[-1].closed
        self.opened.append(ListStreams(list(docs.ids), self.world, 0.001))
        return self.opened[-1]


class BatchingSource(FakeSource):
    """``FakeSource`` with RaLMSpec's batched verification: ``retrieve_many`` costs one
    retrieval's time for any number of prefixes, and records each batch's size."""

    def __init__(self, *args, **kw) -> None:
        super().__init__(*args, **kw)
        self.batches: list[int] = []

    async def retrieve_many(self, prefixes):
        self.batches.append(len(prefixes))
        await asyncio.sleep(self.retrieve_s)
        return [Documents(*map(tuple, retrieved_docs(self.pool, tuple(p), self.world))) for p in prefixes]


async def run_iterative_pair(config: s.SessionConfig, world: int, one_way_s: float, hit: float | None = None,
                             cloud_source: FakeSource | None = None):
    """Both sides re-retrieve from their pools every ``config.retrieve_every`` tokens: the drivers
    swap their fake streams (the new ones get the generated tokens appended); with ``hit``, the
    cloud speculates from a fake cache first (RaLMSpec)."""
    pools = {"device": [1, 2, 3, 4], "cloud": [5, 6, 7, 8, 9]}
    sources = {"device": FakeSource(pools["device"], world, None),
               "cloud": cloud_source or FakeSource(pools["cloud"], world, hit, retrieve_s=0.02)}
    drivers: dict[str, SessionDriver] = {}
    committed: list[int] = []
    for side, other in (("device", "cloud"), ("cloud", "device")):
        docs, scores = retrieved_docs(pools[side], (), world)
        first = ListStreams(docs, world, 0.001)
        sources[side].opened.append(first)
        session = s.Session(side, config, side_spec(docs, scores, world).log_h)
        drivers[side] = SessionDriver(session, first, scores, wire_to(drivers, other, one_way_s), documents=sources[side],
                                      on_commit=committed.extend if side == "device" else None)
    await asyncio.wait_for(asyncio.gather(drivers["device"].run(), drivers["cloud"].run()), timeout=60)
    want = centralized_decode(config, iterative_side_spec(pools["device"], world, config.retrieve_every),
                              iterative_side_spec(pools["cloud"], world, config.retrieve_every))
    return committed, want, drivers, sources


@pytest.mark.parametrize("hit", [None, 0.0, 0.5, 1.0])
@pytest.mark.parametrize("aggregator", ["device", "cloud"])
def test_drivers_swap_their_streams_at_retrieval_boundaries(aggregator, hit):
    """Iterative retrieval through the drivers, and RaLMSpec on the cloud's (its cache right
    never, half the time, always): the answer is the reference's with the real documents."""
    for world in range(3):
        config = s.SessionConfig(request_id=7, max_tokens=20, seed=world, eos_ids=frozenset({EOS}),
                                 aggregator=aggregator, scheduling=False, max_depth=5, retrieve_every=3)
        committed, want, drivers, sources = asyncio.run(run_iterative_pair(config, world, 0.005, hit))
        assert committed == want
        for side, driver in drivers.items():
            docs = driver.documents
            assert docs.stats.swaps >= (len(want) - 1) // 3  # every boundary reached (more: rollbacks)
            assert all(g.closed for g in sources[side].opened if g is not driver.group)  # replaced groups closed
            assert sources[side].open_while_previous_open == 0  # ... before their successors opened
            key = list(docs.current)  # the last boundary's prefix: the answer so far was prefilled
            assert len(key) == 3 * ((len(want) - 1) // 3) and key == want[: len(key)] == driver.group.tokens[: len(key)]
        cloud = drivers["cloud"].documents.stats
        if hit is None:
            assert cloud.speculated == 0
        elif len(want) > 4:
            assert cloud.speculated >= 1 and (hit < 1.0 or cloud.speculated_wrong == 0)
            assert cloud.speculated_right + cloud.speculated_wrong <= cloud.speculated
            if hit == 0.0:  # the cache was wrong: held drafts were dropped, recomputed over the real documents
                assert cloud.speculated_wrong >= 1 and drivers["cloud"].session.stats.retrieval_rollbacks >= 1


@pytest.mark.parametrize("hit", [0.0, 1.0])
def test_costly_verifications_are_batched_by_os3_and_the_answer_stays_exact(hit):
    """RaLMSpec's batched verification: a real retrieval costing ~25 fake steps makes OS³ pick
    a stride of 2 (the window of 6 drafts holds two boundaries of 3 tokens), so speculations are
    verified two at a time, in one ``retrieve_many``; a batch short of its stride is verified
    as soon as the session cannot go on without it (else this would hang: 60 s timeout). The
    answer is the reference's with the real documents, right cache or wrong."""
    batched = 0
    for world in range(3):
        config = s.SessionConfig(request_id=7, max_tokens=24, seed=world, eos_ids=frozenset(),
                                 aggregator="device", scheduling=False, max_depth=6, retrieve_every=3)
        source = BatchingSource([5, 6, 7, 8, 9], world, hit, retrieve_s=0.03)
        committed, want, drivers, _ = asyncio.run(run_iterative_pair(config, world, 0.002, cloud_source=source))
        assert committed == want
        stats = drivers["cloud"].documents.stats
        assert drivers["cloud"].documents.policy.max_stride == 2
        assert sum(source.batches) == stats.speculated_right + stats.speculated_wrong and max(source.batches) <= 2
        assert stats.verifications == len(source.batches) and stats.largest_batch == max(source.batches)
        batched += sum(b == 2 for b in source.batches)
        if hit == 0.0:
            assert stats.speculated_wrong >= 1 and stats.speculated_right == 0
    if hit == 1.0:
        assert batched >= 2, batched  # a right cache lets batches fill


def test_a_boundary_with_the_same_documents_keeps_the_streams_and_takes_the_new_scores():
    """Two documents in the pool: a boundary often finds them again in the same order, and then
    the group stays (no re-prefill) with the new scores; the answer is the reference's."""
    kept = 0
    for world in range(4):
        config = s.SessionConfig(request_id=7, max_tokens=20, seed=world, eos_ids=frozenset({EOS}),
                                 aggregator="device", scheduling=False, max_depth=5, retrieve_every=2)
        source = FakeSource([1, 2], world, None)
        docs, scores = retrieved_docs([1, 2], (), world)
        first = ListStreams(docs, world, 0.001)
        session = s.Session("device", config, side_spec(docs, scores, world).log_h, solo=True)
        committed: list[int] = []

        async def no_send(msg) -> None:
            return None

        driver = SessionDriver(session, first, scores, no_send, documents=source, on_commit=committed.extend,
                               first_documents=Documents(tuple(docs), tuple(scores)))
        asyncio.run(asyncio.wait_for(driver.run(), 60))
        from dragon_core.testing.reference import solo_decode
        assert committed == solo_decode(config, iterative_side_spec([1, 2], world, 2), "device")[: len(committed)]
        boundaries = (len(committed) - 1) // 2
        kept += boundaries - driver.documents.stats.swaps
        assert driver.documents.stats.swaps <= boundaries
    assert kept >= 3, kept


class LostRankStreams(ListStreams):
    """The cloud's streams on a data-parallel rank that is lost after ``good`` steps: the next
    step raises ``RankLost``, as ``dragon_vllm.ranked_engine`` does for a dead engine core."""

    def __init__(self, *args, good: int) -> None:
        super().__init__(*args)
        self.good = good

    async def next_dists(self):
        from dragon_vllm.ranked_engine import RankLost

        if self.good <= 0:
            raise RankLost("rank 1 is lost (its engine core died)")
        self.good -= 1
        return await super().next_dists()


@pytest.mark.parametrize("aggregator", ["device", "cloud"])
def test_a_lost_rank_on_the_cloud_finishes_the_answer_degraded_on_the_device(aggregator):
    """Issue 17: a request whose cloud rank is lost mid-answer (the engine raises ``RankLost``)
    ends on the cloud, which tells the device (``Cancel``), and the device finishes the answer
    alone, flagged degraded, whichever side aggregated: as when the cloud dies. Nothing hangs."""
    world = 1
    config = s.SessionConfig(request_id=9, max_tokens=20, seed=world, eos_ids=frozenset({EOS}),
                             aggregator=aggregator, scheduling=False, max_depth=5)
    dev_docs, dev_scores = [1, 2], [3.0, 2.5]
    cloud_docs, cloud_scores = [3, 4, 5], [2.8, 2.0, 1.0]

    async def scenario():
        sessions = {side: s.Session(side, config, side_spec(docs, scores, world).log_h)
                    for side, docs, scores in (("device", dev_docs, dev_scores), ("cloud", cloud_docs, cloud_scores))}
        drivers: dict[str, SessionDriver] = {}
        committed: list[int] = []
        drivers["device"] = SessionDriver(sessions["device"], ListStreams(dev_docs, world, 0.002), dev_scores,
                                          wire_to(drivers, "cloud", 0.003), on_commit=committed.extend)
        drivers["cloud"] = SessionDriver(sessions["cloud"], LostRankStreams(cloud_docs, world, 0.001, good=4),
                                         cloud_scores, wire_to(drivers, "device", 0.003))
        fins = await asyncio.wait_for(asyncio.gather(drivers["device"].run(), drivers["cloud"].run()), timeout=30)
        return committed, fins

    committed, (fin_dev, fin_cloud) = asyncio.run(scenario())
    assert fin_cloud.reason == "cancelled" and "RankLost" in fin_cloud.detail, fin_cloud
    assert fin_dev.degraded and fin_dev.reason in ("eos", "length"), fin_dev
    assert committed and (committed[-1] == EOS or len(committed) == config.max_tokens)
