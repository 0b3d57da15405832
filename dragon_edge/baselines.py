"""The stream group the device's answers start with: ``LazyGroup``.

What each answer mode does is ``dragon_core.modes``' table (re-exported here for the callers
that import the mode names from the device package).
"""

from __future__ import annotations

import asyncio
from typing import Sequence

from dragon_core.dist import Dist
from dragon_core.engine import Engine, StreamGroup
from dragon_core.modes import ANSWER_MODES, AnswerMode, UnknownMode, wire_mode

__all__ = ["ANSWER_MODES", "AnswerMode", "LazyGroup", "UnknownMode", "wire_mode"]


class LazyGroup:
    """A ``StreamGroup`` whose prompts are prefilled when it is first used, or, with
    ``prefill_now=True``, in the background from its creation on.

    Cloud-only answers hold the device's private prompts ready for a degraded finish; while the
    cloud is there the session never touches the streams, so nothing is computed. DRAGON answers
    start the prefill at once and send the cloud its ``Open`` meanwhile (issue 13): the cloud's
    retrieval, prefill and first draft then overlap the device's prefill instead of following it,
    which at RTT 300 ms was most of the TTFT over device-only.
    """

    def __init__(self, engine: Engine, prompts: Sequence[Sequence[int]], temperature: float,
                 *, prefill_now: bool = False) -> None:
        self._engine, self._prompts, self._temperature = engine, [list(p) for p in prompts], temperature
        self._opening: asyncio.Future[StreamGroup] | None = None
        if prefill_now:
            self._opening = asyncio.ensure_future(engine.open_group(self._prompts, temperature))

    async def started(self) -> "LazyGroup":
        """Yield once so a background prefill checks its prompts; a bad prompt raises here,
        before anything has gone on the wire (the engines check before they compute)."""
        await asyncio.sleep(0)
        if self._opening is not None and self._opening.done():
            self._opening.result()
        return self

    @property
    def opened(self) -> bool:
        return self._opening is not None and self._opening.done() and not self._opening.cancelled() \
            and self._opening.exception() is None

    @property
    def num_streams(self) -> int:
        return len(self._prompts)

    @property
    def length(self) -> int:
        return self._opening.result().length if self.opened else 0

    async def _get(self) -> StreamGroup:
        if self._opening is None:
            self._opening = asyncio.ensure_future(self._engine.open_group(self._prompts, self._temperature))
        return await asyncio.shield(self._opening)  # a cancelled caller must not cancel a shared prefill

    async def next_dists(self) -> list[Dist]:
        return await (await self._get()).next_dists()

    async def append(self, tokens: Sequence[int]) -> None:
        await (await self._get()).append(tokens)

    async def rollback(self, length: int) -> None:
        await (await self._get()).rollback(length)

    async def close(self) -> None:
        """Close the streams; a prefill still running is waited for (its KV must be freed, and
        an engine worker thread cannot be interrupted), a failed one is not raised again."""
        if self._opening is None:
            return
        await asyncio.gather(self._opening, return_exceptions=True)
        if self.opened:
            await self._opening.result().close()
