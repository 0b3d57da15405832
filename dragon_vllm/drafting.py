"""The cloud's in-engine drafting path: a request's k document streams as one vLLM *gang*.

The k streams are k streaming-input sessions of one ``AsyncLLM``, tagged as one gang. The gang
scheduler (``gang.py``) keeps them in lockstep; the logits processor (``mixing.py``) writes the
side mixture into every row, so all rows take its argmax and the leader row's log-probs are the
mixture's top-K. Each input chunk drafts ``chunk_tokens`` positions inside the engine, with no
round trip to this process in between; their distributions stream back as they are produced.

How this meets the protocol (``dragon_core``), exactly:

* The side's canonical distribution at a position is ``canonical_side_dist`` of the mixture's
  top-K as the engine returned it (one "document" of weight 1): the engine's K most likely ids of
  the full-vocabulary mixture, log-probs rounded to float16, the rest of the mass spread evenly
  over the other ids (``dist.py``). That ``Dist`` is what the session drafts from and what goes on
  the wire, so the peer verifies against the distribution the draft came from.
* The engine's own token at a position is only a **prediction** of the session's draft (the
  argmax of the float32 mixture; the session drafts from the canonical form, by argmax or with the
  protocol's randomness). Positions are served from the chunk only while the tokens the session
  appended equal the engine's; the first difference (a sampled draft, a float16 tie, a rejected
  draft) ends the chunk and the next one starts from the session's tokens. So a wrong prediction
  costs time, never exactness.
* Rollback: no in-place truncation yet; the fallback of ``engine.py`` (abort the gang, reopen it
  with ``prompt + accepted``; the prefix cache restores the full blocks). An in-flight chunk is
  aborted as soon as the session's tokens leave it (it stops early).
* Fail closed: a gang the engine ever finds incomplete has its rows' logits set to NaN
  (``mixing.py``); rows that disagree on a token or a NaN log-prob make this group discard the
  chunk from that position and reopen (``repairs``).
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, AsyncIterator, Sequence

import numpy as np

from dragon_core.aggregate import canonical_side_dist, log_mass
from dragon_core.dist import Dist
from dragon_core.errors import ProtocolError
from dragon_vllm.admission import Ticket
from dragon_vllm.group import CloudGroup
from dragon_vllm.mixing import gang_args
from dragon_vllm.streaming import input_chunks, top_k_at

if TYPE_CHECKING:
    from dragon_vllm.engine import VllmEngine


class _Row:
    """One streaming-input session of a gang: its tokens (and, for the leader, the top-K) of
    each position of the current chunk, as vLLM streams them.

    A task per row reads vLLM's output stream for the row's whole life: vLLM submits a request
    (and each later input chunk) only while its output stream is being read, so a gang whose rows
    were read one after another would never be complete in the engine."""

    def __init__(self, llm, request_id: str, first: list[int], params, top_k: int) -> None:
        self._inbox: asyncio.Queue[list[int] | None] = asyncio.Queue()
        self._inbox.put_nowait(first)
        self._top_k = top_k
        self.prompt_len = len(first)
        self.num_cached_tokens = 0
        self.tokens: list[int] = []  # tokens of the current chunk
        self.top: list[tuple[np.ndarray, np.ndarray]] = []  # leader: top-K per position
        self._arrived = asyncio.Event()
        self._error: BaseException | None = None
        self._task = asyncio.create_task(self._read(llm.generate(input_chunks(self._inbox), params, request_id)))

    async def _read(self, outputs: AsyncIterator) -> None:
        try:
            async for out in outputs:
                self.num_cached_tokens = max(self.num_cached_tokens, int(out.num_cached_tokens or 0))
                completion = out.outputs[0]
                new = [int(t) for t in completion.token_ids]
                if completion.logprobs is not None and new:
                    flat = completion.logprobs
                    for p in range(len(flat.start_indices) - len(new), len(flat.start_indices)):
                        self.top.append(top_k_at(flat, p, self._top_k))
                self.tokens.extend(new)
                self._arrived.set()
            raise ProtocolError("vLLM ended a DRAGON stream")
        except asyncio.CancelledError:
            raise
        except BaseException as exc:  # surfaced to the reader; the group's request then ends
            self._error = exc
            self._arrived.set()

    def feed(self, ids: Sequence[int]) -> None:
        self.tokens, self.top = [], []
        self._inbox.put_nowait(list(ids))

    async def pull(self) -> None:
        """Wait for this row's next output (one or more positions)."""
        if self._error is None:
            await self._arrived.wait()
            self._arrived.clear()
        if self._error is not None:
            raise self._error

    async def abort(self) -> None:
        self._task.cancel()  # cancelling vLLM's generate() aborts the request
        await asyncio.gather(self._task, return_exceptions=True)


