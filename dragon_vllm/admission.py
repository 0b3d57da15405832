"""Admission control for streaming-input sessions: a FIFO queue in front of vLLM's slots.

Why (ENGINES.md §2): a paused vLLM session keeps its model-runner slot and its KV blocks.
If more sessions are open than ``max_num_seqs``, a stream that waits for a slot never runs,
and a controller that waits for all k streams of its group before feeding any waits forever
(200+ sessions hung on the H100). So a request's k streams are admitted *together*, and only
while the open streams stay within the engine's slots and a KV-block budget; everyone else
waits in arrival order. A group larger than the whole capacity is refused at once, so no
wait can be endless.
"""

from __future__ import annotations

import asyncio
from collections import deque
from dataclasses import dataclass

from dragon_core.errors import DragonError


class Overloaded(DragonError, ValueError):
    """A group can never be admitted (it needs more than the engine's whole capacity)."""

    code = "too_many_streams"


@dataclass(frozen=True)
class Ticket:
    slots: int
    blocks: int


class Admission:
    """Counts open streams (``slots``) and reserved KV blocks; grants them in FIFO order."""

    def __init__(self, max_slots: int, max_blocks: int) -> None:
        if max_slots <= 0 or max_blocks <= 0:
            raise ValueError("admission capacity must be positive")
        self.max_slots, self.max_blocks = max_slots, max_blocks
        self.slots = self.blocks = 0
        self._waiters: deque[tuple[Ticket, asyncio.Future]] = deque()

    @property
    def queued(self) -> int:
        return len(self._waiters)

    async def acquire(self, slots: int, blocks: int) -> Ticket:
        """Wait until ``slots`` streams and ``blocks`` KV blocks fit; FIFO, so no starvation."""
        blocks = min(blocks, self.max_blocks)  # a long prompt may use the whole cache, alone
        if slots > self.max_slots:
            raise Overloaded(f"{slots} streams requested; the engine admits at most {self.max_slots}")
        ticket = Ticket(slots, blocks)
        if not self._waiters and self._fits(ticket):
            self._take(ticket)
            return ticket
        fut = asyncio.get_running_loop().create_future()
        self._waiters.append((ticket, fut))
        try:
            await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():  # granted just as we were cancelled
                self.release(ticket)
            else:
                self._waiters = deque(w for w in self._waiters if w[1] is not fut)
                self._wake()
            raise
        return ticket

    def release(self, ticket: Ticket) -> None:
        self.slots -= ticket.slots
        self.blocks -= ticket.blocks
        self._wake()

    def _fits(self, t: Ticket) -> bool:
        return self.slots + t.slots <= self.max_slots and self.blocks + t.blocks <= self.max_blocks

    def _take(self, t: Ticket) -> None:
        self.slots += t.slots
        self.blocks += t.blocks

    def _wake(self) -> None:
        # strictly FIFO: the head waits until it fits, later (smaller) groups do not overtake it
        while self._waiters and self._fits(self._waiters[0][0]):
            ticket, fut = self._waiters.popleft()
            if fut.done():
                continue
            self._take(ticket)
            fut.set_result(None)
