"""Which KV blocks a rank's prefix cache probably holds: the placement's own estimate.

vLLM evicts freed blocks least recently used first; the ledger does the same over the block keys
of the requests placed on the rank, with the rank's KV capacity in blocks. It is an estimate:
vLLM may evict earlier (blocks held by running requests are not evictable) or keep blocks the
ledger dropped. What vLLM really reused is measured apart (``num_cached_tokens`` per stream).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Iterable, Sequence

from dragon_vllm.kv_blocks import BlockKey


class BlockLedger:
    """An LRU set of block keys, at most ``capacity`` of them."""

    def __init__(self, capacity: int) -> None:
        if capacity <= 0:
            raise ValueError(f"capacity must be positive, got {capacity}")
        self.capacity = capacity
        self._keys: OrderedDict[BlockKey, None] = OrderedDict()

    def __len__(self) -> int:
        return len(self._keys)

    def __contains__(self, key: BlockKey) -> bool:
        return key in self._keys

    def leading_hits(self, keys: Sequence[BlockKey]) -> int:
        """Blocks of one prompt a prefix cache would reuse: the leading run already held (a chain
        hash: a later block cannot be reused once one before it is missing)."""
        hits = 0
        for key in keys:
            if key not in self._keys:
                break
            hits += 1
        return hits

    def record(self, prompts_keys: Iterable[Sequence[BlockKey]]) -> None:
        """The blocks of prompts just prefilled on the rank: now held, most recently used."""
        for keys in prompts_keys:
            for key in keys:
                self._keys[key] = None
                self._keys.move_to_end(key)
        while len(self._keys) > self.capacity:
            self._keys.popitem(last=False)

    def clear(self) -> None:
        self._keys.clear()
