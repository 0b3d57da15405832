"""llama.cpp backend (llama-cpp-python, the GGUF as shipped): the default on-device engine.

One loaded model; each stream group gets a llama.cpp context with one *sequence id per
stream* (low-level batch API), so a decode step of k streams is one ``llama_decode`` of k
tokens that reads the weights once. The group's common prompt prefix (the system turn) is
computed once on sequence 0 and shared with ``llama_memory_seq_cp``; rollback is
``llama_memory_seq_rm`` of the KV tail. Logits come from ``llama_get_logits_ith`` (full vocab).

Prefix reuse: a closed group's context goes back to an idle pool with its KV and the tokens it
holds; the next group of the same k takes the idle context that shares the most with its
prompts, keeps each sequence's common prefix and decodes only the rest (a repeated question over
the same documents prefills one token a stream; an iterative-retrieval swap keeps the streams
whose document stayed). That is a rollback and an append on the kept sequence, which the
bit-exactness below covers.

Bit-exactness: with flash attention on and physical batches (``n_ubatch``) of at most 32
tokens, a position's logits do not depend on how the tokens were batched (one by one, in
chunks, several sequences in one batch, prefix copied from another sequence). Larger
ubatches switch kernels and move log-probs by up to ~1 nat on rare tokens (TV ~0.05,
measured), so append/rollback would drift from a fresh run. tests/engines/test_engines.py checks
equality with a fresh full-context run bit for bit.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Sequence

import llama_cpp
import numpy as np
from llama_cpp import _internals

from dragon_edge.engines.common import LockstepGroup, Worker, check_prompts, check_temperature

log = logging.getLogger("dragon.edge.llamacpp")

UBATCH = 32  # see the module docstring: larger physical batches are not batch-invariant


def _quiet_llama_logs() -> None:
    # llama-cpp-python's log callback prints every INFO line of llama.cpp unless its logger
    # is raised; keep errors.
    logging.getLogger("llama-cpp-python").setLevel(logging.ERROR)


def usable_cores() -> int:
    """Cores this process may run on: under ``taskset`` that is the pinned set, not the machine
    (8 threads on 4 pinned cores time-share them and decode slower than 4)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


