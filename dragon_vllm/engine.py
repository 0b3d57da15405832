"""The cloud engine: per-document streams of all requests as streaming-input sessions of ONE
vLLM ``AsyncLLM``, so vLLM's scheduler batches every user's per-document decoding.

One session per (request, document). A group advances in lockstep: the chosen token(s) go to
all k sessions as one input chunk each (``max_tokens=1``), and each session's single output
brings the top-K log-probs of its next position. vLLM discards the token it sampled for the
previous chunk, so the caller alone decides what is appended (docs/ENGINES.md §3).

* Temperature: the engine runs with ``logprobs_mode="processed_logprobs"``, so the returned
  log-probs are ``log_softmax(z / T)`` — the per-document ``p_d`` of docs/ALGORITHMS.md — not the
  raw ``T = 1`` values. No top-k/top-p/penalties are ever sent to vLLM, so nothing else is
  folded in.
* Rollback: vLLM has no public truncate, so by default the no-patch path: abort the sessions and
  reopen them with ``prompt + accepted`` at the next advance; the prefix cache restores every
  full block, only the partial tail block and the new tokens are recomputed. Opt-in for gangs,
  ``make_engine(rollback="in_place")``: the gang scheduler truncates the sessions in place
  (``drafting.py``, ``gang.py``, ``rewind.py``), where it was verified; measured slower than the
  reopen on both engines (README), so not the default.
* Admission (``dragon_vllm.admission``): a group's k streams are admitted together, within
  ``max_num_seqs`` and a KV budget, so paused sessions can never starve each other.

Two kinds of group come out of ``VllmEngine.open_group``:

* with retrieval scores on a mixing engine (the default, ``make_engine(mixing=True)``): a
  ``GangStreamGroup`` (``drafting.py``): mixed and drafted inside vLLM, several tokens per chunk;
* otherwise the per-document ``VllmStreamGroup`` below (``--per-document``, the references, the
  engine tests): one engine round trip per token, top-K (or, with ``doc_top_k=-1``, every id) per
  document, mixed by the caller.
"""

from __future__ import annotations

import asyncio
import itertools
import os
from typing import TYPE_CHECKING, AsyncIterator, Sequence

import numpy as np

from dragon_core.dist import Dist
from dragon_vllm.admission import Admission, Ticket, admission_share
from dragon_vllm.drafting import GangStreamGroup
from dragon_vllm.group import CloudGroup
from dragon_vllm.plugin import LOGITS_PROCESSOR, SCHEDULER_CLS, SYNC_SCHEDULER_CLS
from dragon_vllm.streaming import input_chunks, top_k_at

if TYPE_CHECKING:
    from dragon_vllm.vllm_frontends import FrontendSeat

MIN_VLLM = (0, 26)  # streaming-input sessions, flat_logprobs, processed_logprobs, tokens_input
ROLLBACKS = ("reopen", "in_place")
ALLOW_UNVERIFIED_ROLLBACK = "DRAGON_ALLOW_UNVERIFIED_ROLLBACK"


class UnverifiedRollback(RuntimeError):
    """``rollback="in_place"`` on a vLLM version (or scheduler) the truncation was not verified on."""


def check_rollback(rollback: str, version: tuple[int, int] | None = None, async_scheduling: bool | None = None) -> str:
    """The rollback mode, normalised (``in-place`` = ``in_place``). ``in_place`` on a vLLM version
    or scheduler ``dragon_vllm.rewind.VERIFIED`` does not list is refused, unless
    DRAGON_ALLOW_UNVERIFIED_ROLLBACK=1 (then a warning). ``async_scheduling`` None: not known yet
    (the CLI's early check): only the version is checked."""
    from dragon_vllm.rewind import verified_for

    mode = rollback.replace("-", "_")
    if mode not in ROLLBACKS:
        raise ValueError(f"rollback must be one of {', '.join(ROLLBACKS)}, not {rollback!r}")
    if mode == "in_place":
        version = version or vllm_version()
        ok, where = verified_for(version, async_scheduling)
        if not ok:
            have = ".".join(map(str, version)) + (" with async scheduling" if async_scheduling else "")
            if os.environ.get(ALLOW_UNVERIFIED_ROLLBACK) != "1":
                raise UnverifiedRollback(
                    f"rollback in place was verified on {where} only, not on vLLM {have}: use "
                    f"rollback='reopen' (the default), or set {ALLOW_UNVERIFIED_ROLLBACK}=1 to run it unverified "
                    "(then run tests/engines/test_rollback_in_place.py on this version first)")
            import logging

            logging.getLogger("dragon.rewind").warning(
                "rollback in place on vLLM %s, verified on %s only (%s=1)", have, where, ALLOW_UNVERIFIED_ROLLBACK)
    return mode


