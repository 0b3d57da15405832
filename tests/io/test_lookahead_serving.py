"""The cloud's TeleRAG path (issue 15): a request's query opened on the lookahead searcher at its
Open, the search of that request on that very handle, results equal to plain IVF search, and
every pinned cluster released on every path (done, request cancelled mid-open or mid-search,
device gone, several requests at once)."""

from __future__ import annotations

import asyncio
import os
import threading
import time

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

faiss = pytest.importorskip("faiss")
faiss.omp_set_num_threads(1)

from dragon_core import messages as m  # noqa: E402
from dragon_vllm import corpus as c  # noqa: E402
from dragon_vllm.corpus.ivf import build_faiss_index  # noqa: E402
from dragon_vllm.corpus.lookahead import LookaheadSearcher  # noqa: E402
from tests.io.test_corpus_ivf import tied_queries, tied_vectors  # noqa: E402


def pins(index: c.PublicIndex) -> int:
    return int(index.lookahead.cache.pins.sum())


# ------------------------------------------------------------------ the searcher's handles
@pytest.mark.parametrize("budget", [0, 20_000, 10**9], ids=["no-cache", "tight", "all"])
def test_open_each_and_search_many_equal_plain_ivf_and_release_every_pin(budget):
    index, _ = build_faiss_index(tied_vectors(), c.IndexSpec(kind="ivf-flat", nlist=32, nprobe=6))
    q = tied_queries(40)
    D0, I0 = index.search(q, 10)
    s = LookaheadSearcher(index, budget_bytes=budget)
    try:
        handles = s.open_each(q)
        assert len(handles) == len(q) and s.cache.pins.sum() > 0
        gone = handles[3]
        s.release(gone)
        s.release(gone)  # idempotent
        first = s.search_many(handles[:20], 10)  # one scan for 19 requests; the released one: None
        assert first[3] is None
        rest = s.search_many(handles[20:], 10)
        for row, found in enumerate(first + rest):
            if row == 3:
                continue
            D, I = found
            assert (I[0] == I0[row]).all() and (D[0] == D0[row]).all(), row  # id for id, score for score
        assert s.cache.pins.sum() == 0  # every pin released exactly once (none negative either)
        assert (s.cache.pins == 0).all()
        with pytest.raises(c.LookaheadSpent):
            s.search(handles[0], 10)
        s.release(handles[0])  # after its search: a no-op
        assert (s.cache.pins == 0).all()
    finally:
        s.close()


# ------------------------------------------------------------------ the cloud
@pytest.fixture(scope="module")
def lookahead_index(tmp_path_factory):
    from tests.io.test_corpus import write_inputs

    root = tmp_path_factory.mktemp("la")
    built = c.PublicIndex.build(write_inputs(root / "inputs"), root / "ivf", kind="ivf-flat", nlist=4, nprobe=2,
                                progress=False)
    plain = c.PublicIndex.load(built.path, embedder=built.embedder)
    cached = c.PublicIndex.load(built.path, embedder=built.embedder, lookahead=True, budget_bytes=1 << 20)
    yield plain, cached
    for x in (built, plain, cached):
        x.close()


@pytest.fixture(scope="module")
def tokenizer(smollm2):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(smollm2.tokenizer_dir()))


class OneStreamEngine:
    """Opens stand-in stream groups (the link's fakes); records the prompts' count."""

    vocab_size = 0

    def __init__(self) -> None:
        self.opened = 0

    async def open_group(self, prompts, temperature, scores=None, max_tokens=None):
        from fakes import ListStreams

        self.opened += 1
        return ListStreams(list(range(len(prompts))), 0, 0.001)


class Spy:
    """Wraps the index's lookahead steps: which handles were opened, which searched."""

    def __init__(self, index: c.PublicIndex) -> None:
        self.index, self.opened, self.searched = index, [], []
        self.open_gate, self.search_gate = threading.Event(), threading.Event()
        self.open_gate.set()
        self.search_gate.set()
        self.in_open, self.in_search = threading.Event(), threading.Event()
        self._open, self._search = index.open_queries, index.search_opened
        index.open_queries, index.search_opened = self.open_queries, self.search_opened

    def open_queries(self, queries):
        self.in_open.set()
        self.open_gate.wait(10)
        handles = self._open(queries)
        self.opened += list(zip(queries, handles))
        return handles

    def search_opened(self, handles, k):
        self.in_search.set()
        self.search_gate.wait(10)
        self.searched += list(handles)
        return self._search(handles, k)

    def undo(self) -> None:
        del self.index.open_queries, self.index.search_opened


def make_cloud(index, tokenizer, identity=None):
    from dragon_vllm.backend import DragonCloud

    return DragonCloud(OneStreamEngine(), tokenizer, identity, [tokenizer.eos_token_id], index, max_model_len=2048)


@pytest.fixture
def spy(lookahead_index):
    s = Spy(lookahead_index[1])
    yield s
    s.open_gate.set()
    s.search_gate.set()
    s.undo()


