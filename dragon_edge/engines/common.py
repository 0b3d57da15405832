"""What the device backends share: the lazy feeding of a stream group (on the lockstep
bookkeeping of ``dragon_core.lockstep``), temperature, and the worker thread that keeps
blocking engine calls off the event loop.

A backend only knows how to *feed* tokens to its k streams and how to *drop* a KV tail; this
module decides what to feed. Appends are lazy: tokens wait until the next ``next_dists`` and
then go to the engine in one batch (the session's pattern is rollback, append, compute), and a
rollback inside the pending tokens costs nothing.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
from abc import ABC, abstractmethod
from typing import Callable, Sequence, TypeVar

import numpy as np

from dragon_core.dist import Dist
from dragon_core.lockstep import Lockstep

T = TypeVar("T")


class Worker:
    """One thread per engine: engine calls are blocking C/torch calls, and serialising them
    keeps one model's state consistent without locks inside the engine."""

    def __init__(self, name: str) -> None:
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)

    async def run(self, fn: Callable[..., T], *args) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    def shutdown(self) -> None:
        self._pool.shutdown(wait=True)


def tempered_dist(logits: np.ndarray, temperature: float) -> Dist:
    """``Dist.full(log_softmax(z / T))`` (``Dist.full`` normalises in float64)."""
    return Dist.full(np.asarray(logits, dtype=np.float64) / temperature)


def check_prompts(prompts: Sequence[Sequence[int]], vocab_size: int, max_len: int) -> list[list[int]]:
    if not prompts:
        raise ValueError("a stream group needs at least one prompt")
    out = [[int(t) for t in p] for p in prompts]
    for i, p in enumerate(out):
        if not p:
            raise ValueError(f"prompt {i} is empty")
        check_tokens(p, vocab_size)
        if len(p) >= max_len:
            raise ValueError(f"prompt {i} has {len(p)} tokens; the context holds {max_len}")
    return out


def check_tokens(tokens: Sequence[int], vocab_size: int) -> None:
    bad = [t for t in tokens if not 0 <= t < vocab_size]
    if bad:
        raise ValueError(f"token ids out of range [0, {vocab_size}): {bad[:5]}")


def check_temperature(temperature: float) -> float:
    if not (temperature > 0 and np.isfinite(temperature)):
        raise ValueError(f"temperature must be positive and finite, got {temperature}")
    return float(temperature)


class LockstepGroup(Lockstep, ABC):
    """A lockstep group whose backend holds a KV cache per stream and is fed lazily.

    ``_in_cache`` counts the generated tokens whose KV the engine holds (None: nothing is
    prefilled yet: a backend that opens lazily, ``_open_now``, prefills at the first
    ``next_dists`` with every token appended by then, so KV it already holds for them is
    reused instead of recomputed). Backends implement
    ``_feed(start, tails)`` (tails[i] = stream i's tokens from generated index ``start``, where
    ``start == -1`` means "the prompt's last token, then ...") returning (k, V) last-position
    logits, and ``_drop(keep)`` (remove KV from generated index ``keep`` on; -1 drops the prompt's
    last token too). Both run on the engine's worker thread.
    """

    def __init__(self, prompts: list[list[int]], temperature: float, vocab_size: int,
                 max_len: int, worker: Worker, first_logits: np.ndarray | None) -> None:
        super().__init__(prompts)
        self.temperature, self.vocab_size = temperature, vocab_size
        self._max_len, self._worker = max_len, worker
        self._in_cache: int | None = 0
        # the prompt's last-position dists; a backend that prefills later sets them itself
        self._dists: list[Dist] | None = None if first_logits is None else self._to_dists(first_logits)
        self._lock = asyncio.Lock()  # one engine operation per group at a time, in call order

    # ------------------------------------------------------------------ StreamGroup
    async def next_dists(self) -> list[Dist]:
        async with self._lock:
            self._check_open()
            if self._dists is None:
                if self._in_cache is None:  # opened lazily: the prefill, with the tokens appended since
                    logits = await self._worker.run(self._open_now, list(self._generated))
                else:
                    start = self._in_cache
                    if start == len(self._generated):  # nothing pending: recompute the last position
                        start -= 1
                        await self._worker.run(self._drop, start)
                        self._in_cache = start
                    tails = [self._tail(p, start) for p in self.prompts]
                    logits = await self._worker.run(self._feed, start, tails)
                self._in_cache = len(self._generated)
                self._dists = self._to_dists(logits)
            return list(self._dists)

    async def append(self, tokens: Sequence[int]) -> None:
        tokens = [int(t) for t in tokens]
        async with self._lock:
            self._check_open()
            check_tokens(tokens, self.vocab_size)
            longest = max(len(p) for p in self.prompts) + len(self._generated) + len(tokens)
            if longest > self._max_len:
                raise ValueError(f"a stream would hold {longest} tokens; the context holds {self._max_len}")
            if tokens:
                self._extend(tokens)
                self._dists = None

    async def rollback(self, length: int) -> None:
        async with self._lock:
            self._check_open()
            if not self._truncate(length):
                return
            self._dists = None
            if self._in_cache is not None and self._in_cache > length:
                await self._worker.run(self._drop, length)
                self._in_cache = length

    async def close(self) -> None:
        async with self._lock:
            if self._mark_closed():
                await self._worker.run(self._release)

    # ------------------------------------------------------------------ backend hooks
    @abstractmethod
    def _feed(self, start: int, tails: list[list[int]]) -> np.ndarray: ...

    @abstractmethod
    def _drop(self, keep: int) -> None: ...

    @abstractmethod
    def _release(self) -> None: ...

    def _open_now(self, generated: list[int]) -> np.ndarray:
        """A lazily opened group's prefill of ``prompt_i + generated`` (worker thread): the
        last-position logits. Only backends that open with ``_in_cache = None`` need it."""
        raise NotImplementedError

    # ------------------------------------------------------------------ helpers
    def _tail(self, prompt: list[int], start: int) -> list[int]:
        head = [prompt[-1]] if start < 0 else []
        return head + self._generated[max(start, 0):]

    def _to_dists(self, logits: np.ndarray) -> list[Dist]:
        return [tempered_dist(row, self.temperature) for row in logits]
