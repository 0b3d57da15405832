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
    """A ``StreamGroup`` whose prompts are prefilled only when it is first used.

    Cloud-only answers hold the device's private prompts ready for a degraded finish; while the
    cloud is there the session never touches the streams, so nothing is computed.
    """

    def __init__(self, engine: Engine, prompts: Sequence[Sequence[int]], temperature: float) -> None:
        self._engine, self._prompts, self._temperature = engine, [list(p) for p in prompts], temperature
        self._group: StreamGroup | None = None

    @property
    def opened(self) -> bool:
        return self._group is not None

    @property
    def num_streams(self) -> int:
        return len(self._prompts)

    @property
    def length(self) -> int:
        return self._group.length if self._group is not None else 0

    async def _get(self) -> StreamGroup:
        if self._group is None:
            self._group = await self._engine.open_group(self._prompts, self._temperature)
        return self._group

    async def next_dists(self) -> list[Dist]:
        return await (await self._get()).next_dists()

    async def append(self, tokens: Sequence[int]) -> None:
        await (await self._get()).append(tokens)

    async def rollback(self, length: int) -> None:
        await (await self._get()).rollback(length)

    async def close(self) -> None:
        if self._group is not None:
            await self._group.close()
