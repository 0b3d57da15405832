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
* Rollback, two ways (``make_engine(rollback=...)``):

  - ``"reopen"`` (the default): abort the gang, reopen it with ``prompt + accepted`` (the prefix
    cache restores the full blocks). An in-flight chunk is aborted as soon as the session's tokens
    leave it (it stops early).
  - ``"in_place"``: the next input chunk of each row carries ``rewind_to = T_i`` (the tokens the
    row keeps, aligned down to the KV block size, at most what its KV surely holds) and
    ``(prompt_i + tokens)[T_i:]``; the gang scheduler truncates the session to ``T_i`` and ends
    the chunk in flight at its next token (``gang.py``, ``rewind.py``). Outputs of the old chunk
    can still arrive after the new one is fed, even merged with the new chunk's into one
    ``RequestOutput`` (vLLM merges DELTA outputs when the reader lags), so each chunk is told
    apart per position: the rows other than the leader are marked with the chunk's parity
    (``_PlacedRow``), and a new chunk is fed only once every row has reported a position of the
    current one. A gang of one document has no row to mark: it reopens. Any doubt (a row's error, rows
    that disagree) falls back to abort + reopen.
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
        self._inbox: asyncio.Queue = asyncio.Queue()
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
                if self._take(completion):
                    self._arrived.set()
                    continue
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

    def _take(self, completion) -> bool:
        """A subclass's own handling of an output (True: handled)."""
        return False

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


# A marked row's sampled log-prob: log(1 / (1 + e^-1)) = -0.313 in an even chunk, 0 in an odd one (mixing.py)
_ODD_CHUNK_ABOVE = -0.15


class _ChunkView:
    """The positions of a row's current chunk: its raw stream from ``row.start`` on."""

    __slots__ = ("_raw", "_row")

    def __init__(self, raw: list, row: "_PlacedRow") -> None:
        self._raw, self._row = raw, row

    def __len__(self) -> int:
        start = self._row.start
        return 0 if start is None else max(0, len(self._raw) - start)

    def __getitem__(self, i):
        start, n = self._row.start or 0, len(self)
        if isinstance(i, slice):
            lo, hi, step = i.indices(n)
            return self._raw[start + lo:start + hi:step]
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(i)
        return self._raw[start + i]


