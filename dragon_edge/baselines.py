"""The answer modes a request may choose, and the two pieces the non-DRAGON baselines need.

Modes (``AnswerOptions.mode``, ``dragon-edge ask --mode``, the SDK's ``mode=``):

* ``dragon``: DRAGON (speculative aggregation, Greedy Scheduling);
* ``vdrag``: token-wise synchronous aggregation; ``sw``: sequence-wise (DRDG/SW);
* ``cloud``: cloud-only. The cloud decodes alone over its public passages and streams its
  tokens; the device computes nothing (its streams are a ``LazyGroup``) unless the cloud is lost,
  when it finishes the answer alone from the committed tokens (flagged degraded);
* ``text``: DRCG/Text. The cloud sends its public passages' text; the device prefills them next
  to its private ones and decodes alone. Only the query goes up;
* ``concat``: DRCG with one concatenated prompt (context aggregation, the DRAGON paper's main
  baseline). As for ``text``, the cloud sends its public passages' text and only the query goes
  up; the device puts its private passages and the public ones, best score first, into **one**
  prompt cut to 256 tokens (``dragon_core.prompt.concatenated_prompt``) and decodes it alone;
* ``device``: device-only (the same as ``use_cloud=False``).
"""

from __future__ import annotations

import asyncio
from typing import Literal, Sequence, get_args

from dragon_core import messages as m
from dragon_core.dist import Dist
from dragon_core.engine import Engine, StreamGroup
from dragon_core.errors import DragonError

AnswerMode = Literal["dragon", "vdrag", "sw", "cloud", "text", "concat", "device"]
ANSWER_MODES: tuple[str, ...] = get_args(AnswerMode)


class UnknownMode(DragonError, ValueError):
    code = "unknown_mode"


def wire_mode(mode: str) -> m.Mode:
    """The ``Open.mode`` for an answer mode (``device`` never reaches the wire: it runs the
    device's session alone, which ``dragon`` describes; ``concat`` asks the cloud for what
    ``text`` does, its passages); ``UnknownMode`` names the choices."""
    if mode not in ANSWER_MODES:
        raise UnknownMode(f"unknown mode {mode!r}; choose one of: {' | '.join(ANSWER_MODES)}")
    return {"device": "dragon", "concat": "text"}.get(mode, mode)  # type: ignore[return-value]


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
