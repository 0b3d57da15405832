"""The asyncio adapter that runs one ``Session`` against one engine ``StreamGroup``.

This is where the protocol meets an event loop; it does no network I/O itself (the caller
supplies ``send``) and knows engines only through ``dragon_core.engine``. Both the
device and the cloud use it, so the two sides execute actions identically.

Two tasks per request: the *event* task feeds events to the session and carries out its
non-engine actions at once (send, commit, finish); the *engine* task executes engine actions
strictly in order (rollback, append, compute) so the engine's streams always match what the
session believes, while peer messages keep being processed during a long decode step.
"""

from __future__ import annotations

import asyncio
import math
import time
from dataclasses import dataclass, field
from typing import Awaitable, Callable, Sequence

import numpy as np

from dragon_core import messages as m
from dragon_core import session as s
from dragon_core.aggregate import log_mass
from dragon_core.engine import StreamGroup, side_dist
from dragon_host.documents import Documents, DocumentSource, IterativeDocuments

SendFn = Callable[[m.Message], Awaitable[None]]
CommitFn = Callable[[Sequence[int]], Awaitable[None] | None]


@dataclass
class DriverStats:
    decode_ms: list[float] = field(default_factory=list)
    commit_times: list[float] = field(default_factory=list)  # monotonic seconds, one per token
    started_at: float = field(default_factory=time.monotonic)


class SessionDriver:
    def __init__(self, session: s.Session, group: StreamGroup, scores: Sequence[float], send: SendFn,
                 on_commit: CommitFn | None = None, documents: DocumentSource | None = None,
                 first_documents: Documents | None = None) -> None:
        """A slower side, for experiments, is a slower group (``dragon_host.slow_group``).
        ``documents``: iterative retrieval (the session's ``retrieve_every``; RaLMSpec if the
        source speculates): before each step the driver swaps ``group`` for one over that step's
        documents when they changed (``dragon_host.documents``); it closes the groups it
        replaced, ``group`` is always the current one."""
        self.session = session
        self.group = group
        self.scores = np.asarray(scores, dtype=np.float64)
        every = session.config.retrieve_every if documents is not None else 0
        # a verification may batch the boundaries the held-draft window holds (dragon_core.ralmspec)
        self.documents = IterativeDocuments(documents, every, self.feed, first_documents,
                                            max_stride=math.ceil(session.config.depth / every)) if every else None
        self._prefix: list[int] = []  # the generated tokens in the group's streams
        self._send = send
        self._on_commit = on_commit
        self._events: asyncio.Queue[s.Event] = asyncio.Queue()
        self._engine_ops: asyncio.Queue[s.Action | None] = asyncio.Queue()
        self.stats = DriverStats()
        self._op_ms = 0.0
        self.finished = asyncio.Event()

    # -------------------------------------------------------------- inputs from outside
    def feed(self, event: s.Event) -> None:
        """Queue an event (peer message, RTT sample, peer lost, cancel). Never blocks."""
        self._events.put_nowait(event)

    async def run(self) -> s.Finish:
        """Decode until the session finishes; returns its ``Finish``."""
        engine_task = asyncio.create_task(self._engine_loop())
        try:
            self.feed(s.Start())
            while self.session.finished is None:
                event = await self._events.get()
                await self._apply(self.session.handle(event))
                if self.documents is not None and self.session.waiting_for_retrieval():
                    self.documents.flush()  # a batch still short of its stride must not hold the answer
            return self.session.finished
        finally:
            self._engine_ops.put_nowait(None)
            engine_task.cancel()
            await asyncio.gather(engine_task, return_exceptions=True)
            if self.documents is not None:
                await self.documents.close()
            self.finished.set()

    # -------------------------------------------------------------- actions
    async def _apply(self, actions: list[s.Action]) -> None:
        for a in actions:
            if isinstance(a, (s.Rollback, s.Append, s.ComputeDist)):
                self._engine_ops.put_nowait(a)
            elif isinstance(a, s.Send):
                await self._send(a.msg)
            elif isinstance(a, s.Commit):
                now = time.monotonic()
                self.stats.commit_times.extend(now for _ in a.tokens)
                if self._on_commit is not None:
                    res = self._on_commit(a.tokens)
                    if asyncio.iscoroutine(res):
                        await res

    async def _engine_loop(self) -> None:
        while (op := await self._engine_ops.get()) is not None:
            try:
                await self._execute(op)
            except Exception as exc:  # an engine failure ends this request, visibly
                self.feed(s.CancelRequest(f"engine error: {exc!r}"))
                raise

    async def _execute(self, op: s.Action) -> None:
        t0 = time.perf_counter()
        if isinstance(op, s.Rollback):
            await self.group.rollback(op.length)
            del self._prefix[op.length:]
        elif isinstance(op, s.Append):
            await self.group.append(op.tokens)
            self._prefix.extend(op.tokens)
        elif isinstance(op, s.ComputeDist):
            speculated = await self._documents_for(op.step) if self.documents is not None else None
            dist = await side_dist(self.group, self.scores, op.dist_top_k)  # the wire's form, as the session says
        # a draft's latency includes the rollback/append work that prepared it
        self._op_ms += (time.perf_counter() - t0) * 1000
        if isinstance(op, s.ComputeDist):
            ms, self._op_ms = self._op_ms, 0.0
            self.stats.decode_ms.append(ms)
            if self.documents is not None:
                self.documents.note_step(ms / 1000)
            log_h = log_mass(self.scores) if self.documents is not None else None  # this step's documents' mass
            self.feed(s.LocalDist(op.epoch, op.step, dist, ms, at_ms=time.monotonic() * 1000, log_h=log_h,
                                  speculated=speculated))

    async def _documents_for(self, step: int) -> int | None:
        """Swap the streams when ``step`` uses other documents than theirs (a boundary reached, a
        rollback back across one, speculated documents found wrong); returns the boundary whose
        documents are speculated and unchecked, if any."""
        swapped = await self.documents.swap_if_needed(step, self._prefix, self.group)
        if swapped is not None:  # a replaced group was closed before its successor opened
            self.group, scores = swapped
            self.scores = np.asarray(scores, dtype=np.float64)
        return self.documents.speculated_at(step)