def vllm_version() -> tuple[int, int]:
    import vllm

    major, minor = vllm.__version__.split(".")[:2]
    return int(major), int(minor)


class _Session:
    """One vLLM streaming-input session: feed a chunk of token ids, get one position's top-K."""

    def __init__(self, llm, request_id: str, first: list[int], params) -> None:
        self._inbox: asyncio.Queue[list[int] | None] = asyncio.Queue()
        self._inbox.put_nowait(first)
        self._outputs: AsyncIterator = llm.generate(input_chunks(self._inbox), params, request_id)
        self.prompt_len = len(first)
        self.num_cached_tokens = 0

    def feed(self, ids: Sequence[int]) -> None:
        self._inbox.put_nowait(list(ids))

    async def read(self, top_k: int) -> tuple[np.ndarray, np.ndarray]:
        """(ids, log-probs) of the newest position: its top-K, or every id for ``top_k = -1``."""
        out = await self._outputs.__anext__()
        self.num_cached_tokens = max(self.num_cached_tokens, int(out.num_cached_tokens or 0))
        return top_k_at(out.outputs[0].logprobs, -1, top_k)

    async def abort(self) -> None:
        # closing vLLM's generate() aborts the request and cancels the task reading our chunks
        await self._outputs.aclose()


class VllmStreamGroup(CloudGroup):
    """The k document streams of one request (``dragon_core.engine.StreamGroup``)."""

    def __init__(self, engine: "VllmEngine", gid: int, prompts: list[list[int]], temperature: float,
                 ticket: Ticket, doc_top_k: int | None = None) -> None:
        super().__init__(engine, gid, prompts, temperature, ticket)
        # log-probs per document: the engine's top-K, or -1: the whole vocabulary (references only)
        self.doc_top_k = engine.logprobs_k if doc_top_k is None else doc_top_k
        self._sessions: list[_Session] | None = None
        self._fed = 0  # generated tokens the open sessions hold
        self._dists: list[Dist] | None = None  # distributions at position len(_generated), if read

    async def next_dists(self) -> list[Dist]:
        return await self.advance(())

    async def append(self, tokens: Sequence[int]) -> None:
        # lazy: the tokens travel with the next read, so append + read is one engine round trip
        if tokens:
            self._check_open()
            self._extend(tokens)
            self._dists = None

    async def advance(self, tokens: Sequence[int]) -> list[Dist]:
        """Append ``tokens`` to every stream and return each stream's next distribution."""
        await self.append(tokens)
        self._check_open()
        if self._dists is not None:
            return self._dists
        opened = self._sessions is None
        if opened:
            self._open_sessions()
        else:
            new = self._generated[self._fed:]
            for session in self._sessions:
                session.feed(new)
        self._fed = len(self._generated)
        results = await asyncio.gather(*(s.read(self.doc_top_k) for s in self._sessions))
        if opened:
            self._record_cache_hits()
        self._dists = [self._as_dist(ids, lps) for ids, lps in results]
        return self._dists

    def _as_dist(self, ids: np.ndarray, lps: np.ndarray) -> Dist:
        vocab = self._engine.vocab_size
        if self.doc_top_k >= 0:
            return Dist.from_top_k(vocab, ids, lps)
        full = np.full(vocab, -np.inf)
        full[ids] = lps
        return Dist.full(full)

    async def rollback(self, length: int) -> None:
        self._check_open()
        if not self._truncate(length):
            return
        self._dists = None
        if length < self._fed:  # the sessions' KV holds tokens past the accepted prefix
            await self._abort()
            self.reopens += 1
            self._engine._stats["reopens"] += 1

    # ------------------------------------------------------------------ internals
    def _open_sessions(self) -> None:
        epoch = next(self._epoch)
        self._sessions = [
            _Session(self._engine.llm, f"dragon-{self._gid}-{i}-{epoch}", p + self._generated,
                     self._engine._params(self.temperature, self.doc_top_k))
            for i, p in enumerate(self.prompts)
        ]

    def _record_cache_hits(self) -> None:
        stats = self._engine._stats
        for i, s in enumerate(self._sessions):
            self.num_cached_tokens[i] = s.num_cached_tokens
            stats["cached_tokens"] += s.num_cached_tokens
            stats["prompt_tokens"] += s.prompt_len

    async def _abort(self) -> None:
        sessions, self._sessions, self._fed = self._sessions, None, 0
        if sessions:
            await asyncio.gather(*(s.abort() for s in sessions), return_exceptions=True)

