"""Rollback in place (``make_engine(rollback="in_place")``, opt-in; ``rewind.py``, ``gang.py``,
``drafting._PlacedRow``):

* the version gate: in place only on the vLLM versions and schedulers it was verified on
  (``rewind.VERIFIED``), refused elsewhere unless DRAGON_ALLOW_UNVERIFIED_ROLLBACK=1;
* the truncation's bookkeeping on vLLM's own KV cache manager and ``Request`` (no engine): tail
  blocks back to the pool, the kept ones still prefix-cache hits, then vLLM's own
  ``_update_request_as_session`` appends the chunk after exactly the kept tokens;
* on the real engine: greedy gang decoding with forced detours gives, position for position, the
  distributions of the reopen path and of a fresh gang on the full context, with ``reopens`` 0
  and ``rewinds`` counting the rollbacks; a rollback far back (past a KV block), and a detour
  while the rewind chunk is still in flight; six gangs rolling back in place at once; every KV
  block is back after the gangs close.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dragon_core.dist import Dist
from e2e_world import run

# bf16 logits of the same position computed by two requests (prefill vs decode kernels differ);
# the bound test_gang.py uses
NOISE_ABS, NOISE_REL = 0.05, 0.04
B = 32


# ---------------------------------------------------------------------------- the version gate
def test_in_place_is_refused_on_unverified_vllm_versions(monkeypatch):
    from dragon_vllm import rewind
    from dragon_vllm.engine import ALLOW_UNVERIFIED_ROLLBACK, UnverifiedRollback, check_rollback

    monkeypatch.setattr(rewind, "VERIFIED", (((0, 32), False),))  # the rule, whatever is verified today
    monkeypatch.delenv(ALLOW_UNVERIFIED_ROLLBACK, raising=False)
    assert check_rollback("reopen", (0, 26)) == "reopen"
    assert check_rollback("in-place", (0, 32)) == "in_place"
    assert check_rollback("in-place", (0, 32), async_scheduling=False) == "in_place"
    with pytest.raises(UnverifiedRollback, match=r"verified on vLLM 0\.32\.x \(synchronous scheduler\) only, not on vLLM 0\.26"):
        check_rollback("in_place", (0, 26))
    with pytest.raises(UnverifiedRollback, match=r"not on vLLM 0\.32 with async scheduling"):
        check_rollback("in_place", (0, 32), async_scheduling=True)
    with pytest.raises(ValueError, match="rollback must be one of"):
        check_rollback("truncate", (0, 32))
    monkeypatch.setenv(ALLOW_UNVERIFIED_ROLLBACK, "1")
    assert check_rollback("in_place", (0, 26)) == "in_place"  # deliberately unverified: a warning only


# ---------------------------------------------------------------------------- the truncation alone
def _kv(num_blocks: int = 32):
    from vllm.utils.hashing import sha256
    from vllm.v1.core.kv_cache_manager import KVCacheManager
    from vllm.v1.core.kv_cache_utils import get_request_block_hasher, init_none_hash
    from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheConfig, KVCacheGroupSpec

    spec = FullAttentionSpec(block_size=B, num_kv_heads=1, head_size=8, dtype=torch.float32)
    config = KVCacheConfig(num_blocks=num_blocks, kv_cache_tensors=[], kv_cache_groups=[KVCacheGroupSpec(["l"], spec)])
    manager = KVCacheManager(config, max_model_len=1024, scheduler_block_size=B, hash_block_size=B,
                             enable_caching=True)
    init_none_hash(sha256)
    return manager, get_request_block_hasher(B, sha256)


def _session(manager, hasher, rid: str, prompt: list[int], outputs: list[int], computed: int):
    """A streaming session as the scheduler holds it when its chunk has stopped: prompt + the
    chunk's outputs, ``computed`` tokens of KV (the last output is never computed)."""
    from vllm import SamplingParams
    from vllm.v1.request import Request

    req = Request(rid, list(prompt), SamplingParams(max_tokens=len(outputs)), None, block_hasher=hasher,
                  resumable=True)
    manager.allocate_slots(req, len(prompt) + len(outputs))
    for t in outputs:
        req.append_output_token_ids(t)
    req.num_computed_tokens = computed
    manager.cache_blocks(req, computed)
    return req


def _apply(manager, req, update):
    """vLLM's own ``_update_request_as_session`` (the code the gang scheduler calls after the rewind)."""
    from types import SimpleNamespace

    from vllm.v1.core.sched.scheduler import Scheduler

    fake = SimpleNamespace(hash_block_size=B, num_waiting_for_streaming_input=0, log_stats=False)
    Scheduler._update_request_as_session(fake, req, update)


