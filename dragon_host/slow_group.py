"""Emulated slowness, for experiments: ``slowed(group, decode_ms)``.

A slower device or cloud is a property of its streams, so it is a wrapper around any stream
group: every next-token step takes ``decode_ms`` longer. The driver, the link and the session
never hear of it; the session measures the slower draft like any other, so the scheduler
reacts to it as it would to a slow engine.
"""

from __future__ import annotations

import asyncio
from typing import Sequence

from dragon_core.dist import Dist
from dragon_core.engine import MixingStreamGroup, StreamGroup


class SlowGroup:
    def __init__(self, inner: StreamGroup, decode_ms: float) -> None:
        self.inner, self.delay_s = inner, decode_ms / 1000

    @property
    def num_streams(self) -> int:
        return self.inner.num_streams

    @property
    def length(self) -> int:
        return self.inner.length

    async def next_dists(self) -> list[Dist]:
        await asyncio.sleep(self.delay_s)
        return await self.inner.next_dists()

    async def append(self, tokens: Sequence[int]) -> None:
        await self.inner.append(tokens)

    async def rollback(self, length: int) -> None:
        await self.inner.rollback(length)

    async def close(self) -> None:
        await self.inner.close()


class SlowMixingGroup(SlowGroup):
    """The same around a group that mixes its streams itself (the cloud's in-engine path)."""

    async def next_side_dist(self, top_k: int) -> Dist:
        await asyncio.sleep(self.delay_s)
        return await self.inner.next_side_dist(top_k)


def slowed(group: StreamGroup, decode_ms: float) -> StreamGroup:
    """``group`` itself when ``decode_ms`` is 0, else the group with every step that much slower."""
    if not decode_ms:
        return group
    return (SlowMixingGroup if isinstance(group, MixingStreamGroup) else SlowGroup)(group, decode_ms)