class VllmEngine:
    """``dragon_core.engine.Engine`` on one shared ``AsyncLLM``."""

    def __init__(self, llm, *, logprobs_k: int, max_streams: int, kv_reserve_tokens: int, mixing: bool = False,
                 chunk_tokens: int = 0, rollback: str = "reopen") -> None:
        self.llm = llm
        self.rollback = rollback  # "reopen" (abort + reopen) or "in_place" (gangs only; see drafting.py)
        self.logprobs_k = logprobs_k  # log-probs read from vLLM per stream and step (not a request's top_k)
        self.mixing = mixing  # the gang path: streams mixed and drafted inside vLLM (drafting.py)
        self.chunk_tokens = chunk_tokens
        cache = llm.vllm_config.cache_config
        self.block_size: int = cache.block_size
        self.max_model_len: int = llm.model_config.max_model_len
        self._vocab = int(llm.model_config.get_vocab_size())
        self.kv_reserve_tokens = kv_reserve_tokens
        self.admission = Admission(max_streams, int(cache.num_gpu_blocks or 1))
        self._gids = itertools.count()
        self._stats = dict(groups=0, reopens=0, prompt_tokens=0, cached_tokens=0, chunks=0, repairs=0, rewinds=0)
        sched = llm.vllm_config.scheduler_config
        self.max_batch_tokens: int = int(getattr(sched, "max_num_scheduled_tokens", None) or sched.max_num_batched_tokens)

    @property
    def top_k(self) -> int:
        """The old name of ``logprobs_k`` (callers written before the three top-Ks were named)."""
        return self.logprobs_k

    @property
    def vocab_size(self) -> int:
        return self._vocab

    async def open_group(self, prompts: Sequence[Sequence[int]], temperature: float = 1.0,
                         scores: Sequence[float] | None = None, max_tokens: int | None = None,
                         doc_top_k: int | None = None) -> "VllmStreamGroup | GangStreamGroup":
        """The k streams of one request. With ``scores`` on a mixing engine: a gang, mixed and
        drafted inside vLLM (``next_side_dist``); otherwise per-document streams (``next_dists``)."""
        prompts = [[int(t) for t in p] for p in prompts]
        if not prompts or any(not p for p in prompts):
            raise ValueError("open_group needs at least one non-empty prompt")
        if (longest := max(map(len, prompts))) >= self.max_model_len:
            raise ValueError(f"prompt of {longest} tokens does not fit the context of {self.max_model_len}")
        gang = self.mixing and scores is not None
        if gang and sum(map(len, prompts)) + self.kv_reserve_tokens > self.max_batch_tokens:
            # a gang is scheduled whole in one step, so its prompts must fit one step's token budget
            raise ValueError(f"{len(prompts)} prompts of {sum(map(len, prompts))} tokens in all exceed the engine's "
                             f"per-step budget of {self.max_batch_tokens} tokens (raise max_num_batched_tokens)")
        ticket = await self.admission.acquire(len(prompts), self._blocks(prompts))
        self._stats["groups"] += 1
        # T <= 0 means greedy; the argmax is the same at any T, and T = 1 keeps the log-probs finite
        temperature = float(temperature) if temperature > 0 else 1.0
        if gang:
            room = self.max_model_len - longest
            budget = min(max_tokens or room, room - 1)
            return GangStreamGroup(self, next(self._gids), prompts, scores, temperature, ticket,
                                   self._chunk_for(longest, max_tokens) if self.chunk_tokens else 0, budget)
        return VllmStreamGroup(self, next(self._gids), prompts, temperature, ticket, doc_top_k)

    def _chunk_for(self, longest: int, max_tokens: int | None) -> int:
        """Tokens drafted per chunk: the engine's setting, less where the context would overflow
        (a chunk may draft past ``max_tokens``; vLLM 0.26 keeps a session's first chunk size)."""
        room = self.max_model_len - longest - (max_tokens or 0)
        return max(1, min(self.chunk_tokens, room))

    def stats(self) -> dict:
        return dict(self._stats, open_streams=self.admission.slots, queued_groups=self.admission.queued,
                    reserved_blocks=self.admission.blocks)

    async def close(self) -> None:
        llm, self.llm = self.llm, None
        if llm is not None:
            llm.shutdown()
            # AsyncLLM.__del__ shuts down again; at interpreter exit that raises (its module
            # globals are gone already), so make the second call a no-op
            llm.shutdown = lambda *args, **kwargs: None

    def _blocks(self, prompts: list[list[int]]) -> int:
        # a conservative KV reservation (shared prefix blocks are counted once per stream)
        per = [-(-(len(p) + self.kv_reserve_tokens) // self.block_size) for p in prompts]
        return sum(per)

    def _release(self, ticket: Ticket) -> None:
        self.admission.release(ticket)

    def _gang_params(self, chunk_tokens: int, *, leader: bool, extra: dict, parity: int | None = None):
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        # greedy in vLLM: the processor already applied 1/T and wrote the mixture, so every row
        # takes its argmax; only the leader returns the (mixture's) top-K. Rollback in place
        # (``parity`` given): the other rows return their sampled log-prob, which marks the chunk
        if parity is None:
            logprobs = self.logprobs_k if leader else None
        else:
            logprobs = self.logprobs_k if leader else 0
        return SamplingParams(max_tokens=chunk_tokens, temperature=0.0, ignore_eos=True,
                              logprobs=logprobs, flat_logprobs=True, detokenize=False,
                              output_kind=RequestOutputKind.DELTA, extra_args=extra)

    def _params(self, temperature: float, top_k: int):
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        return SamplingParams(max_tokens=1, temperature=temperature, logprobs=top_k, flat_logprobs=True,
                              detokenize=False, output_kind=RequestOutputKind.DELTA)


def make_engine(model_dir: str, *, logprobs_k: int = 20, top_k: int | None = None, max_num_seqs: int = 128,
                max_streams: int | None = None,
                max_model_len: int = 2048, block_size: int = 32, dtype: str = "auto",
                enforce_eager: bool | None = None, kv_cache_gib: int | None = None,
                gpu_memory_utilization: float | None = None, kv_reserve_tokens: int = 256, seed: int = 0,
                mixing: bool = True, chunk_tokens: int = 0, max_num_batched_tokens: int | None = None,
                max_logprobs: int | None = None, rollback: str = "reopen", api_server: "FrontendSeat | None" = None,
                **engine_kwargs) -> VllmEngine:
    """Start the shared ``AsyncLLM`` for DRAGON streams.

    ``max_num_seqs`` is set explicitly (an ``AsyncLLM`` without a usage context would get 128
    whatever the hardware); ``max_streams`` (default: ``max_num_seqs``) caps the open streams.
    ``block_size`` must be a multiple of 32 on CPU; documents are padded to it by the prompt
    layout so their KV blocks are shared across requests.

    ``mixing`` (the default) installs the gang scheduler and the mixing logits processor, so a
    group opened with retrieval scores is mixed and drafted inside vLLM, ``chunk_tokens`` tokens
    per chunk, or (0, the default) until the session leaves the gang's path (``drafting.py``). A gang is scheduled whole in one step, so the per-step token
    budget ``max_num_batched_tokens`` (default: 4 contexts) must hold a request's prompts.

    ``logprobs_k``: log-probs read per stream and step (``top_k`` is its old name, still taken).

    ``rollback``: ``"reopen"`` (the default: a rejected draft aborts the gang and reopens it; the
    faster of the two, measured: benchmarks/results/vllm_streams_h200_rollback.json) or
    ``"in_place"`` (the gang scheduler truncates the rows' sessions in place; gangs only; refused
    where it was not verified, ``check_rollback``).

    ``api_server`` (``dragon-cloud serve --api-servers N``, ``dragon_vllm/api_servers.py``): this
    process is one of N front ends; its ``AsyncLLM`` joins the engine core the supervisor started
    (``vllm_frontends.FrontendSeat``) instead of starting one. The config is built the same way.
    """
    logprobs_k = logprobs_k if top_k is None else top_k
    config, rollback = engine_config(model_dir, logprobs_k=logprobs_k, max_num_seqs=max_num_seqs,
                                     max_model_len=max_model_len, block_size=block_size, dtype=dtype,
                                     enforce_eager=enforce_eager, kv_cache_gib=kv_cache_gib,
                                     gpu_memory_utilization=gpu_memory_utilization, seed=seed, mixing=mixing,
                                     max_num_batched_tokens=max_num_batched_tokens, max_logprobs=max_logprobs,
                                     rollback=rollback, api_processes=api_server.processes if api_server else None,
                                     **engine_kwargs)
    if api_server is None:
        from vllm.v1.engine.async_llm import AsyncLLM

        llm = AsyncLLM.from_vllm_config(config, disable_log_stats=True)
    else:
        llm = api_server.connect(config)
    engine = VllmEngine(llm, logprobs_k=logprobs_k, max_streams=min(max_streams or max_num_seqs, max_num_seqs),
                        kv_reserve_tokens=kv_reserve_tokens, mixing=mixing, chunk_tokens=chunk_tokens,
                        rollback=rollback)
    if api_server is not None:  # one of N processes on one engine core
        engine.admission = admission_share(engine.admission, api_server.count)  # why: admission_share
        # the engine core sees every process's requests, and a group's vLLM request ids and gang key
        # (dragon-<group>-...) are built from _gids: process i numbers its groups i, i + N, i + 2N, ...
        engine._gids = itertools.count(api_server.index, api_server.count)
    return engine


def engine_config(model_dir: str, *, logprobs_k: int = 20, max_num_seqs: int = 128, max_model_len: int = 2048,
                  block_size: int = 32, dtype: str = "auto", enforce_eager: bool | None = None,
                  kv_cache_gib: int | None = None, gpu_memory_utilization: float | None = None, seed: int = 0,
                  mixing: bool = True, max_num_batched_tokens: int | None = None, max_logprobs: int | None = None,
                  rollback: str = "reopen", api_processes: tuple[int, int] | None = None, headless: bool = False,
                  **engine_kwargs):
    """``make_engine``'s vLLM config and its rollback mode, checked: ``(VllmConfig, rollback)``.
    ``api_processes`` = (count, rank): set for several API servers (rank -1: the supervisor that
    starts the engine core, ``vllm_frontends.set_api_process``). ``headless``: the config of a
    node that runs data-parallel engine cores for another node's client (``dragon_vllm.headless``)."""
    from dragon_vllm.plugin import register

    register()  # the version gate, also where the package is not installed (PYTHONPATH on the GPU machine)
    if vllm_version() < MIN_VLLM:
        raise RuntimeError(f"vLLM >= {'.'.join(map(str, MIN_VLLM))} is required for streaming-input sessions")
    rollback = check_rollback(rollback)
    if rollback == "in_place" and not mixing:
        raise ValueError("rollback='in_place' needs the in-engine path (mixing=True)")

    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.platforms import current_platform

    on_cpu = current_platform.is_cpu()
    if on_cpu:
        # the CPU worker refuses to start without a KV size; read at engine start
        # (whole GiB: vLLM parses it as an int)
        os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(int(kv_cache_gib or os.environ.get("VLLM_CPU_KVCACHE_SPACE") or 1))
    if gpu_memory_utilization is not None:
        engine_kwargs["gpu_memory_utilization"] = gpu_memory_utilization
    args = AsyncEngineArgs(
        model=str(model_dir), tokenizer=str(model_dir), dtype=dtype, seed=seed,
        max_model_len=max_model_len, block_size=block_size, enable_prefix_caching=True,
        max_num_seqs=max_num_seqs, max_logprobs=max_logprobs or max(logprobs_k, 20), logprobs_mode="processed_logprobs",
        enforce_eager=on_cpu if enforce_eager is None else enforce_eager,
        disable_log_stats=True, max_num_batched_tokens=max_num_batched_tokens or 4 * max_model_len,
        logits_processors=[LOGITS_PROCESSOR] if mixing else None, **engine_kwargs,
    )
    if api_processes is not None:
        from dragon_vllm.vllm_frontends import set_api_process

        set_api_process(args, *api_processes)
    config = args.create_engine_config(headless=True) if headless else args.create_engine_config()
    if mixing:
        sched = config.scheduler_config
        sched.scheduler_cls = SCHEDULER_CLS if sched.async_scheduling else SYNC_SCHEDULER_CLS
    rollback = check_rollback(rollback, async_scheduling=bool(config.scheduler_config.async_scheduling))
    return config, rollback
