"""Public retrieval for many concurrent requests: their queries embedded together.

The retriever embeds under a lock (a fast tokenizer must not be used by two threads at once), so
one query at a time went through it: at 256 devices opening at once, each waited for every query
before it (~64 ms each on the H200 machine's CPU cores), and the link never had more than a dozen
answers decoding together. Here the queries that arrive while a batch is being embedded wait for
the next batch; one ``search_many`` (one embedding call, one faiss search, one SQLite read)
answers all of them, off the event loop.
"""

from __future__ import annotations

from typing import Protocol, Sequence

from dragon_vllm.thread_batcher import ThreadBatcher


class SearchesMany(Protocol):
    def search_many(self, queries: Sequence[str], k: int) -> list[list]: ...


class QueryBatcher:
    """``await search(query, k)``: the top-``k`` passages, searched in batches of at most
    ``max_batch`` queries (one batch in flight at a time; one search per ``k``, since a top-k is
    not always a deeper search's prefix when scores tie). The batching is ``ThreadBatcher``'s."""

    def __init__(self, index: SearchesMany, max_batch: int = 64) -> None:
        self.index = index
        self._batcher: ThreadBatcher[str, list] = ThreadBatcher(
            lambda queries, k: index.search_many(list(queries), k), max_batch=max_batch)

    async def search(self, query: str, k: int) -> list:
        return await self._batcher.call(query, k)

    @property
    def batches(self) -> int:
        return self._batcher.batches

    @property
    def queries(self) -> int:
        return self._batcher.calls
