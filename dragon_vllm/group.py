"""What the cloud's two kinds of stream group share (``engine.VllmStreamGroup``, per document,
and ``drafting.GangStreamGroup``, mixed inside vLLM): the lockstep books of
``dragon_core.lockstep``, the seats admission gave them, and the counters the engine reports.
"""

from __future__ import annotations

import itertools
from abc import ABC, abstractmethod
from typing import TYPE_CHECKING

from dragon_core.errors import ProtocolError
from dragon_core.lockstep import Lockstep
from dragon_vllm.admission import Ticket

if TYPE_CHECKING:
    from dragon_vllm.engine import VllmEngine


class CloudGroup(Lockstep, ABC):
    """A request's k streams on the shared engine; closing frees its vLLM requests, then its seats."""

    rollback_error = closed_error = ProtocolError  # the lengths and the calls come from the peer

    def __init__(self, engine: "VllmEngine", gid: int, prompts: list[list[int]], temperature: float,
                 ticket: Ticket) -> None:
        super().__init__(prompts)
        self._engine, self._gid, self._ticket = engine, gid, ticket
        self.temperature = temperature
        self._epoch = itertools.count()  # one per (re)opening: vLLM request ids stay unique
        self.num_cached_tokens: list[int] = [0] * len(prompts)  # of the latest (re)opening
        self.reopens = 0

    async def close(self) -> None:
        if self._mark_closed():
            try:
                await self._abort()
            finally:
                self._engine._release(self._ticket)

    @abstractmethod
    async def _abort(self) -> None:
        """End the group's vLLM requests (a later read reopens them)."""
