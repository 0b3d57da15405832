"""The cloud's public retrieval on a lookahead IVF index (issue 15, TeleRAG), in its two steps.

``open(query)`` embeds the query and opens it on the index's ``LookaheadSearcher``: the coarse
quantizer runs and the copy of its probed clusters into the cache starts, on a background
thread. ``search(opened, k)`` later scans them (the misses in host memory) and returns the
top-k passages, the same as ``PublicIndex.search`` (the searcher's results equal plain IVF
search, id for id). Both steps are batched across requests (``ThreadBatcher``), in two
pipelines: the queries that arrive while a batch is searched are embedded and opened meanwhile,
so their cluster copies overlap the scans of the requests before them (the one-step
``QueryBatcher`` embeds and searches a batch before it even looks at the next).

An opened query pins its clusters (no other request evicts them) until its search ends or it
is released. ``opened(query)`` is the way to hold one: its exit releases the pins on every path
(the search done, the request cancelled or failed; a release after a search is a no-op), and an
open whose caller was cancelled while it ran is released by the batcher when it finishes.
"""

from __future__ import annotations

import contextlib
from typing import AsyncIterator, Sequence

from dragon_core.passage import Passage
from dragon_vllm.corpus.errors import LookaheadSpent
from dragon_vllm.corpus.index import OpenedQuery, PublicIndex
from dragon_vllm.thread_batcher import ThreadBatcher


class LookaheadRetriever:
    def __init__(self, index: PublicIndex, max_batch: int = 64) -> None:
        if index.lookahead is None:
            raise ValueError("LookaheadRetriever needs an index loaded with lookahead=True")
        self.index = index
        self._opens: ThreadBatcher[str, OpenedQuery] = ThreadBatcher(
            self._open_batch, abandoned=index.release, max_batch=max_batch)
        # an abandoned search holds nothing: its pins went when the scan ended
        self._searches: ThreadBatcher[OpenedQuery, list[Passage] | None] = ThreadBatcher(
            self._search_batch, max_batch=max_batch)

    @contextlib.asynccontextmanager
    async def opened(self, query: str) -> AsyncIterator[OpenedQuery]:
        """The query, opened (its clusters copying); released when the block ends, however it ends."""
        handle = await self._opens.call(query)
        try:
            yield handle
        finally:
            self.index.release(handle)  # a no-op after its search began (the search unpins)

    async def search(self, handle: OpenedQuery, k: int) -> list[Passage]:
        """The top-``k`` passages of an opened query (once per handle)."""
        found = await self._searches.call(handle, k)
        if found is None:
            raise LookaheadSpent("this query was searched or released already")
        return found

    def _open_batch(self, queries: Sequence[str], _key) -> list[OpenedQuery]:
        return self.index.open_queries(queries)

    def _search_batch(self, handles: Sequence[OpenedQuery], k: int) -> list[list[Passage] | None]:
        return self.index.search_opened(handles, k)

    def stats(self) -> dict:
        return {"open_batches": self._opens.batches, "opened": self._opens.calls,
                "search_batches": self._searches.batches, "searched": self._searches.calls}