class LlamaCppEngine:
    """Opens stream groups on one GGUF model.

    ``n_ctx`` is per stream. ``n_threads`` defaults to all cores (at most 8); llama.cpp's
    threads spin at barriers, so on an oversubscribed CPU fewer threads can be much faster
    (on this shared 2-core machine one 2-thread step once took 2.5 s). Idle contexts are kept
    (``max_idle_contexts`` per k) so opening a group does not allocate a KV cache each time,
    and with ``reuse_prefix`` their KV is reused (the module docstring; ``reused_tokens``
    counts the prompt tokens not decoded again).
    """

    def __init__(self, gguf_path: str | Path, *, n_ctx: int = 2048, n_threads: int | None = None,
                 n_batch: int = 512, max_idle_contexts: int = 2, reuse_prefix: bool = True,
                 verbose: bool = False) -> None:
        if not verbose:
            _quiet_llama_logs()
        llama_cpp.llama_backend_init()
        params = llama_cpp.llama_model_default_params()
        self._model = _internals.LlamaModel(path_model=str(gguf_path), params=params, verbose=verbose)
        self.path = Path(gguf_path)
        self.n_ctx = min(n_ctx, self._model.n_ctx_train())
        self.n_threads = n_threads or min(usable_cores(), 8)
        self.n_batch = max(n_batch, UBATCH)
        self._vocab_size = self._model.n_vocab()
        # k -> idle contexts, each with the tokens its sequences hold (None: cleared)
        self._idle: dict[int, list[tuple[_internals.LlamaContext, list[list[int]] | None]]] = {}
        self._max_idle = max_idle_contexts
        self.reuse_prefix = reuse_prefix
        self.reused_tokens = 0
        self._worker = Worker("llamacpp")
        self._verbose = verbose

    @classmethod
    def from_name(cls, model: str, **kwargs) -> "LlamaCppEngine":
        from dragon_host.models import get_model

        return cls(get_model(model).gguf_path(), **kwargs)

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    async def open_group(self, prompts: Sequence[Sequence[int]], temperature: float = 1.0) -> "LlamaCppGroup":
        prompts = check_prompts(prompts, self._vocab_size, self.n_ctx)
        temperature = check_temperature(temperature)
        # the prefill waits for the first next_dists: what is appended before it (an iterative
        # swap's answer so far) can then come from an idle context's KV too
        return LlamaCppGroup(self, prompts, temperature)

    async def close(self) -> None:
        await self._worker.run(self._free_all)
        self._worker.shutdown()

    # ------------------------------------------------------------------ worker thread
    def _open(self, prompts: list[list[int]]) -> tuple[_internals.LlamaContext, np.ndarray]:
        ctx, cached = self._context(prompts)
        try:
            if cached is not None:
                keep = _kept(cached, prompts) if self.reuse_prefix else []
                if any(keep):
                    for s, n in enumerate(keep):
                        if not llama_cpp.llama_memory_seq_rm(ctx.memory, s, n, -1):
                            raise RuntimeError(f"llama.cpp refused to truncate sequence {s}")
                    self.reused_tokens += sum(keep)
                    return ctx, self._decode(ctx, [(s, n, p[n:]) for s, (n, p) in enumerate(zip(keep, prompts))])
                llama_cpp.llama_memory_clear(ctx.memory, True)
            return ctx, self._prefill(ctx, prompts)
        except BaseException:
            self._recycle(ctx, len(prompts), None)
            raise

    def _context(self, prompts: list[list[int]]) -> tuple[_internals.LlamaContext, list[list[int]] | None]:
        """An idle context for these k prompts (the one whose KV shares the most with them, and
        the tokens it holds) or a new one (None: empty)."""
        k = len(prompts)
        idle = self._idle.get(k)
        if idle:
            best = max(range(len(idle)), key=lambda i: sum(_kept(idle[i][1], prompts)))
            return idle.pop(best)
        p = llama_cpp.llama_context_default_params()
        p.n_ctx = self.n_ctx * k  # split evenly: each sequence gets its own n_ctx KV stream
        p.n_seq_max = k
        p.kv_unified = False  # per-sequence KV: attention cost does not grow with k
        p.n_batch, p.n_ubatch = self.n_batch, UBATCH
        p.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED
        p.n_threads = p.n_threads_batch = self.n_threads
        p.no_perf = True
        return _internals.LlamaContext(model=self._model, params=p, verbose=self._verbose), None

    def _recycle(self, ctx: _internals.LlamaContext, k: int, held: list[list[int]] | None) -> None:
        """Back to the idle pool with the tokens its sequences hold (``held``; None when unknown,
        after a failure: cleared), or freed when the pool is full (the oldest goes first)."""
        idle = self._idle.setdefault(k, [])
        if not (self.reuse_prefix and held is not None):
            llama_cpp.llama_memory_clear(ctx.memory, True)
            held = None
        idle.append((ctx, held))
        while len(idle) > self._max_idle:
            idle.pop(0)[0].close()

    def _free_all(self) -> None:
        for idle in self._idle.values():
            for ctx, _ in idle:
                ctx.close()
        self._idle.clear()
        self._model.close()

    def _prefill(self, ctx: _internals.LlamaContext, prompts: list[list[int]]) -> np.ndarray:
        k = len(prompts)
        # Shared prefix (at least the system turn): compute once, copy to the other sequences.
        # Keep >= 1 token per stream outside it, so every stream gets its own last-position logits.
        shared = min(_common_prefix(prompts), min(len(p) for p in prompts) - 1)
        if k > 1 and shared > 0:
            self._decode(ctx, [(0, 0, prompts[0][:shared])], want=False)
            for s in range(1, k):
                llama_cpp.llama_memory_seq_cp(ctx.memory, 0, s, -1, -1)
        else:
            shared = 0
        return self._decode(ctx, [(s, shared, p[shared:]) for s, p in enumerate(prompts)])

    def _decode(self, ctx: _internals.LlamaContext, items: list[tuple[int, int, list[int]]],
                want: bool = True) -> np.ndarray:
        """Feed ``(seq_id, first_pos, tokens)`` items; return each item's last-token logits."""
        flat = [(s, pos + i, t, want and i == len(toks) - 1)
                for s, pos, toks in items for i, t in enumerate(toks)]
        out = np.empty((len(items) if want else 0, self._vocab_size), dtype=np.float32)
        row = 0
        batch = _internals.LlamaBatch(n_tokens=self.n_batch, embd=0, n_seq_max=1, verbose=self._verbose)
        try:
            for lo in range(0, len(flat), self.n_batch):
                chunk = flat[lo:lo + self.n_batch]
                b = batch.batch
                for j, (s, pos, t, logits) in enumerate(chunk):
                    b.token[j], b.pos[j], b.n_seq_id[j], b.logits[j] = t, pos, 1, logits
                    b.seq_id[j][0] = s
                b.n_tokens = len(chunk)
                rc = llama_cpp.llama_decode(ctx.ctx, b)
                if rc != 0:
                    raise RuntimeError(f"llama_decode failed with code {rc} (KV cache full?)")
                for j, (*_, logits) in enumerate(chunk):
                    if logits:
                        ptr = llama_cpp.llama_get_logits_ith(ctx.ctx, j)
                        out[row] = np.ctypeslib.as_array(ptr, shape=(self._vocab_size,))
                        row += 1
        finally:
            batch.close()
        return out


