"""Placement of requests on data-parallel ranks (``dragon_vllm.placement``), pure logic.

Rank choice (document-block overlap first, within a load slack; else least loaded; ties to the
lower rank), the pin held until released (idempotent), lost ranks, the counters; and
``RankedEngine``'s release paths around stand-in rank engines (the real engines' pinning is
tests/engines/test_data_parallel.py, with no stand-in).
"""

from __future__ import annotations

import asyncio
import copy
from types import SimpleNamespace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dragon_vllm.block_ledger import BlockLedger
from dragon_vllm.kv_blocks import block_keys
from dragon_vllm.placement import NoLiveRank, Placement
from dragon_vllm.ranked_engine import PinnedGroup, RankedEngine, RankLost

B = 4  # block size of these tests


def doc(n: int, blocks: int = 3) -> list[int]:
    """A prompt of ``blocks`` full blocks, unique to ``n``, plus a partial tail."""
    return [1000 * n + i for i in range(blocks * B)] + [7, 7]


# ---------------------------------------------------------------------------- block keys
def test_block_keys_are_chained_over_full_blocks():
    a, b = doc(1), doc(1)[:B] + doc(2)[B:]
    assert len(block_keys(a, B)) == 3  # the partial tail block is not keyed
    assert block_keys(a, B)[0] == block_keys(b, B)[0]
    assert block_keys(a, B)[1] != block_keys(b, B)[1]
    # the same block after a different prefix is another block for a prefix cache
    assert block_keys(doc(2)[B:2 * B], B)[0] != block_keys(doc(2), B)[1]
    assert block_keys(a, B, max_blocks=2) == block_keys(a, B)[:2]


def test_ledger_counts_the_leading_run_and_evicts_the_oldest():
    ledger = BlockLedger(capacity=4)
    keys = block_keys(doc(1), B)
    ledger.record([keys])
    assert ledger.leading_hits(keys) == 3
    assert ledger.leading_hits(keys[1:]) == 2 and ledger.leading_hits((123,) + keys) == 0
    ledger.record([block_keys(doc(2), B)])  # 6 keys, capacity 4: doc 1's first two go
    assert len(ledger) == 4 and ledger.leading_hits(keys) == 0


# ---------------------------------------------------------------------------- choosing
def placement(ranks: int = 2, **kw) -> Placement:
    return Placement(ranks, B, cache_blocks=64, **kw)


def test_a_request_goes_where_its_documents_are():
    p = placement()
    first = p.place([doc(1), doc(2)])
    assert first.rank == 0 and first.overlap_blocks == 0  # a tie: the lower rank
    other = p.place([doc(3)])
    assert other.rank == 1  # least loaded
    again = p.place([doc(2), doc(1)])  # the same documents in another order
    assert again.rank == 0 and again.overlap_blocks == 6
    assert p.ranks[0].placed_by_overlap == 1


def test_the_prefix_every_prompt_shares_does_not_draw_requests():
    system = list(range(900, 900 + 2 * B))  # two blocks of a system turn before every document
    p = placement()
    first = p.place([system + doc(1), system + doc(2)])
    other = p.place([system + doc(3)])  # only the system blocks in common with rank 0
    assert (first.rank, other.rank, other.overlap_blocks) == (0, 1, 0)
    again = p.place([system + doc(1)])
    assert again.rank == 0 and again.overlap_blocks == 3
    assert p.ranks[0].estimated_hit_blocks == 5  # what a prefix cache reuses: the system blocks too


def test_overlap_yields_to_load_beyond_the_slack():
    p = placement(max_extra_streams=2)
    hot = [p.place([doc(1), doc(2)])]  # rank 0: 2 streams
    hot.append(p.place([doc(1), doc(2)]))  # rank 0 holds them, 2 <= 0 + 2: still rank 0
    assert [pin.rank for pin in hot] == [0, 0]
    spill = p.place([doc(1), doc(2)])  # rank 0 at 4 streams > 0 + 2: the least loaded
    assert spill.rank == 1
    p.release(hot[0])
    p.release(hot[1])
    assert p.place([doc(1)]).rank == 0  # both hold it now; rank 0 is the less loaded


def test_round_robin_and_least_loaded():
    rr = placement(3, policy="round_robin")
    assert [rr.place([doc(1)]).rank for _ in range(4)] == [0, 1, 2, 0]
    rr.mark_dead(1)
    assert [rr.place([doc(1)]).rank for _ in range(3)] == [2, 0, 2]
    ll = placement(2, policy="least_loaded")
    big = ll.place([doc(1), doc(2), doc(3)])
    assert (big.rank, ll.place([doc(1)]).rank, ll.place([doc(1)]).rank) == (0, 1, 1)


