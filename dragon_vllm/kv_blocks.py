"""The prefix-cache identity of a prompt: one chained hash per *full* KV block, as vLLM keys them.

vLLM's prefix cache reuses a block only if every token before it matches too: a block's key is
the hash of (the previous block's key, the block's token ids). So a prompt's reusable prefix on a
rank is the leading run of its block keys that the rank already holds, and a key equal on two
prompts means the same tokens from position 0 to that block's end.

DRAGON's prompt layout (``dragon_core.prompt``) pads ``[system prefix][document]`` to a block
boundary and depends on the document alone, so the first blocks of a document stream carry the
same keys for every user and question over that document: they are what placement matches on.
The blocks over the query are keyed too; they match only when the question repeats.

Pure functions, no engine import. The hash is Python's tuple hash (deterministic for ints, no
per-process seed), not vLLM's own (sha256 of pickled ids): placement only compares keys made here.
"""

from __future__ import annotations

from typing import Sequence

BlockKey = int


def block_keys(prompt: Sequence[int], block_size: int, max_blocks: int | None = None) -> tuple[BlockKey, ...]:
    """Chained keys of the prompt's full blocks (a partial tail block is never cached whole, so it
    is not keyed), at most ``max_blocks`` of them (the leading ones)."""
    if block_size <= 0:
        raise ValueError(f"block_size must be positive, got {block_size}")
    full = len(prompt) // block_size
    if max_blocks is not None:
        full = min(full, max_blocks)
    keys: list[BlockKey] = []
    previous: BlockKey = 0
    for b in range(full):
        previous = hash((previous, tuple(int(t) for t in prompt[b * block_size:(b + 1) * block_size])))
        keys.append(previous)
    return tuple(keys)


def request_block_keys(prompts: Sequence[Sequence[int]], block_size: int,
                       max_blocks: int | None = None) -> tuple[tuple[BlockKey, ...], ...]:
    """``block_keys`` of each of a request's k document prompts."""
    return tuple(block_keys(p, block_size, max_blocks) for p in prompts)