async def _until(cond, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met")
        await asyncio.sleep(0.01)


def test_the_cloud_opens_the_query_at_open_and_searches_that_handle(lookahead_index, tokenizer, spy):
    from tests.io.test_corpus import QUERIES

    plain, cached = lookahead_index
    cloud = make_cloud(cached, tokenizer)
    queries = list(QUERIES)

    async def main():
        opened = await asyncio.gather(*(cloud.open_request(m.Open(i + 1, q, 3, 8, 0)) for i, q in enumerate(queries)))
        for o in opened:
            await o.group.close()
        return opened

    opened = asyncio.run(main())
    assert sorted(q for q, _ in spy.opened) == sorted(queries)  # each request's query opened once
    assert {id(h) for _, h in spy.opened} == {id(h) for h in spy.searched}  # ... and searched on that handle
    for q, o in zip(queries, opened):  # the same passages as plain IVF search
        assert list(o.ids) == [p.id for p in plain.search(q, 3)]
    assert all(h.lookahead.state == "released" for h in spy.searched) and pins(cached) == 0
    stats = cloud._lookahead.stats()
    assert stats["opened"] == stats["searched"] == len(queries)


@pytest.mark.parametrize("where", ["open", "search"])
def test_a_request_cancelled_mid_open_or_mid_search_releases_its_pins(lookahead_index, tokenizer, spy, where):
    """Cancelled while its open runs (the batcher gives the late handle back) or while its search
    batch is starting (the request's own release; the scan then skips the handle)."""
    _, cached = lookahead_index
    cloud = make_cloud(cached, tokenizer)
    gate, inside = (spy.open_gate, spy.in_open) if where == "open" else (spy.search_gate, spy.in_search)
    gate.clear()

    async def main():
        task = asyncio.create_task(cloud.open_request(m.Open(1, "active volcano in Sicily", 2, 8, 0)))
        await _until(inside.is_set)
        await asyncio.sleep(0.05)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        assert task.cancelled()
        gate.set()  # the thread finishes its batch after the request is gone
        await _until(lambda: len(spy.opened) == 1 and (where == "open" or spy.searched))
        await _until(lambda: pins(cached) == 0)

    asyncio.run(main())
    (_, handle), = spy.opened
    assert handle.lookahead.state == "released" and pins(cached) == 0
    assert cloud.engine.opened == 0  # no streams for a request cancelled before its prompts


def test_a_request_cancelled_while_its_search_waits_for_the_batch_ahead_releases_its_pins(
        lookahead_index, tokenizer, spy):
    """Opened, then queued behind another request's search batch, then cancelled: it is never
    searched, so only its own release frees its clusters."""
    _, cached = lookahead_index
    cloud = make_cloud(cached, tokenizer)
    spy.search_gate.clear()

    async def main():
        first = asyncio.create_task(cloud.open_request(m.Open(1, "active volcano in Sicily", 2, 8, 0)))
        await _until(spy.in_search.is_set)
        second = asyncio.create_task(cloud.open_request(m.Open(2, "chess opening 1. e4 c5", 2, 8, 0)))
        await _until(lambda: len(spy.opened) == 2 and cloud._lookahead._searches._pending)
        assert pins(cached) > 0
        second.cancel()
        await asyncio.gather(second, return_exceptions=True)
        spy.search_gate.set()
        opened = await first
        await opened.group.close()

    asyncio.run(main())
    (_, searched), (_, dropped) = spy.opened
    assert [id(h) for h in spy.searched] == [id(searched)]  # the cancelled one was never scanned
    assert dropped.lookahead.state == "released" and pins(cached) == 0


def test_a_device_gone_mid_search_releases_the_pins_through_the_link(lookahead_index, tokenizer, spy):
    """The link's own path: the device disconnects while its request's search runs; the cloud
    cancels the opening request, the search ends in its thread, every pin goes."""
    from dragon_edge.link import CloudLink
    from test_link import IDENTITY, TOKEN, ask, cloud_server

    _, cached = lookahead_index
    cloud = make_cloud(cached, tokenizer, IDENTITY)
    spy.search_gate.clear()

    async def main():
        async with cloud_server(cloud) as (server, url):
            link = CloudLink(url, IDENTITY, TOKEN)
            await link.connect()
            device = asyncio.create_task(ask(link, dict(max_tokens=20)))
            await _until(spy.in_search.is_set)
            assert pins(cached) > 0
            await link.close()  # the device disappears while the cloud searches for it
            await _until(lambda: server.active_requests == 0 and not any(cn.tasks for cn in server.connections))
            spy.search_gate.set()
            await _until(lambda: pins(cached) == 0)
            device.cancel()
            await asyncio.gather(device, return_exceptions=True)

    asyncio.run(main())
    assert pins(cached) == 0 and all(h.lookahead.state == "released" for _, h in spy.opened)


def test_a_failing_scan_reaches_its_caller_and_releases_the_pins(lookahead_index, tokenizer, spy):
    _, cached = lookahead_index
    cloud = make_cloud(cached, tokenizer)

    def broken(*_):
        raise RuntimeError("store lost")

    parts = (cached.lookahead.store, cached.lookahead.host)
    for part in parts:
        part.scan_ids = broken
    try:
        with pytest.raises(RuntimeError, match="store lost"):
            asyncio.run(cloud.open_request(m.Open(1, "sourdough bread", 2, 8, 0)))
    finally:
        for part in parts:
            del part.scan_ids
    assert len(spy.opened) == 1 and pins(cached) == 0 and np.all(cached.lookahead.cache.pins >= 0)