def _update(tokens: list[int], max_tokens: int = 5):
    import time

    from vllm import SamplingParams
    from vllm.v1.request import StreamingUpdate

    return StreamingUpdate(mm_features=None, prompt_token_ids=list(tokens), max_tokens=max_tokens,
                           arrival_time=time.time(), sampling_params=SamplingParams(max_tokens=max_tokens))


def test_rewind_frees_the_tail_blocks_keeps_the_prefix_cache_and_appends_after_exactly_T():
    from dragon_vllm.rewind import rewind_session

    manager, hasher = _kv()
    scheduler = type("S", (), {"kv_cache_manager": manager})()
    stm = manager.coordinator.single_type_managers[0]
    prompt, outputs = list(range(1000, 1080)), list(range(2000, 2030))  # 80 + 30 tokens, 109 computed
    req = _session(manager, hasher, "r", prompt, outputs, 109)
    free_before = manager.block_pool.get_num_free_blocks()
    assert len(stm.req_to_blocks["r"]) == 4 and stm.num_cached_block["r"] == 3
    kept_ids = [b.block_id for b in stm.req_to_blocks["r"][:2]]

    update = _update([7, 8, 9])
    assert rewind_session(scheduler, req, update, 64) is False  # in place, no recompute
    assert [b.block_id for b in stm.req_to_blocks["r"]] == kept_ids
    assert stm.num_cached_block["r"] == 2
    assert manager.block_pool.get_num_free_blocks() == free_before + 2
    assert req.num_computed_tokens == 64 and update.prompt_token_ids == [7, 8, 9]
    assert len(req.block_hashes) == 2  # dropped by the rewind itself: vLLM 0.26's update keeps them
    _apply(manager, req, update)
    context = (prompt + outputs)[:64] + [7, 8, 9]
    assert list(req.all_token_ids) == context and list(req.prompt_token_ids) == context
    assert req.num_prompt_tokens == 67 and req.num_output_tokens == 0 and req.num_computed_tokens == 64
    assert len(req.block_hashes) == 2  # the kept blocks' hashes; the new tail block is not full

    # the freed full block (tokens 64..95) keeps its hash, which covers its own prefix: still a
    # valid prefix-cache entry for a request with that prefix
    from vllm import SamplingParams
    from vllm.v1.request import Request

    probe = Request("p", (prompt + outputs)[:100], SamplingParams(max_tokens=1), None, block_hasher=hasher)
    _, hit, *_ = manager.get_computed_blocks(probe)
    assert hit == 96


def test_the_hash_of_a_discarded_last_sample_is_dropped():
    """A chunk that stops on a sample that completes a block: that block's hash covers a token the
    session discards (vLLM keeps only computed tokens). vLLM 0.26 kept the hash; the gang scheduler
    drops it before the update, as 0.32 does."""
    from dragon_vllm.rewind import drop_stale_block_hashes

    manager, hasher = _kv()
    scheduler = type("S", (), {"kv_cache_manager": manager, "hash_block_size": B})()
    prompt, outputs = list(range(1000, 1080)), list(range(2000, 2016))  # 96 tokens: 3 full blocks
    req = _session(manager, hasher, "r", prompt, outputs, 95)  # the last sample is not computed
    assert len(req.block_hashes) == 3
    drop_stale_block_hashes(scheduler, req)
    assert len(req.block_hashes) == 2
    _apply(manager, req, _update([7]))
    context = (prompt + outputs)[:95] + [7]
    assert list(req.all_token_ids) == context
    from vllm import SamplingParams
    from vllm.v1.request import Request

    again = Request("q", context, SamplingParams(max_tokens=1), None, block_hasher=hasher)
    assert req.block_hashes == again.block_hashes  # the hashes of the tokens it holds now


def test_a_rewind_past_the_computed_tokens_recomputes_them_instead():
    """A preempted session holds no KV (num_computed_tokens 0): the rewind keeps nothing and
    prepends the tokens up to T to the chunk, so the context is still exactly T + the chunk."""
    from dragon_vllm.rewind import rewind_session

    manager, hasher = _kv()
    scheduler = type("S", (), {"kv_cache_manager": manager})()
    prompt, outputs = list(range(1000, 1080)), list(range(2000, 2010))
    req = _session(manager, hasher, "q", prompt, outputs, 89)
    manager.free(req)
    req.num_computed_tokens = 0  # what a preemption does
    free_before = manager.block_pool.get_num_free_blocks()
    update = _update([5])
    assert rewind_session(scheduler, req, update, 64) is True
    assert update.prompt_token_ids == (prompt + outputs)[:64] + [5]
    _apply(manager, req, update)
    assert list(req.all_token_ids) == (prompt + outputs)[:64] + [5] and req.num_computed_tokens == 0
    assert manager.block_pool.get_num_free_blocks() == free_before

    # computed but not up to the target: kept to the aligned computed frontier, the rest refetched
    req = _session(manager, hasher, "s", prompt, outputs, 70)
    update = _update([6])
    assert rewind_session(scheduler, req, update, 64 + 32 - 32) is False  # 64 <= 70: in place
    req2 = _session(manager, hasher, "t", prompt, outputs, 50)
    update2 = _update([6])
    assert rewind_session(scheduler, req2, update2, 64) is True
    assert req2.num_computed_tokens == 32 and update2.prompt_token_ids == (prompt + outputs)[32:64] + [6]