def test_unknown_policy_and_bad_sizes_are_refused():
    with pytest.raises(ValueError):
        placement(policy="random")
    with pytest.raises(ValueError):
        Placement(0, B, 64)
    with pytest.raises(ValueError):
        BlockLedger(0)


# ---------------------------------------------------------------------------- pins and lost ranks
def test_release_is_idempotent_and_restores_the_load():
    p = placement()
    pin = p.place([doc(1), doc(2)])
    assert p.ranks[0].open_streams == 2 and p.ranks[0].open_requests == 1
    p.release(pin)
    p.release(pin)
    assert p.ranks[0].open_streams == 0 and p.ranks[0].open_requests == 0


def test_a_lost_rank_gets_nothing_new_and_forgets_its_cache():
    p = placement()
    on_zero = p.place([doc(1)])
    assert p.mark_dead(0) is True and p.mark_dead(0) is False
    assert p.ranks[0].lost_requests == 1
    moved = p.place([doc(1)])  # its blocks were on rank 0
    assert moved.rank == 1 and moved.overlap_blocks == 0
    p.release(on_zero)  # the lost rank's request still closes
    assert p.ranks[0].open_streams == 0
    p.mark_dead(1)
    with pytest.raises(NoLiveRank):
        p.place([doc(1)])


ops = st.lists(st.one_of(
    st.tuples(st.just("place"), st.lists(st.integers(0, 5), min_size=1, max_size=4)),
    st.tuples(st.just("release"), st.integers(0, 50)),
    st.tuples(st.just("dead"), st.integers(0, 2)),
), max_size=60)


@settings(max_examples=300, deadline=None)
@given(ops, st.sampled_from(["kv", "least_loaded", "round_robin"]), st.integers(0, 8))
def test_any_history_keeps_the_books(history, policy, slack):
    """Whatever is placed, released (twice too) and lost: a request lands on a live rank; under
    ``kv`` its rank is within the slack of the least loaded and no eligible rank held more of its
    blocks; releasing everything leaves no load; the counters add up."""
    p = Placement(3, B, cache_blocks=12, policy=policy, max_extra_streams=slack)
    pins = []
    for op, arg in history:
        if op == "place":
            live = p.live_ranks()
            if not live:
                with pytest.raises(NoLiveRank):
                    p.place([doc(n) for n in arg])
                continue
            load = {r: p.ranks[r].open_streams for r in live}
            keys = [block_keys(doc(n), B, p.max_key_blocks) for n in arg]
            before = copy.deepcopy(p)
            before._learn_partings(keys)
            overlap = before.overlaps(keys)
            pin = p.place([doc(n) for n in arg])
            assert pin.rank in live and pin.streams == len(arg)
            if policy == "kv":
                assert load[pin.rank] <= min(load.values()) + slack
                eligible = [r for r in live if load[r] <= min(load.values()) + slack]
                assert pin.overlap_blocks == overlap[pin.rank] == max(overlap[r] for r in eligible)
            pins.append(pin)
        elif op == "release" and pins:
            p.release(pins[arg % len(pins)])
        elif op == "dead":
            p.mark_dead(arg)
    for pin in pins:
        p.release(pin)
    assert all(c.open_streams == 0 and c.open_requests == 0 for c in p.ranks)
    assert sum(c.placed for c in p.ranks) == len(pins)
    assert all(c.estimated_hit_blocks <= c.prompt_blocks for c in p.ranks)


# ---------------------------------------------------------------------------- RankedEngine's release paths
class StandInGroup:
    def __init__(self, fail: bool = False) -> None:
        self.fail, self.closed = fail, False

    async def next_dists(self):
        if self.fail:
            raise RuntimeError("the engine went away")
        return []

    async def close(self) -> None:
        self.closed = True


class StandInRank:
    """Just what RankedEngine reads from a rank's engine (not vLLM; see the module docstring)."""

    logprobs_k, mixing, chunk_tokens, block_size, max_model_len, rollback = 5, False, 0, B, 512, "reopen"
    vocab_size = 100
    admission = SimpleNamespace(max_blocks=64, max_slots=8)

    def __init__(self, opening=None) -> None:
        self.llm, self.opening = type("Client", (), {"errored": False})(), opening

    async def open_group(self, prompts, *args):
        if self.opening is not None:
            await self.opening
        return StandInGroup()

    def stats(self) -> dict:
        return {}


def ranked(*ranks) -> RankedEngine:
    return RankedEngine(list(ranks), Placement(len(ranks), B, 64))


