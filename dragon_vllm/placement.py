"""Which data-parallel rank serves a request, chosen once and held for the request's lifetime.

A DRAGON request's k document streams must decode on one engine (they advance in the same step),
and every later chunk of theirs must reach that engine (its KV holds the whole answer). So a
request is placed once, when its group opens; the ``Pin`` it gets names the rank until it is
released (the group's close: finish, cancel, disconnect and error all go through it).

Policies:

* ``kv`` (the default): the rank whose prefix cache probably holds most of the request's leading
  document blocks (``kv_blocks``, estimated by a per-rank ``BlockLedger``; the leading blocks
  where prompts over different documents have not parted yet, the system turn, are not
  counted), among the ranks whose
  open streams are within ``max_extra_streams`` of the least loaded one (a hot document must not
  pile every request on one rank); without any overlap, the least loaded rank.
* ``least_loaded``: fewest open streams.
* ``round_robin``: the next live rank in turn (the baseline the benchmark compares against).

Ties go to the lower rank, so a placement is a pure function of the history. A dead rank
(``mark_dead``) gets no new request; the pins already on it stay until their groups close.

Pure logic: no engine import, no I/O, no clock.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Sequence

from dragon_core.errors import DragonError
from dragon_vllm.block_ledger import BlockLedger
from dragon_vllm.kv_blocks import BlockKey, request_block_keys

POLICIES = ("kv", "least_loaded", "round_robin")
DEFAULT_MAX_EXTRA_STREAMS = 32
# blocks keyed per prompt: enough for any document (a 1,024-token passage is 32 blocks of 32)
DEFAULT_MAX_KEY_BLOCKS = 64
_PARTING = object()  # a block followed by different blocks in different prompts


class NoLiveRank(DragonError, RuntimeError):
    """Every data-parallel rank is lost: the cloud cannot open a request."""

    code = "no_live_rank"


@dataclass
class Pin:
    """A request's place: its rank and the streams it holds there, until released."""

    rank: int
    streams: int
    overlap_blocks: int  # document blocks (past the shared prefix) the rank was estimated to hold
    released: bool = False


@dataclass
class RankCounters:
    alive: bool = True
    open_requests: int = 0
    open_streams: int = 0
    placed: int = 0  # requests placed on the rank, since start
    placed_by_overlap: int = 0  # of them, placed there for their cached document blocks
    prompt_blocks: int = 0  # full blocks of the placed prompts
    estimated_hit_blocks: int = 0  # of them, estimated held by the rank's prefix cache
    lost_requests: int = 0  # requests open on the rank when it was lost

    def as_dict(self) -> dict:
        return dict(alive=self.alive, open_requests=self.open_requests, open_streams=self.open_streams,
                    placed=self.placed, placed_by_overlap=self.placed_by_overlap,
                    prompt_blocks=self.prompt_blocks, estimated_hit_blocks=self.estimated_hit_blocks,
                    estimated_hit_rate=self.estimated_hit_blocks / self.prompt_blocks if self.prompt_blocks else 0.0,
                    lost_requests=self.lost_requests)


