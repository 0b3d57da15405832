"""A session's documents across retrieval boundaries (issue 16): iterative retrieval and RaLMSpec.

The driver asks, before each step it computes, which documents that step uses
(``dragon_core.iterative``: those retrieved for the answer's prefix at the step's boundary). When
they are not the streams' current ones, the streams are swapped: a new group over the new
documents, the answer so far appended to it, the old group closed.

With a source that speculates (RaLMSpec), a boundary not retrieved for real yet decodes at once
over documents from the request's cache; the steps over them are marked ``speculated`` (the
session holds their drafts), and when the real retrieval comes back the session hears
``RetrievalChecked``: right, the drafts go; wrong, they are dropped and the next step swaps the
real documents in. Exactness never depends on the cache.

Verification is batched (RaLMSpec's OS³): speculated boundaries wait until there are ``s`` of
them (``ralmspec.StridePolicy.should_verify``: ``s`` from the measured step and verification
costs and the speculation accuracy; optionally also whenever no verification runs), then one
batched real retrieval (``DocumentSource.retrieve_many`` when the source has it) verifies them
all, beside the decoding. The driver calls ``flush`` whenever the
session cannot go on without a verdict, so a batch never waits for boundaries that cannot come.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol, Sequence

from dragon_core import iterative
from dragon_core import session as s
from dragon_core.engine import StreamGroup, keeps_streams
from dragon_core.ralmspec import MAX_STRIDE, StridePolicy


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

    # optional: ``async def retrieve_many(prefixes) -> list[Documents]``, the real retrievals of
    # several boundaries in one batch (RaLMSpec's batched verification); else one by one


@dataclass
class DocumentStats:
    retrievals: int = 0  # real retrievals (the first one, at the open, is not counted)
    swaps: int = 0  # stream groups replaced (the same documents in the same order keep theirs)
    speculated: int = 0  # boundaries decoded over cached documents first
    speculated_right: int = 0
    speculated_wrong: int = 0
    waited_s: float = 0.0  # time the streams waited for documents (the critical path's retrieval time)
    verifications: int = 0  # batched real retrievals that verified speculations
    largest_batch: int = 0  # the most speculations one of them verified


class IterativeDocuments:
    """Which documents each step uses, for one session's driver (see the module docstring)."""

    def __init__(self, source: DocumentSource, every: int, feed: Callable[[s.Event], None],
                 initial: Documents | None = None, max_stride: int = MAX_STRIDE) -> None:
        """``initial``: the documents the first group was opened over (None: unknown, the first
        boundary then reopens whatever it finds). ``max_stride``: the most speculations one
        verification may batch (the boundaries the session's draft window can hold)."""
        self.source, self.every, self._feed = source, every, feed
        self.current: tuple[int, ...] = ()  # the boundary prefix the streams' documents belong to
        self.current_speculated = False
        self._current_docs: Documents | None = initial
        self._real: dict[tuple[int, ...], Documents] = {}  # boundary prefix -> its real retrieval
        self._pending: dict[tuple[int, ...], Documents] = {}  # speculated, their verification not started
        self._checking: dict[tuple[int, ...], asyncio.Task] = {}  # speculated, being verified
        self.policy = StridePolicy(max_stride=max(1, max_stride))  # OS³
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
        swaps in (the old one is closed here, before the new one opens)."""
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
        # the old streams go first: their KV is what the new group can reuse (llama.cpp's idle
        # contexts, vLLM's prefix cache) and their admission is released before the new one asks
        await group.close()
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
        if key and key not in self._checking and key not in self._pending:
            spec = await self.source.speculate(key)
            if spec is not None:
                self.stats.speculated += 1
                self._pending[key] = spec
                self._verify_if_due()
                return spec, True
        real = await self.source.retrieve(key)
        self.stats.retrievals += 1
        self._real[key] = real
        return real, False

    def note_step(self, seconds: float) -> None:
        """One step's cost (decoding + the cache's retrieval), for OS³."""
        self.policy.note_step(seconds)

    def _verify_if_due(self) -> None:
        if self.policy.should_verify(len(self._pending), len(set(self._checking.values()))):
            self.flush()

    def flush(self) -> None:
        """Verify every pending speculation now, in one batch, beside the decoding."""
        if not self._pending:
            return
        batch, self._pending = self._pending, {}
        task = asyncio.get_running_loop().create_task(self._verify(batch))
        self._checking.update({key: task for key in batch})

    async def _verify(self, batch: dict[tuple[int, ...], Documents]) -> None:
        """One batched real retrieval for the speculated boundaries; the verdicts go to the
        session in boundary order."""
        keys = sorted(batch, key=len)
        t0 = time.perf_counter()
        try:
            reals = await self._retrieve_many(keys)
        except Exception as exc:  # the request cannot go on without its documents
            self._feed(s.CancelRequest(f"retrieval failed: {exc!r}"))
            return
        finally:
            for key in keys:
                self._checking.pop(key, None)
        right = 0
        for key, real in zip(keys, reals):
            self._real[key] = real
            ok = real.same(batch[key])
            right += ok
            self._feed(s.RetrievalChecked(key, ok))
        self.policy.note_verification(time.perf_counter() - t0, len(keys), right)
        self.stats.retrievals += len(keys)
        self.stats.verifications += 1
        self.stats.largest_batch = max(self.stats.largest_batch, len(keys))
        self.stats.speculated_right += right
        self.stats.speculated_wrong += len(keys) - right
        self._verify_if_due()  # what piled up while this one ran

    async def _retrieve_many(self, keys: list[tuple[int, ...]]) -> list[Documents]:
        many = getattr(self.source, "retrieve_many", None)
        if many is not None:
            reals = await many(keys)
            if len(reals) != len(keys):
                raise RuntimeError(f"retrieve_many gave {len(reals)} retrievals for {len(keys)} prefixes")
            return list(reals)
        return [await self.source.retrieve(key) for key in keys]

    async def close(self) -> None:
        tasks = set(self._checking.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
