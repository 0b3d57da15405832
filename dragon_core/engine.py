"""The engine interface both sides implement: "k document streams of one request".

This module declares the shape (typing Protocols) and the one rule that reads a side's
distribution from either kind of group (``side_dist``); it imports no engine. The device
(llama.cpp, transformers) and the cloud (vLLM streaming-input sessions) implement it, and the
drivers that execute a session's actions call only these methods, so the session code does not
care which engine it drives.

Stream semantics: stream ``i`` holds ``prompt_i + generated`` where ``generated`` is the same
token list for all streams of the group (lockstep). ``length`` counts generated tokens only.
"""

from __future__ import annotations

from typing import Protocol, Sequence, runtime_checkable


from dragon_core.aggregate import canonical_side_dist
from dragon_core.dist import Dist


@runtime_checkable
class StreamGroup(Protocol):
    """The k per-document streams of one request, advanced together."""

    @property
    def num_streams(self) -> int: ...

    @property
    def length(self) -> int:
        """Number of generated tokens currently appended to every stream."""
        ...

    async def next_dists(self) -> list[Dist]:
        """Each stream's next-token distribution at temperature T (full vector where the engine
        can, top-K otherwise), for the position after the current ``length`` tokens."""
        ...

    async def append(self, tokens: Sequence[int]) -> None:
        """Append the same tokens to every stream."""
        ...

    async def rollback(self, length: int) -> None:
        """Truncate every stream to ``length`` generated tokens (exactly, no drift)."""
        ...

    async def close(self) -> None: ...


@runtime_checkable
class MixingStreamGroup(StreamGroup, Protocol):
    """A group whose engine mixes its k streams itself (the cloud's in-engine path): it returns
    the side's canonical mixture (``dragon_core.aggregate.canonical_side_dist`` of what the
    engine mixed) instead of per-document distributions. Opened with the retrieval scores."""

    async def next_side_dist(self, top_k: int) -> Dist:
        """The side's canonical distribution after the current ``length`` tokens, in the
        session's top-K form (0: full)."""
        ...


def keeps_streams(group: StreamGroup, old_ids: Sequence[int] | None, new_ids: Sequence[int]) -> bool:
    """Iterative retrieval's one rule for a boundary (both the driver and the reference use it):
    the streams stay, with the new retrieval's scores, when it found the same documents in the
    same order and the group mixes in Python (``side_dist`` reads the scores every step). A group
    that mixes in the engine was opened with its scores: it is reopened (vLLM's prefix cache makes
    that cheap); so are other documents. Keeping saves the re-prefill (the answer so far, again,
    after each document), the cost that dominates a boundary on a CPU engine."""
    return old_ids is not None and tuple(old_ids) == tuple(new_ids) and not isinstance(group, MixingStreamGroup)


async def side_dist(group: StreamGroup, scores, top_k: int) -> Dist:
    """The side's canonical distribution from either kind of group: the one rule both the
    session driver and the centralized reference use."""
    if isinstance(group, MixingStreamGroup):
        return await group.next_side_dist(top_k)
    return canonical_side_dist(await group.next_dists(), scores, top_k)


@runtime_checkable
class Engine(Protocol):
    """Opens stream groups on one model."""

    @property
    def vocab_size(self) -> int: ...

    async def open_group(self, prompts: Sequence[Sequence[int]], temperature: float = 1.0) -> StreamGroup:
        """Start one stream per prompt (token ids, already laid out by ``dragon_core.prompt``)."""
        ...

    async def close(self) -> None: ...
