"""Calls from many coroutines answered in batches by one blocking function on a worker thread.

One rule for every batched step (``QueryBatcher`` is this over ``search_many``; the lookahead's
open and search are two more): the calls that arrive while a batch runs wait for
the next one, and one ``run(args, key)`` call off the event loop answers up to ``max_batch`` of
them (one run per key, in key order). A result can hold something that must be
given back (the lookahead's pinned clusters), so a result whose caller is gone (cancelled while
its batch ran, or just as the result came) goes to ``abandoned(result)`` instead of being
dropped: whatever happens to the caller, nothing it would have owned leaks.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any, Callable, Generic, Hashable, Sequence, TypeVar

A = TypeVar("A")
R = TypeVar("R")


@dataclass
class _Call(Generic[A]):
    arg: A
    key: Hashable
    answer: asyncio.Future = field(default_factory=lambda: asyncio.get_running_loop().create_future())


class ThreadBatcher(Generic[A, R]):
    """``await call(arg, key)``: ``run([args...], key)`` (blocking; one list entry per arg) answers
    a batch of calls on a thread; one batch in flight at a time."""

    def __init__(self, run: Callable[[Sequence[A], Hashable], Sequence[R]], *,
                 abandoned: Callable[[R], Any] | None = None, max_batch: int = 64) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self.run, self.abandoned, self.max_batch = run, abandoned, max_batch
        self._pending: list[_Call] = []
        self._worker: asyncio.Task | None = None
        self.batches = 0
        self.calls = 0

    async def call(self, arg: A, key: Hashable = None) -> R:
        item = _Call(arg, key)
        self._pending.append(item)
        if self._worker is None or self._worker.done():
            self._worker = asyncio.create_task(self._drain())
        try:
            return await item.answer
        except asyncio.CancelledError:
            # cancelled after the result was set but before this task resumed: the result is ours
            # to give back (when the future itself was cancelled, _deliver gives it back instead)
            if item.answer.done() and not item.answer.cancelled() and item.answer.exception() is None:
                self._give_back(item.answer.result())
            raise

    async def _drain(self) -> None:
        while self._pending:
            batch, self._pending = self._pending[: self.max_batch], self._pending[self.max_batch :]
            batch = [c for c in batch if not c.answer.done()]  # a cancelled caller needs no work
            for key in sorted({c.key for c in batch}, key=repr):
                await self._answer([c for c in batch if c.key == key], key)

    async def _answer(self, batch: list[_Call], key: Hashable) -> None:
        try:
            results = await asyncio.to_thread(self.run, [c.arg for c in batch], key)
        except Exception as exc:  # every caller of the batch sees the error
            for c in batch:
                if not c.answer.done():
                    c.answer.set_exception(exc)
            return
        self.batches += 1
        self.calls += len(batch)
        for c, result in zip(batch, results):
            self._deliver(c, result)

    def _deliver(self, c: _Call, result: R) -> None:
        if c.answer.done():  # the caller was cancelled while its batch ran
            self._give_back(result)
        else:
            c.answer.set_result(result)

    def _give_back(self, result: R) -> None:
        if self.abandoned is not None:
            self.abandoned(result)
