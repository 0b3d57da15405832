"""One DRAGON answer of the device, in the shape the shared OpenAI routes serve
(``dragon_http.answer.Answer``): what ``dragon-edge serve`` streams to local apps.

It runs ``EdgeRuntime.answer`` (retrieval over the private store, the cloud over the link when
there is one, device-only when not or when the cloud is lost) and exposes its text deltas and,
at the end, its stats: the SDK's ``dragon`` field (``AnswerStats.as_dict``: acceptance, rollbacks,
which side aggregated, bytes, degraded, the private and public sources).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any, AsyncIterator

from dragon_edge.runtime import AnswerStats, EdgeRuntime, Piece, answer_options


class EdgeAnswer:
    def __init__(self, pieces: AsyncIterator[Piece], first: Piece, prompt_tokens: int) -> None:
        self._pieces = pieces
        self._first: Piece | None = first
        self._stats: AnswerStats | None = first.finished
        self.prompt_tokens = prompt_tokens
        self.created = int(time.time())
        self.finish_reason = "stop"
        self._uid = uuid.uuid4().hex[:16]

    @classmethod
    async def start(cls, runtime: EdgeRuntime, query: str, *, max_tokens: int, temperature: float | None,
                    top_p: float | None, top_k: int | None, seed: int | None, stop: list[str],
                    **dragon: Any) -> "EdgeAnswer":
        """Validate the options (``InvalidOptions``: a 400), then run the answer up to its first
        piece, so that what can only fail at the start (a prompt longer than the context) fails
        here, before a status line is sent, and not in the middle of a 200."""
        extra = {**dragon, **({"top_k": top_k} if top_k else {})}
        opts = answer_options(max_tokens, temperature, top_p, seed, extra)
        prompt_tokens = await asyncio.to_thread(
            lambda: len(runtime.tokenizer.encode(query, add_special_tokens=False)))
        pieces = runtime.answer(query, opts, stop)
        try:
            first = await anext(pieces)
        except BaseException:
            await pieces.aclose()
            raise
        return cls(pieces, first, prompt_tokens)

    def id(self, prefix: str) -> str:
        return f"{prefix}-dragon-{self._uid}"

    async def deltas(self) -> AsyncIterator[str]:
        if self._first is not None:
            first, self._first = self._first, None
            if first.text:
                yield first.text
        async for piece in self._pieces:
            self._stats = piece.finished or self._stats
            if piece.text:
                yield piece.text
        if self._stats is not None and self._stats.finish_reason == "length":
            self.finish_reason = "length"

    def usage(self) -> dict:
        n = self._stats.tokens if self._stats is not None else 0
        return dict(prompt_tokens=self.prompt_tokens, completion_tokens=n, total_tokens=self.prompt_tokens + n)

    def stats(self) -> dict:
        """The SDK's ``dragon`` field; ``{"finished": false}`` for an answer closed before the
        runtime counted it (its reader left). A stop string ends the answer in the runtime's
        answer stream, which then counts it like any other."""
        return self._stats.as_dict() if self._stats is not None else {"finished": False}

    async def aclose(self) -> None:
        """Cancel the decode (the runtime's ``finally`` frees the streams and the link's request)."""
        await self._pieces.aclose()
