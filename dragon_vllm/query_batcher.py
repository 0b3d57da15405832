"""Public retrieval for many concurrent requests: their queries embedded together.

The retriever embeds under a lock (a fast tokenizer must not be used by two threads at once), so
one query at a time went through it: at 256 devices opening at once, each waited for every query
before it (~64 ms each on the H200 machine's CPU cores), and the link never had more than a dozen
answers decoding together. Here the queries that arrive while a batch is being embedded wait for
the next batch; one ``search_many`` (one embedding call, one faiss search, one SQLite read)
answers all of them, off the event loop.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Protocol, Sequence


class SearchesMany(Protocol):
    def search_many(self, queries: Sequence[str], k: int) -> list[list]: ...


@dataclass
class _Query:
    text: str
    k: int
    answer: asyncio.Future = field(default_factory=lambda: asyncio.get_running_loop().create_future())


class QueryBatcher:
    """``await search(query, k)``: the top-``k`` passages, searched in batches of at most
    ``max_batch`` queries (one batch in flight at a time)."""

    def __init__(self, index: SearchesMany, max_batch: int = 64) -> None:
        self.index = index
        self.max_batch = max_batch
        self._pending: list[_Query] = []
        self._worker: asyncio.Task | None = None
        self.batches = 0
        self.queries = 0

    async def search(self, query: str, k: int) -> list:
        item = _Query(query, k)
        self._pending.append(item)
        if self._worker is None or self._worker.done():
            self._worker = asyncio.create_task(self._drain())
        return await item.answer

    async def _drain(self) -> None:
        while self._pending:
            batch, self._pending = self._pending[:self.max_batch], self._pending[self.max_batch:]
            batch = [q for q in batch if not q.answer.done()]  # a cancelled caller needs no search
            for k in sorted({q.k for q in batch}):  # one search per k: a top-k is not always a deeper search's prefix (ties)
                await self._answer([q for q in batch if q.k == k], k)

    async def _answer(self, batch: list[_Query], k: int) -> None:
        try:
            results = await asyncio.to_thread(self.index.search_many, [q.text for q in batch], k)
        except Exception as exc:  # every caller of the batch sees the retriever's error
            for q in batch:
                if not q.answer.done():
                    q.answer.set_exception(exc)
            return
        self.batches += 1
        self.queries += len(batch)
        for q, passages in zip(batch, results):
            if not q.answer.done():
                q.answer.set_result(passages)