# ---------------------------------------------------------------------------- on the real engine
DOCS = ["Lyon is a city in France known for its food, its silk and the Festival of Lights.",
        "The Rhone and the Saone meet in Lyon, the third largest city of France.",
        "Paris is the capital of France; the Louvre is its most visited museum."]


@pytest.fixture(scope="module")
def tokenizer(smollm2):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(smollm2.tokenizer_dir()))


def _prompts(tokenizer, question: str) -> list[list[int]]:
    from dragon_core.prompt import document_prompt

    return [document_prompt(tokenizer, DOCS[i], question, block_size=B) for i in range(3)]


def _second_best(dist: Dist) -> int:
    order = np.argsort(-dist.logprobs.astype(np.float64), kind="stable")
    return int(dist.ids[order[1]])


def _assert_same(got: Dist, want: Dist, where, noise_abs: float = NOISE_ABS) -> float:
    """Same listed ids' log-probs within the bf16 bound, same argmax unless a near-tie; returns
    the largest log-prob difference."""
    lw = dict(zip(want.ids.tolist(), want.logprobs.astype(np.float64)))
    common = [(float(lp), lw[i]) for i, lp in zip(got.ids.tolist(), got.logprobs.astype(np.float64)) if i in lw]
    assert len(common) >= len(want.ids) - 2, where
    diff = max(abs(a - b) for a, b in common)
    for a, b in common:
        assert abs(a - b) <= noise_abs + NOISE_REL * abs(b), (where, a, b)
    first, second = np.sort(want.logprobs.astype(np.float64))[-2:][::-1]
    if first - second > 2 * (noise_abs + NOISE_REL * abs(first)):
        assert got.argmax() == want.argmax(), where
    return diff


async def _walk(engine, prompts, scores, n: int, every: int, tokens: list[int] | None = None):
    """Greedy, with a detour (the second most likely id) every ``every`` steps, or the given tokens."""
    group = await engine.open_group(prompts, 1.0, scores, n + 8)
    dists, path = [], []
    try:
        for step in range(n):
            dist = await group.next_side_dist(20)
            dists.append(dist)
            if tokens is not None:
                path.append(tokens[step])
            else:
                path.append(_second_best(dist) if step % every == every - 1 else dist.argmax())
            await group.append([path[-1]])
    finally:
        await group.close()
    return path, dists, group


async def _fresh(engine, prompts, scores, tokens: list[int]) -> Dist:
    group = await engine.open_group(prompts, 1.0, scores, 16)
    try:
        await group.append(tokens)
        return await group.next_side_dist(20)
    finally:
        await group.close()


@pytest.mark.slow
@pytest.mark.parametrize("chunk_tokens,every", [(0, 4), (4, 3)])
def test_in_place_equals_reopen_and_a_fresh_gang_position_for_position(e2e_loop, reference_engine, tokenizer,
                                                                       monkeypatch, chunk_tokens, every):
    """Open-ended drafting (every detour rewinds a chunk in flight) and chunks of 4 with a detour
    every 3 steps (mid-chunk, and chunks continued by feeding)."""
    monkeypatch.setattr(reference_engine, "chunk_tokens", chunk_tokens)
    prompts, scores = _prompts(tokenizer, "What is Lyon famous for?"), [0.5, 0.1, 0.0]
    n = 30

    async def check():
        monkeypatch.setattr(reference_engine, "rollback", "reopen")
        path, want, reopened = await _walk(reference_engine, prompts, scores, n, every)
        detours = sum(1 for s in range(n - 1) if s % every == every - 1)
        assert reopened.reopens >= 1
        monkeypatch.setattr(reference_engine, "rollback", "in_place")
        stats0 = dict(reference_engine.stats())
        _, got, placed = await _walk(reference_engine, prompts, scores, n, every, tokens=path)
        assert placed.in_place and placed.reopens == 0 and placed.repairs == 0
        assert placed.rewinds >= detours, (placed.rewinds, detours)
        assert reference_engine.stats()["rewinds"] - stats0["rewinds"] == placed.rewinds
        assert reference_engine.stats()["reopens"] == stats0["reopens"]
        worst = max(_assert_same(g, w, ("vs reopen", step)) for step, (g, w) in enumerate(zip(got, want)))
        assert worst < 1e-3  # the same kept blocks and the same recomputed tail: equal but for batch shapes
        # and against a fresh gang on the full context, after each of the first detours and at the end
        for step in [s + 1 for s in range(n - 1) if s % every == every - 1][:3] + [n - 1]:
            _assert_same(got[step], await _fresh(reference_engine, prompts, scores, path[:step]), ("vs fresh", step))

    run(e2e_loop, check())


