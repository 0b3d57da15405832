"""A session's documents across retrieval boundaries (issue 16): iterative retrieval and RaLMSpec.

The driver asks, before each step it computes, which documents that step uses
(``dragon_core.iterative``: those retrieved for the answer's prefix at the step's boundary). When
they are not the streams' current ones, the streams are swapped: a new group over the new
documents, the answer so far appended to it, the old group closed.

With a source that speculates (RaLMSpec), a boundary not retrieved for real yet decodes at once
over documents from the request's cache, while the real retrieval runs beside; the steps over
them are marked ``speculated`` (the session holds their drafts), and when the real retrieval
comes back the session hears ``RetrievalChecked``: right, the drafts go; wrong, they are dropped
and the next step swaps the real documents in. Exactness never depends on the cache.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol, Sequence

from dragon_core import iterative
from dragon_core import session as s
from dragon_core.engine import StreamGroup, keeps_streams


@dataclass(frozen=True)
class Documents:
    """One retrieval's top-k: ids and scores in rank order (what the mixture depends on), and
    whatever the source needs to open streams over them (their text)."""

    ids: tuple[int, ...]
    scores: tuple[float, ...]
    payload: Any = field(default=None, compare=False)

    def same(self, other: "Documents") -> bool:
        """The same mixture: the same ids in the same order with bitwise the same scores."""
        return self.ids == other.ids and self.scores == other.scores


class DocumentSource(Protocol):
    async def retrieve(self, prefix: Sequence[int]) -> Documents:
        """The real retrieval for a boundary's answer prefix."""

    async def speculate(self, prefix: Sequence[int]) -> Documents | None:
        """RaLMSpec: documents from the request's cache (None: no speculation)."""

    async def open(self, docs: Documents) -> StreamGroup:
        """A group over the documents' prompts (no generated tokens yet)."""


@dataclass
class DocumentStats:
    retrievals: int = 0  # real retrievals (the first one, at the open, is not counted)
    swaps: int = 0  # stream groups replaced (the same documents in the same order keep theirs)
    speculated: int = 0  # boundaries decoded over cached documents first
    speculated_right: int = 0
    speculated_wrong: int = 0
    waited_s: float = 0.0  # time the streams waited for documents (the critical path's retrieval time)


class IterativeDocuments:
    """Which documents each step uses, for one session's driver (see the module docstring)."""

    def __init__(self, source: DocumentSource, every: int, feed: Callable[[s.Event], None],
                 initial: Documents | None = None) -> None:
        """``initial``: the documents the first group was opened over (None: unknown, the first
        boundary then reopens whatever it finds)."""
        self.source, self.every, self._feed = source, every, feed
        self.current: tuple[int, ...] = ()  # the boundary prefix the streams' documents belong to
        self.current_speculated = False
        self._current_docs: Documents | None = initial
        self._real: dict[tuple[int, ...], Documents] = {}  # boundary prefix -> its real retrieval
        self._checking: dict[tuple[int, ...], asyncio.Task] = {}
        self.stats = DocumentStats()

    def speculated_at(self, step: int) -> int | None:
        """For a step computed now: the boundary its documents were speculated at, while unchecked."""
        if self.current_speculated and self.current not in self._real:
            return len(self.current)
        return None

    async def swap_if_needed(self, step: int, prefix: Sequence[int], group: StreamGroup):
        """None if ``group`` and its scores serve ``step`` as they are, else ``(group, scores)``:
        the same group with the new retrieval's scores (``engine.keeps_streams``), or a new group
        over the new documents with the answer so far (``prefix``) appended, which the caller
        swaps in (closing the old one)."""
        key = tuple(prefix[: iterative.boundary(step, self.every)])
        real = self._real.get(self.current)
        wrong = self.current_speculated and real is not None and not real.same(self._current_docs)
        if key == self.current and not wrong:
            return None
        t0 = time.perf_counter()
        docs, speculated = await self._documents(key)
        self.stats.waited_s += time.perf_counter() - t0
        old = self._current_docs
        self.current, self.current_speculated, self._current_docs = key, speculated, docs
        if keeps_streams(group, old.ids if old is not None else None, docs.ids):
            return group, list(docs.scores)
        group = await self.source.open(docs)
        try:
            if prefix:
                await group.append(list(prefix))
        except BaseException:
            await group.close()
            raise
        self.stats.swaps += 1
        return group, list(docs.scores)

    async def _documents(self, key: tuple[int, ...]) -> tuple[Documents, bool]:
        real = self._real.get(key)
        if real is not None:
            return real, False
        if key and key not in self._checking:
            spec = await self.source.speculate(key)
            if spec is not None:
                self.stats.speculated += 1
                self._checking[key] = asyncio.get_running_loop().create_task(self._check(key, spec))
                return spec, True
        real = await self.source.retrieve(key)
        self.stats.retrievals += 1
        self._real[key] = real
        return real, False

    async def _check(self, key: tuple[int, ...], spec: Documents) -> None:
        """The real retrieval beside the speculation; the verdict goes to the session."""
        try:
            real = await self.source.retrieve(key)
        except Exception as exc:  # the request cannot go on without its documents
            self._feed(s.CancelRequest(f"retrieval failed: {exc!r}"))
            return
        finally:
            self._checking.pop(key, None)
        self.stats.retrievals += 1
        self._real[key] = real
        ok = real.same(spec)
        self.stats.speculated_right += int(ok)
        self.stats.speculated_wrong += int(not ok)
        self._feed(s.RetrievalChecked(key, ok))

    async def close(self) -> None:
        for task in list(self._checking.values()):
            task.cancel()
        await asyncio.gather(*self._checking.values(), return_exceptions=True)