class GangStreamGroup(CloudGroup):
    """A request's k document streams, mixed and drafted inside vLLM
    (``dragon_core.engine.MixingStreamGroup``)."""

    def __init__(self, engine: "VllmEngine", gid: int, prompts: list[list[int]], scores: Sequence[float],
                 temperature: float, ticket: Ticket, chunk_tokens: int, budget: int) -> None:
        super().__init__(engine, gid, prompts, temperature, ticket)
        self._log_w = np.asarray(scores, dtype=np.float64) - log_mass(scores)  # log softmax(R)
        self.chunk_tokens = chunk_tokens  # 0: open-ended (see _open_len)
        self._budget = budget  # generated tokens the engine may draft in all (max_tokens, context room)
        self._chunk_len = 1  # positions the current chunk drafts
        self._rows: list[_Row] | None = None
        self._fed: list[int] = []  # generated tokens the rows held when the current chunk began
        self._received = 0  # positions of the current chunk that every row has reported
        self.chunks = 0
        self.served_from_chunk = 0  # positions answered from a chunk already drafted
        self.repairs = 0

    # ------------------------------------------------------------------ StreamGroup
    async def next_dists(self) -> list[Dist]:
        raise NotImplementedError("a gang mixes its streams inside vLLM; use next_side_dist")

    async def append(self, tokens: Sequence[int]) -> None:
        self._check_open()
        self._extend(tokens)
        if self._rows is not None and not self._chunk_done() and not self._consistent(len(self._generated)):
            await self._abort()  # the session left the chunk's path: stop the chunk early

    async def rollback(self, length: int) -> None:
        self._check_open()
        self._truncate(length)  # the rows are resynchronised lazily, by the next chunk

    async def next_side_dist(self, top_k: int) -> Dist:
        """The side's canonical mixture after the current tokens (see the module docstring)."""
        self._check_open()
        position = len(self._generated)
        while True:
            j = position - self._base
            if self._rows is not None and 0 <= j < self._chunk_len and self._consistent(position):
                if self._received > j:
                    self.served_from_chunk += int(j > 0)
                    return self._dist(j, top_k)
                await self._pull()
                continue
            await self._start_chunk()

    def engine_token(self) -> int | None:
        """The engine's own token at the current position (its prediction of the draft), when the
        current chunk has drafted it; benchmarks of dummy-weight shapes follow it, since a flat
        random-weight mixture's canonical argmax is an unlisted id (the tail) at almost every step."""
        j = len(self._generated) - self._base
        if self._rows is None or not 0 <= j < self._received or not self._consistent(len(self._generated)):
            return None
        return self._rows[0].tokens[j]

    # ------------------------------------------------------------------ chunk bookkeeping
    @property
    def _base(self) -> int:
        """Position of the current chunk's first draft."""
        return len(self._fed)

    def _begin_chunk(self) -> None:
        self._fed, self._received = list(self._generated), 0
        self.chunks += 1
        self._engine._stats["chunks"] += 1

    def _consistent(self, length: int) -> bool:
        """Are the session's first ``length`` tokens the current chunk's path so far: what the
        rows were fed, then the drafts the engine has reported?"""
        if length < self._base or self._generated[:self._base] != self._fed:
            return False
        drafts = self._rows[0].tokens
        n = min(length - self._base, len(drafts))
        return self._generated[self._base:self._base + n] == drafts[:n]

    def _chunk_done(self) -> bool:
        return self._received >= self._chunk_len

    async def _pull(self) -> None:
        """Wait until every row reports one more position; check that the rows agree."""
        j = self._received
        for row in self._rows:  # a step's outputs of all rows arrive together: no tasks needed
            while len(row.tokens) <= j:
                await row.pull()
        ready = min(len(row.tokens) for row in self._rows)
        leader = self._rows[0]
        while self._received < ready:
            p = self._received
            token = leader.tokens[p]
            ids, lps = leader.top[p]
            if any(row.tokens[p] != token for row in self._rows) or not np.all(np.isfinite(lps)) or not ids.size:
                await self._repair()
                return
            self._received += 1

    async def _repair(self) -> None:
        """The engine did not keep the gang together: drop the chunk, start again from here."""
        self.repairs += 1
        self._engine._stats["repairs"] += 1
        await self._abort()

    def _dist(self, j: int, top_k: int) -> Dist:
        ids, lps = self._rows[0].top[j]
        mixture = Dist.from_top_k(self._engine.vocab_size, ids, lps)
        return canonical_side_dist([mixture], [0.0], top_k)

    async def _start_chunk(self) -> None:
        """Feed the session's tokens the rows lack and draft the next chunk, or reopen the gang
        when the rows hold tokens the session no longer has (rollback) or a chunk is in flight."""
        held = self._held()
        if (self._rows is None or held is None or self._generated[:len(held)] != held or len(self._generated) == len(held)
                or not self.chunk_tokens):  # an open-ended chunk drafted its whole budget: start afresh
            await self._reopen()
            return
        new = self._generated[len(held):]
        for row in self._rows:
            row.feed(new)
        self._begin_chunk()

    def _held(self) -> list[int] | None:
        """Generated tokens whose KV the rows hold once the current chunk is over (vLLM drops the
        last sampled token of a chunk); None while the chunk is still running."""
        if self._rows is None or not self._chunk_done():
            return None
        return self._fed + self._rows[0].tokens[:self._chunk_len - 1]

    async def _reopen(self) -> None:
        await self._abort()
        epoch = next(self._epoch)
        if epoch:
            self.reopens += 1
            self._engine._stats["reopens"] += 1
        gang = f"dragon-{self._gid}-{epoch}"
        self._chunk_len = self._open_len()
        rows = []
        for i, prompt in enumerate(self.prompts):
            params = self._engine._gang_params(self._chunk_len, leader=i == 0,
                                               extra=gang_args(gang, len(self.prompts), i, float(self._log_w[i]),
                                                               self.temperature))
            rows.append(_Row(self._engine.llm, f"{gang}-{i}", prompt + self._generated, params, self._engine.logprobs_k))
        self._rows = rows
        self._begin_chunk()

    def _open_len(self) -> int:
        """Positions a freshly opened gang drafts: ``chunk_tokens``, or with ``chunk_tokens = 0``
        everything left of the budget, so that the gang decodes with no round trip to this
        process until the session leaves its path (vLLM then aborts it) or the answer ends.
        Later chunks of one session keep its first size (vLLM 0.26 ignores theirs)."""
        if self.chunk_tokens:
            return self.chunk_tokens
        return max(1, self._budget - len(self._generated))

    async def _abort(self) -> None:
        rows, self._rows, self._received = self._rows, None, 0
        if rows:
            stats = self._engine._stats
            for i, row in enumerate(rows):
                self.num_cached_tokens[i] = row.num_cached_tokens
                stats["cached_tokens"] += row.num_cached_tokens
                stats["prompt_tokens"] += row.prompt_len
            await asyncio.gather(*(row.abort() for row in rows), return_exceptions=True)
