"""One running answer as text: ``AnswerStream``, used by the device runtime and the cloud's
OpenAI answers alike.

It runs a ``SessionDriver`` in a task, queues the tokens the session commits, turns them into
text deltas (``dragon_core.text_stream``: windowed detokenisation, stop strings with hold-back)
and, on a stop string or when its reader goes away, cancels the session and waits for the
driver to end. ``close`` also closes the stream group; it is safe to call twice.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Sequence

from dragon_core import session as s
from dragon_core.engine import StreamGroup
from dragon_core.text_stream import TextStream
from dragon_host.documents import Documents, DocumentSource
from dragon_host.driver import SendFn, SessionDriver


@dataclass(frozen=True)
class Delta:
    """Text released by the tokens of one commit (``text`` may be empty: half a character,
    a held-back tail), and when they arrived."""

    text: str
    tokens: tuple[int, ...]
    at: float = field(default_factory=time.monotonic)


class AnswerStream:
    def __init__(self, session: s.Session, group: StreamGroup, scores: Sequence[float], send: SendFn,
                 tokenizer: Any, eos_ids: Sequence[int], stops: Sequence[str] = (),
                 documents: DocumentSource | None = None, first_documents: Documents | None = None) -> None:
        self._queue: asyncio.Queue[tuple[int, ...] | None] = asyncio.Queue()
        self.driver = SessionDriver(session, group, scores, send, on_commit=self._on_commit, documents=documents,
                                    first_documents=first_documents)
        self.text = TextStream(tokenizer, eos_ids, stops)
        self._task: asyncio.Task[s.Finish] | None = None
        self._closed = False

    def _on_commit(self, tokens: Sequence[int]) -> None:
        self._queue.put_nowait(tuple(tokens))

    @property
    def session(self) -> s.Session:
        return self.driver.session

    @property
    def stopped(self) -> bool:
        """A stop string ended the answer (its decode was cancelled, not finished)."""
        return self.text.stopped

    def start(self) -> "AnswerStream":
        self._task = asyncio.create_task(self.driver.run())
        self._task.add_done_callback(lambda _: self._queue.put_nowait(None))
        return self

    async def deltas(self) -> AsyncIterator[Delta]:
        """Text as tokens commit, then the rest once the session finished (a last ``Delta``
        with no tokens, its text possibly empty); nothing more after a stop string."""
        while (tokens := await self._queue.get()) is not None:
            yield Delta(self.text.push(tokens), tokens)
            if self.text.stopped:
                await self.cancel("stop string")
                return
        yield Delta(self.text.finish(), ())

    async def finish(self) -> s.Finish:
        """The session's ``Finish`` (its driver's errors raise here)."""
        assert self._task is not None, "start() first"
        return await self._task

    async def cancel(self, reason: str = "the application stopped reading") -> None:
        """Cancel the session if it still runs and wait for its driver to end."""
        if self._task is not None and not self._task.done():
            self.driver.feed(s.CancelRequest(reason))
            await asyncio.gather(self._task, return_exceptions=True)

    async def close(self, reason: str = "the application stopped reading") -> None:
        await self.cancel(reason)
        if not self._closed:
            self._closed = True
            await self.driver.group.close()  # the current one: iterative retrieval swaps them

