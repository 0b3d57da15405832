"""Admission control for streaming-input sessions: a fair queue in front of vLLM's slots.

Why (docs/ENGINES.md §2): a paused vLLM session keeps its model-runner slot and its KV blocks.
If more sessions are open than ``max_num_seqs``, a stream that waits for a slot never runs,
and a controller that waits for all k streams of its group before feeding any waits forever
(200+ sessions hung on the H100). So a request's k streams are admitted *together*, and only
while the open streams stay within the engine's slots and a KV-block budget. A group larger
than the whole capacity is refused at once, so no wait can be endless.

Who waits how long: waiting groups are queued per *tenant* (the device identity of the link,
``TENANT``; the OpenAI routes share the default tenant) and the tenants are served round robin,
one group each in turn, oldest group first within a tenant. So one client with a thousand queued
requests delays another client's request by at most one of its own, not by all of them. The
group at the head of the round waits until it fits and nothing overtakes it, so a large group
is never starved by a stream of small ones.
"""

from __future__ import annotations

import asyncio
from collections import deque
from contextvars import ContextVar
from dataclasses import dataclass

from dragon_core.errors import DragonError

# The tenant whose request is opening streams. Set by the link in each request's task (a task
# has its own copy of the context), read here, so the engine between them needs no new argument.
TENANT: ContextVar[str] = ContextVar("dragon_admission_tenant", default="")


class Overloaded(DragonError, ValueError):
    """A group can never be admitted (it needs more than the engine's whole capacity)."""

    code = "too_many_streams"


@dataclass(frozen=True)
class Ticket:
    slots: int
    blocks: int


_Waiter = tuple[Ticket, asyncio.Future]


class Admission:
    """Counts open streams (``slots``) and reserved KV blocks; grants them fairly across tenants."""

    def __init__(self, max_slots: int, max_blocks: int) -> None:
        if max_slots <= 0 or max_blocks <= 0:
            raise ValueError("admission capacity must be positive")
        self.max_slots, self.max_blocks = max_slots, max_blocks
        self.slots = self.blocks = 0
        # tenants with waiting groups, in round-robin order (a dict keeps insertion order)
        self._queues: dict[str, deque[_Waiter]] = {}

    @property
    def queued(self) -> int:
        return sum(len(q) for q in self._queues.values())

    def queued_by_tenant(self) -> dict[str, int]:
        return {tenant: len(q) for tenant, q in self._queues.items()}

    async def acquire(self, slots: int, blocks: int, tenant: str | None = None) -> Ticket:
        """Wait until ``slots`` streams and ``blocks`` KV blocks fit and it is this tenant's turn
        (``tenant``: default ``TENANT``'s value in the caller's context)."""
        tenant = TENANT.get() if tenant is None else tenant
        blocks = min(blocks, self.max_blocks)  # a long prompt may use the whole cache, alone
        if slots > self.max_slots:
            raise Overloaded(f"{slots} streams requested; the engine admits at most {self.max_slots}")
        ticket = Ticket(slots, blocks)
        if not self._queues and self._fits(ticket):
            self._take(ticket)
            return ticket
        fut = asyncio.get_running_loop().create_future()
        self._queues.setdefault(tenant, deque()).append((ticket, fut))
        try:
            await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():  # granted just as we were cancelled
                self.release(ticket)
            else:
                self._forget(tenant, fut)
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

    def _forget(self, tenant: str, fut: asyncio.Future) -> None:
        queue = self._queues.get(tenant)
        if queue is None:
            return
        self._queues[tenant] = kept = deque(w for w in queue if w[1] is not fut)
        if not kept:
            del self._queues[tenant]  # its place in the round goes with it

    def _wake(self) -> None:
        while self._queues:
            tenant, queue = next(iter(self._queues.items()))
            ticket, fut = queue[0]
            if fut.done():  # abandoned: drop it, the tenant keeps its turn
                queue.popleft()
                if not queue:
                    del self._queues[tenant]
                continue
            if not self._fits(ticket):
                return  # the head of the round waits until it fits; nobody overtakes it
            queue.popleft()
            self._take(ticket)
            fut.set_result(None)
            del self._queues[tenant]
            if queue:
                self._queues[tenant] = queue  # served: to the back of the round


def admission_share(admission: Admission, parts: int) -> Admission:
    """One of ``parts`` processes' share of ``admission``'s capacity (``--api-servers N``).

    Each API server process admits on its own, without seeing the others, while they all share
    one engine core: its seats (``max_num_seqs``) and its KV blocks. So each process gets 1/N of
    both (rounded down, at least one), and N processes together can never admit more than the
    engine holds, which is what keeps paused sessions from starving each other (above). The
    price: a process can refuse or queue a group while another process's share is idle."""
    if parts <= 1:
        return admission
    return Admission(max(1, admission.max_slots // parts), max(1, admission.max_blocks // parts))