class _PlacedRow(_Row):
    """A row of a gang rolled back in place (``rollback="in_place"``).

    Outputs of the chunk before can still arrive after a new chunk is fed, even merged with the
    new chunk's into one ``RequestOutput`` (vLLM merges DELTA outputs when the reader lags; and its
    API side keeps a session's first log-prob count for every chunk). So the rows other than the
    leader are *marked*: the mixing processor writes into them, instead of the mixture, a
    distribution with the same argmax whose sampled log-prob says the chunk's parity (``mixing.py``).
    A marked row finds where its current chunk begins in its raw stream of positions (``start``);
    the leader, whose log-probs must stay the mixture's, takes the same index from the marked rows
    (the gang's rows are stepped together: they produce the same positions, ``GangStreamGroup``
    checks that all marked rows agree)."""

    def __init__(self, llm, request_id: str, first: list[int], params, top_k: int, marked: bool) -> None:
        self.raw_tokens: list[int] = []
        self.raw_top: list[tuple[np.ndarray, np.ndarray]] = []
        self.marked = marked
        self.parity = 0
        self.start: int | None = None if marked else 0  # raw index of the current chunk's first position
        self._last_finish = -1  # raw length after the latest output that ended a chunk
        super().__init__(llm, request_id, first, params, top_k)
        self.tokens = _ChunkView(self.raw_tokens, self)
        self.top = _ChunkView(self.raw_top, self)

    @property
    def ended(self) -> bool:
        """The current chunk's last output arrived."""
        return self.start is not None and self._last_finish > self.start

    def _take(self, completion) -> bool:
        new = [int(t) for t in completion.token_ids]
        flat = completion.logprobs
        if new and (flat is None or len(flat.start_indices) < len(new)):
            raise ProtocolError("a DRAGON row returned positions without log-probs")
        offset = len(flat.start_indices) - len(new) if new else 0
        for q, token in enumerate(new):
            p = offset + q
            if self.marked:
                lp = float(flat.logprobs[flat.start_indices[p]])
                if lp != lp:
                    raise ProtocolError("a DRAGON row returned a NaN log-prob (its gang was split)")
                parity = int(lp > _ODD_CHUNK_ABOVE)
                if parity == self.parity:
                    if self.start is None:
                        self.start = len(self.raw_tokens)
                elif self.start is not None:
                    raise ProtocolError("a position of the previous chunk after the current one's")
            else:
                self.raw_top.append(top_k_at(flat, p, self._top_k))
            self.raw_tokens.append(token)
        if completion.finish_reason is not None:
            self._last_finish = len(self.raw_tokens)
        return True

    def feed(self, ids: Sequence[int], params=None) -> None:
        self.parity ^= 1
        self.start = None
        self._inbox.put_nowait((list(ids), params))


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
        # in place needs a marked row besides the leader (_PlacedRow): a gang of one reopens
        self.in_place = engine.rollback == "in_place" and len(prompts) > 1
        self.rewinds = 0  # chunks restarted in place after the session left the rows' path
        self._gang = ""  # the vLLM gang key of the open rows

    # ------------------------------------------------------------------ StreamGroup
    async def next_dists(self) -> list[Dist]:
        raise NotImplementedError("a gang mixes its streams inside vLLM; use next_side_dist")

    async def append(self, tokens: Sequence[int]) -> None:
        self._check_open()
        self._extend(tokens)
        if self._rows is not None and not self._chunk_done() and not self._consistent(len(self._generated)):
            if self.in_place:  # the rewind chunk also ends the chunk in flight (gang.py)
                await self._restart_in_place()
            else:
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
        if self.in_place:
            try:
                await self._sync_starts()
                for row in self._rows:
                    while len(row.tokens) <= j:
                        if row.ended:
                            raise ProtocolError("the chunk ended short")
                        await row.pull()
            except ProtocolError:  # a split gang, a chunk ended short: start again from here
                await self._repair()
                return
        else:
            for row in self._rows:  # a step's outputs of all rows arrive together: no tasks needed
                while len(row.tokens) <= j:
                    await row.pull()
        await self._absorb()

    async def _sync_starts(self) -> None:
        """In place: where the current chunk begins in every row's raw stream. The marked rows
        say it (their parity); the leader's is the same index (the rows are stepped together)."""
        rows = self._rows
        if rows[0].start is not None:
            return
        for row in rows[1:]:
            while row.start is None:
                await row.pull()
        starts = {row.start for row in rows[1:]}
        if len(starts) != 1:
            raise ProtocolError(f"the rows of a gang disagree on where the chunk begins: {sorted(starts)}")
        rows[0].start = starts.pop()

    async def _absorb(self) -> None:
        """Count the positions every row has reported, checking that the rows agree."""
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
        if self.in_place and self._rows is not None and not (
                held is not None and self._generated[:len(held)] == held and len(self._generated) > len(held)):
            await self._restart_in_place()
            return
        if (self._rows is None or held is None or self._generated[:len(held)] != held or len(self._generated) == len(held)
                or not self.chunk_tokens):  # an open-ended chunk drafted its whole budget: start afresh
            await self._reopen()
            return
        new = self._generated[len(held):]
        if self.in_place:  # every chunk of an in-place gang flips the parity (see _PlacedRow)
            parity = self._rows[0].parity ^ 1
            for i, row in enumerate(self._rows):
                row.feed(new, self._params(i, self.chunk_tokens, parity, None))
        else:
            for row in self._rows:
                row.feed(new)
        self._begin_chunk()

    async def _restart_in_place(self) -> None:
        """Roll the rows back in place to what they share with the session, and feed the rest
        (see the module docstring); abort + reopen whenever that cannot be done safely."""
        rows = self._rows
        try:
            await self._sync_starts()
            for row in rows:  # a position of the current chunk from every row: older outputs are all in
                while not row.tokens:
                    if row.ended:
                        raise ProtocolError("the chunk ended with no position")
                    await row.pull()
            await self._absorb()
        except Exception:  # a row's error, a split gang: the fallback
            await self._reopen()
            return
        if self._rows is not rows:  # the rows disagreed and were repaired (reopened)
            return
        path = self._fed + rows[0].tokens[:self._received]
        m = 0
        for a, b in zip(self._generated, path):
            if a != b:
                break
            m += 1
        # generated tokens whose KV every row surely holds: the fed ones and all drafts but the last
        keep = min(m, len(self._fed) + self._received - 1)
        block = self._engine.block_size
        parity = rows[0].parity ^ 1
        self._chunk_len = self._open_len()
        for i, (row, prompt) in enumerate(zip(rows, self.prompts)):
            target = min(len(prompt) + keep, len(prompt) + len(self._generated) - 1)
            target = max(0, target - target % block)
            context = prompt + self._generated
            row.feed(context[target:], self._params(i, self._chunk_len, parity, target))
        self.rewinds += 1
        self._engine._stats["rewinds"] += 1
        self._begin_chunk()

    def _params(self, index: int, chunk_len: int, parity: int, rewind_to: int | None):
        extra = gang_args(self._gang, len(self.prompts), index, float(self._log_w[index]), self.temperature)
        extra["dragon"]["parity"] = parity
        if rewind_to is not None:
            extra["dragon"]["rewind_to"] = int(rewind_to)
        return self._engine._gang_params(chunk_len, leader=index == 0, extra=extra, parity=parity)

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
        gang = self._gang = f"dragon-{self._gid}-{epoch}"
        self._chunk_len = self._open_len()
        rows = []
        for i, prompt in enumerate(self.prompts):
            if self.in_place:
                rows.append(_PlacedRow(self._engine.llm, f"{gang}-{i}", prompt + self._generated,
                                       self._params(i, self._chunk_len, 0, None), self._engine.logprobs_k, marked=i > 0))
                continue
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