@dataclass
class Placement:
    num_ranks: int
    block_size: int
    cache_blocks: int  # KV blocks of one rank's cache (the ledger's capacity)
    policy: str = "kv"
    max_extra_streams: int = DEFAULT_MAX_EXTRA_STREAMS
    max_key_blocks: int = DEFAULT_MAX_KEY_BLOCKS
    ranks: list[RankCounters] = field(init=False)
    _ledgers: list[BlockLedger] = field(init=False)
    _next_round_robin: int = field(init=False, default=0)
    _next_block: OrderedDict = field(init=False)  # block key -> the key that follows it, or _PARTING

    def __post_init__(self) -> None:
        if self.num_ranks <= 0:
            raise ValueError(f"num_ranks must be positive, got {self.num_ranks}")
        if self.policy not in POLICIES:
            raise ValueError(f"policy must be one of {', '.join(POLICIES)}, not {self.policy!r}")
        if self.max_extra_streams < 0:
            raise ValueError("max_extra_streams must be >= 0")
        self.ranks = [RankCounters() for _ in range(self.num_ranks)]
        self._ledgers = [BlockLedger(self.cache_blocks) for _ in range(self.num_ranks)]
        self._next_block = OrderedDict()
        self._max_followed = 2 * self.num_ranks * self.cache_blocks  # bounded: the blocks the ranks can hold, twice

    # ------------------------------------------------------------------ placing
    def place(self, prompts: Sequence[Sequence[int]]) -> Pin:
        """Choose a live rank for a request's prompts and pin it there (``NoLiveRank``: none left)."""
        keys = request_block_keys(prompts, self.block_size, self.max_key_blocks)
        return self.place_keys(keys)

    def place_keys(self, keys: Sequence[Sequence[BlockKey]]) -> Pin:
        """``place`` for prompts already keyed (``kv_blocks.request_block_keys``)."""
        live = self.live_ranks()
        if not live:
            raise NoLiveRank(f"all {self.num_ranks} data-parallel ranks are lost")
        self._learn_partings(keys)
        overlaps = self.overlaps(keys)
        rank = self._choose(live, overlaps)
        pin = Pin(rank, len(keys), overlaps[rank])
        self._take(pin, keys, hit_blocks=sum(self._ledgers[rank].leading_hits(k) for k in keys))
        return pin

    def overlaps(self, keys: Sequence[Sequence[BlockKey]]) -> dict[int, int]:
        """Per live rank: the request's *document* blocks its cache is estimated to hold (each
        prompt's leading run of held blocks, less its generic head, ``_generic_head``)."""
        heads = [self._generic_head(k) for k in keys]
        return {r: sum(max(0, self._ledgers[r].leading_hits(k) - h) for k, h in zip(keys, heads))
                for r in self.live_ranks()}

    def _learn_partings(self, keys: Sequence[Sequence[BlockKey]]) -> None:
        """Note which block follows which. A block followed by two different blocks is where
        prompts over different documents part: the system turn (and its padding) every prompt
        starts with. Every rank soon holds those blocks, so they say nothing of where a request's
        documents are, and counting them would draw every request to the first rank that served."""
        for k in keys:
            for block, after in zip(k, k[1:]):
                seen = self._next_block.get(block)
                if seen is None:
                    self._next_block[block] = after
                elif seen != after:
                    self._next_block[block] = _PARTING
                self._next_block.move_to_end(block)
        while len(self._next_block) > self._max_followed:
            self._next_block.popitem(last=False)

    def _generic_head(self, keys: Sequence[BlockKey]) -> int:
        """Blocks up to and with the first one where prompts part (0: none known)."""
        for i, key in enumerate(keys):
            if self._next_block.get(key) is _PARTING:
                return i + 1
        return 0

    def _choose(self, live: list[int], overlaps: dict[int, int]) -> int:
        load = {r: self.ranks[r].open_streams for r in live}
        if self.policy == "round_robin":
            return self._round_robin(live)
        if self.policy == "least_loaded":
            return min(live, key=lambda r: (load[r], r))
        least = min(load.values())
        eligible = [r for r in live if load[r] <= least + self.max_extra_streams]
        return min(eligible, key=lambda r: (-overlaps[r], load[r], r))

    def _round_robin(self, live: list[int]) -> int:
        # the first live rank at or after the cursor, so a lost rank is skipped, not waited for
        rank = min(live, key=lambda r: (r - self._next_round_robin) % self.num_ranks)
        self._next_round_robin = (rank + 1) % self.num_ranks
        return rank

    def _take(self, pin: Pin, keys: Sequence[Sequence[BlockKey]], hit_blocks: int) -> None:
        counters = self.ranks[pin.rank]
        counters.open_requests += 1
        counters.open_streams += pin.streams
        counters.placed += 1
        counters.placed_by_overlap += int(pin.overlap_blocks > 0)
        counters.prompt_blocks += sum(len(k) for k in keys)
        counters.estimated_hit_blocks += hit_blocks
        self._ledgers[pin.rank].record(keys)

    # ------------------------------------------------------------------ releasing
    def release(self, pin: Pin) -> None:
        """The request is over (however it ended): its streams leave the rank's load. Idempotent."""
        if pin.released:
            return
        pin.released = True
        counters = self.ranks[pin.rank]
        counters.open_requests -= 1
        counters.open_streams -= pin.streams

    # ------------------------------------------------------------------ lost ranks
    def mark_dead(self, rank: int) -> bool:
        """The rank is lost: no new request goes there, and its cache is gone. True the first time."""
        counters = self.ranks[rank]
        if not counters.alive:
            return False
        counters.alive = False
        counters.lost_requests += counters.open_requests
        self._ledgers[rank].clear()
        return True

    def live_ranks(self) -> list[int]:
        return [r for r, c in enumerate(self.ranks) if c.alive]

    # ------------------------------------------------------------------ reading
    def stats(self) -> list[dict]:
        return [c.as_dict() for c in self.ranks]

    def estimated_hit_rate(self) -> float:
        """Prompt blocks estimated served from the ranks' prefix caches, over all placements."""
        blocks = sum(c.prompt_blocks for c in self.ranks)
        return sum(c.estimated_hit_blocks for c in self.ranks) / blocks if blocks else 0.0