def test_every_way_out_releases_the_pin():
    async def scenario():
        engine = ranked(StandInRank(), StandInRank())
        group = await engine.open_group([doc(1)])
        assert isinstance(group, PinnedGroup) and engine.placement.ranks[0].open_streams == 1
        await group.close()
        await group.close()
        blocked = asyncio.get_running_loop().create_future()
        waiting = ranked(StandInRank(blocked))
        opening = asyncio.create_task(waiting.open_group([doc(1), doc(2)]))
        await asyncio.sleep(0)
        opening.cancel()  # cancelled while waiting for the rank's admission
        await asyncio.gather(opening, return_exceptions=True)
        return engine, waiting

    engine, waiting = asyncio.run(scenario())
    assert engine.placement.ranks[0].open_streams == 0
    assert waiting.placement.ranks[0].open_streams == 0


def test_a_failure_on_a_dead_rank_is_rank_lost_and_the_rank_is_avoided():
    async def scenario():
        engine = ranked(StandInRank(), StandInRank())
        group = await engine.open_group([doc(1)])
        group._inner.fail = True
        with pytest.raises(RuntimeError) as alive_failure:  # the rank is alive: the error is the group's own
            await group.next_dists()
        assert not isinstance(alive_failure.value, RankLost)
        engine.ranks[0].llm.errored = True
        with pytest.raises(RankLost):
            await group.next_dists()
        await group.close()
        later = await engine.open_group([doc(1)])
        await later.close()
        return engine, later

    engine, later = asyncio.run(scenario())
    assert later.rank == 1
    stats = engine.stats()
    assert stats["ranks"][0]["alive"] is False and stats["ranks"][0]["lost_requests"] == 1


@settings(max_examples=100, deadline=None)
@given(st.lists(st.lists(st.integers(0, 7), min_size=1, max_size=4), max_size=40),
       st.sampled_from(["kv", "least_loaded", "round_robin"]), st.integers(0, 8))
def test_the_same_history_gives_the_same_places(requests, policy, slack):
    """Ties are broken by rank, never by chance: two placements fed the same requests (two open at
    a time) pin every request to the same single rank; under ``kv`` no two ranks' loads part by
    more than the slack plus the largest request (a rank is chosen only within the slack)."""
    runs = []
    for _ in range(2):
        p = Placement(2, B, cache_blocks=12, policy=policy, max_extra_streams=slack)
        open_pins, ranks = [], []
        for docs in requests:
            if len(open_pins) == 2:
                p.release(open_pins.pop(0))
            pin = p.place([doc(n) for n in docs])
            loads = [c.open_streams for c in p.ranks]
            if policy == "kv":
                assert max(loads) - min(loads) <= slack + 4
            open_pins.append(pin)
            ranks.append(pin.rank)
        runs.append(ranks)
    assert runs[0] == runs[1]


def test_ranks_fill_each_gpu_in_order_and_share_its_memory():
    """--ranks-per-gpu (the engines backend): ranks 0..N-1 go ranks_per_gpu to a GPU, in the
    order CUDA_VISIBLE_DEVICES lists them; each takes its share of the memory utilization; a rank
    beyond the GPUs, and the option with vLLM's own data parallel, are refused with the reason."""
    from dragon_vllm.data_parallel import (DataParallelUnsupported, check_data_parallel, gpu_for_rank,
                                           memory_share)

    assert [gpu_for_rank(r, 1, ["3", "5"]) for r in range(2)] == ["3", "5"]
    assert [gpu_for_rank(r, 2, ["0"]) for r in range(2)] == ["0", "0"]
    assert [gpu_for_rank(r, 2, ["0", "1"]) for r in range(4)] == ["0", "0", "1", "1"]
    with pytest.raises(DataParallelUnsupported, match="rank 2 needs GPU 1"):
        gpu_for_rank(2, 2, ["0"])
    with pytest.raises(DataParallelUnsupported, match="rank 1 needs GPU 1"):
        gpu_for_rank(1, 1, ["0"])
    assert memory_share(0.85, 2) == 0.425 and memory_share(None, 2) == 0.45 and memory_share(0.5, 1) == 0.5
    check_data_parallel(2, "engines", 2)
    with pytest.raises(DataParallelUnsupported, match="needs --data-parallel-backend engines"):
        check_data_parallel(2, "vllm", 2)
    with pytest.raises(DataParallelUnsupported, match="must be >= 1"):
        check_data_parallel(2, "engines", 0)


def test_serve_refuses_ranks_per_gpu_without_the_engines_backend():
    from typer.testing import CliRunner

    from dragon_vllm.cli import app

    result = CliRunner().invoke(app, ["serve", "--port", "0", "--data-parallel-size", "2", "--ranks-per-gpu", "2"])
    words = " ".join(result.output.replace("│", " ").split())
    assert result.exit_code == 2 and "needs --data-parallel-backend engines" in words, result.output