class LlamaCppGroup(LockstepGroup):
    """k streams = k sequence ids of one llama.cpp context (taken at the first ``next_dists``)."""

    def __init__(self, engine: LlamaCppEngine, prompts: list[list[int]], temperature: float) -> None:
        super().__init__(prompts, temperature, engine.vocab_size, engine.n_ctx, engine._worker, None)
        self._engine, self._ctx = engine, None
        self._in_cache = None  # opened lazily (_open_now)

    def _open_now(self, generated: list[int]) -> np.ndarray:
        self._ctx, logits = self._engine._open([p + generated for p in self.prompts])
        return logits

    def _feed(self, start: int, tails: list[list[int]]) -> np.ndarray:
        items = [(s, len(p) + start, tail) for s, (p, tail) in enumerate(zip(self.prompts, tails))]
        return self._engine._decode(self._ctx, items)

    def _drop(self, keep: int) -> None:
        for s, p in enumerate(self.prompts):
            if not llama_cpp.llama_memory_seq_rm(self._ctx.memory, s, len(p) + keep, -1):
                raise RuntimeError(f"llama.cpp refused to truncate sequence {s}")

    def _release(self) -> None:
        if self._ctx is None:  # closed before its first next_dists: it never took a context
            return
        # the KV holds each prompt and the generated tokens fed so far (-1: the prompt's last
        # dropped; None, a prefill that failed after taking the context, claims the prompt alone)
        n = self._in_cache or 0
        held = [p + self._generated[:n] if n >= 0 else p[:-1] for p in self.prompts]
        self._engine._recycle(self._ctx, self.num_streams, held)


def _common_prefix(prompts: list[list[int]]) -> int:
    first = prompts[0]
    n = len(first)
    for p in prompts[1:]:
        n = min(n, len(p))
        for i in range(n):
            if p[i] != first[i]:
                n = i
                break
    return n


def _kept(held: list[list[int]] | None, prompts: list[list[int]]) -> list[int]:
    """Per sequence, the tokens an idle context's KV saves its new prompt: their common prefix,
    less at least the prompt's last token (its logits are the group's first dists); none for a
    cleared context."""
    if held is None:
        return [0] * len(prompts)
    return [min(_common_prefix([c, p]), len(p) - 1) for c, p in zip(held, prompts)]