@pytest.mark.slow
def test_a_rollback_past_a_block_and_a_detour_while_the_rewind_chunk_is_in_flight(e2e_loop, reference_engine,
                                                                                  tokenizer, monkeypatch):
    monkeypatch.setattr(reference_engine, "chunk_tokens", 0)
    monkeypatch.setattr(reference_engine, "rollback", "in_place")
    prompts, scores = _prompts(tokenizer, "Tell me about the rivers of Lyon?"), [0.3, 0.2, -0.4]

    async def check():
        path, _, _ = await _walk(reference_engine, prompts, scores, 40, every=10**6)  # plain greedy
        group = await reference_engine.open_group(prompts, 1.0, scores, 60)
        try:
            for t in path:
                await group.next_side_dist(20)
                await group.append([t])
            assert group.rewinds == 0
            # a rejected draft 37 tokens back: the rows keep only whole blocks below prompt + 3
            await group.rollback(3)
            detour = _second_best(await _fresh(reference_engine, prompts, scores, path[:3]))
            await group.append([detour])
            assert group.rewinds == 1 and group._rows is not None and group.reopens == 0
            # at once, while the rewind chunk is in flight (nothing read from it yet): another
            # detour, a token the engine does not draft there
            want = await _fresh(reference_engine, prompts, scores, path[:3] + [detour])
            second = _second_best(want)
            assert not group._chunk_done()
            await group.append([second])  # noticed when the chunk's first draft arrives (it is not `second`)
            got = await group.next_side_dist(20)
            assert group.rewinds == 2 and group.reopens == 0
            _assert_same(got, await _fresh(reference_engine, prompts, scores, path[:3] + [detour, second]),
                         "after two rewinds")
            t = got.argmax()
            await group.append([t])
            got = await group.next_side_dist(20)
            context = path[:3] + [detour, second, t]
            _assert_same(got, await _fresh(reference_engine, prompts, scores, context), "served from the chunk")
            assert group.repairs == 0
        finally:
            await group.close()
        # every block of every closed gang is back: vLLM resets its prefix cache only when none is in use
        assert reference_engine.stats()["reserved_blocks"] == 0
        assert await reference_engine.llm.reset_prefix_cache()

    run(e2e_loop, check())


@pytest.mark.slow
def test_many_gangs_rolling_back_in_place_at_once(e2e_loop, reference_engine, tokenizer, monkeypatch):
    """6 gangs at once, each with a detour every 3 steps, rolled back in place while the others
    step: each gang's distributions equal those of the same gang decoded alone by the reopen path
    (same tokens appended), none repaired or reopened. The bound is the batch noise: six gangs in
    one batch vs one alone move bf16 log-probs by up to 0.18 on the reopen path itself and 0.23 in
    place (measured on this engine; in place alone vs reopen alone: 0.0 for all six), so 0.3 + 4%
    here; a row fed a wrong context is off by far more."""
    monkeypatch.setattr(reference_engine, "chunk_tokens", 0)
    requests = [(_prompts(tokenizer, f"What is city number {i} famous for?"), [0.4, 0.1 * i, -0.2]) for i in range(6)]
    n, every = 12, 3

    async def check():
        import asyncio

        monkeypatch.setattr(reference_engine, "rollback", "reopen")
        alone = [await _walk(reference_engine, p, s, n, every) for p, s in requests]
        monkeypatch.setattr(reference_engine, "rollback", "in_place")
        together = await asyncio.wait_for(asyncio.gather(
            *(_walk(reference_engine, p, s, n, every, tokens=path) for (p, s), (path, _, _) in zip(requests, alone))), 600)
        for i, ((_, want, _), (_, got, group)) in enumerate(zip(alone, together)):
            assert group.reopens == 0 and group.repairs == 0 and group.rewinds >= (n - 1) // every, i
            for step, (g, w) in enumerate(zip(got, want)):
                _assert_same(g, w, (i, step), noise_abs=0.3)
        # alone, the in-place path equals the reopen path exactly
        _, got, _ = await _walk(reference_engine, *requests[2], n, every, tokens=alone[2][0])
        assert max(_assert_same(g, w, ("alone", step)) for step, (g, w) in enumerate(zip(got, alone[2][1]))) < 1e-3
        assert reference_engine.stats()["reserved_blocks"] == 0

    run(e2e_loop, check())
