"""The cloud engine over several data-parallel ranks: each request placed once, then pinned.

``RankedEngine`` is a ``dragon_core.engine.Engine`` like ``VllmEngine``, over one ``VllmEngine``
per rank (``dragon_vllm.data_parallel`` builds them: views of one vLLM data-parallel ``AsyncLLM``,
or independent engines). Opening a group asks ``Placement`` for a rank, then opens the group on
that rank's engine, whose admission and gang scheduling are the rank's own; every chunk of the
group's streams then goes through that engine, i.e. to that rank, for the group's whole life.

The pin is released when the group closes, the one call every path of a request ends with
(finish, cancel, disconnect, error: the link and the API close their group in ``finally``), or at
once when the opening itself fails or is cancelled.

A lost rank: a group call that fails while its rank's engine is dead raises ``RankLost`` (the
link sends it to the device as a typed Error; the device finishes the answer degraded, as when
the cloud goes away), and the placement marks the rank dead so no new request goes there.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Awaitable, Callable, Sequence

from dragon_core.errors import DragonError
from dragon_vllm.placement import Pin, Placement

log = logging.getLogger("dragon.placement")

# the group calls that reach the engine: a failure there may be the rank's loss
_ENGINE_CALLS = frozenset({"next_dists", "advance", "append", "rollback", "next_side_dist"})
# counters summed over the ranks (VllmEngine.stats()); the gauges are summed too
_SUMMED = ("groups", "reopens", "prompt_tokens", "cached_tokens", "chunks", "repairs", "rewinds",
           "open_streams", "queued_groups", "reserved_blocks")


class RankLost(DragonError, RuntimeError):
    """The data-parallel rank a request was pinned to is lost; the request cannot go on there."""

    code = "cloud_rank_lost"


class RankedEngine:
    def __init__(self, ranks: Sequence, placement: Placement,
                 close_shared: Callable[[], Awaitable[None]] | None = None) -> None:
        if len(ranks) != placement.num_ranks:
            raise ValueError(f"{len(ranks)} rank engines for a placement over {placement.num_ranks}")
        self.ranks = list(ranks)
        self.placement = placement
        self._close_shared = close_shared  # vLLM's own data parallel: the one AsyncLLM behind the views
        first = self.ranks[0]
        # what the cloud reads from an engine; the same on every rank (one model, one configuration)
        self.logprobs_k, self.mixing, self.chunk_tokens = first.logprobs_k, first.mixing, first.chunk_tokens
        self.block_size, self.max_model_len, self.rollback = first.block_size, first.max_model_len, first.rollback

    @property
    def vocab_size(self) -> int:
        return self.ranks[0].vocab_size

    @property
    def top_k(self) -> int:
        return self.logprobs_k

    @property
    def data_parallel_size(self) -> int:
        return len(self.ranks)

    async def open_group(self, prompts: Sequence[Sequence[int]], temperature: float = 1.0,
                         scores: Sequence[float] | None = None, max_tokens: int | None = None,
                         doc_top_k: int | None = None) -> "PinnedGroup":
        """Place the request, then open its k streams on that rank (``NoLiveRank``: none left)."""
        self.check_ranks()
        pin = self.placement.place(prompts)
        try:
            group = await self.ranks[pin.rank].open_group(prompts, temperature, scores, max_tokens, doc_top_k)
        except BaseException as exc:  # cancelled while queued for admission included: no pin outlives it
            self.placement.release(pin)
            if isinstance(exc, Exception) and self.rank_lost(pin.rank):
                raise RankLost(f"data-parallel rank {pin.rank} was lost while the request opened") from exc
            raise
        return PinnedGroup(group, pin, self)

    # ------------------------------------------------------------------ lost ranks
    def check_ranks(self) -> None:
        """Mark dead every rank whose engine is gone (before a placement, so it avoids them)."""
        for rank in self.placement.live_ranks():
            self.rank_lost(rank)

    def rank_lost(self, rank: int) -> bool:
        """Is the rank's engine dead? The first time it is found so, the placement stops using it."""
        if rank_engine_alive(self.ranks[rank]):
            return False
        if self.placement.mark_dead(rank):
            log.error("data-parallel rank %d lost: %d request(s) on it end degraded; new requests avoid it",
                      rank, self.placement.ranks[rank].open_requests)
        return True

    # ------------------------------------------------------------------ reading, closing
    def stats(self) -> dict:
        per_rank = [r.stats() for r in self.ranks]
        out = {name: sum(s.get(name, 0) for s in per_rank) for name in _SUMMED}
        out["kv_blocks_capacity"] = sum(r.admission.max_blocks for r in self.ranks)
        out["max_streams"] = sum(r.admission.max_slots for r in self.ranks)
        out["data_parallel_size"] = len(self.ranks)
        placement = self.placement.stats()
        out["ranks"] = [dict(rank=i, **placement[i], **_measured_hits(per_rank[i]),
                             queued_groups=per_rank[i].get("queued_groups", 0))
                        for i in range(len(self.ranks))]
        return out

    async def close(self) -> None:
        for rank in self.ranks:
            if rank.llm is not None:
                await rank.close()
        if self._close_shared is not None:
            close, self._close_shared = self._close_shared, None
            await close()

    def _unpin(self, pin: Pin) -> None:
        self.placement.release(pin)


class PinnedGroup:
    """A request's group on its rank: the group itself for the caller, plus the pin it releases
    on close. Everything else is the inner group's (so the ``StreamGroup`` / ``MixingStreamGroup``
    protocols hold exactly when they hold for the inner group)."""

    def __init__(self, inner, pin: Pin, owner: RankedEngine) -> None:
        self._inner, self._pin, self._owner = inner, pin, owner

    @property
    def rank(self) -> int:
        return self._pin.rank

    def __getattr__(self, name: str):
        value = getattr(self._inner, name)
        return self._guarded(name, value) if name in _ENGINE_CALLS else value

    def _guarded(self, name: str, method):
        async def call(*args, **kwargs):
            try:
                return await method(*args, **kwargs)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if self._owner.rank_lost(self._pin.rank):
                    raise RankLost(f"data-parallel rank {self._pin.rank} was lost during {name}") from exc
                raise

        return call

    async def close(self) -> None:
        try:
            await self._inner.close()
        finally:
            self._owner._unpin(self._pin)


def rank_engine_alive(engine) -> bool:
    """A rank's engine is alive while its vLLM client is open and not errored (a dead engine core
    process sets vLLM's ``engine_dead``; on vLLM's own data parallel that takes every rank)."""
    llm = getattr(engine, "llm", None)
    if llm is None:
        return False
    return not bool(getattr(llm, "errored", False))


def _measured_hits(stats: dict) -> dict:
    """What vLLM itself reported: prompt tokens of the rank's streams and those it served from
    its prefix cache (``num_cached_tokens``)."""
    prompt, cached = stats.get("prompt_tokens", 0), stats.get("cached_tokens", 0)
    return dict(prompt_tokens=prompt, cached_tokens=cached, hit_rate=cached / prompt if prompt else 0.0)
