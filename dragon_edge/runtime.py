"""The device runtime: everything one answer needs, wired together.

Per question: retrieve from the private store, lay out one prompt per passage, open the k
local streams, ask the cloud to join over the link (if there is one), and run the device
``Session`` through a ``SessionDriver``. Committed tokens are detokenised incrementally and
streamed out. The cloud sees the query text and the protocol frames, nothing else.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Literal, Sequence

from dragon_core import messages as m
from dragon_core import session as s
from dragon_core import validation as v
from dragon_core.aggregate import log_mass
from dragon_host.driver import SessionDriver
from dragon_core.engine import Engine
from dragon_core.errors import DragonError, InvalidOptions
from dragon_core.handshake import Identity
from dragon_core.prompt import IncrementalText, concatenated_prompt, last_user_message, passage_prompts
from dragon_core.scheduler import initial_aggregator
from dragon_edge.baselines import AnswerMode, LazyGroup, wire_mode

log = logging.getLogger("dragon.edge")

@dataclass
class AnswerOptions:
    max_tokens: int = 128
    k: int = 2  # private passages
    cloud_k: int = 2  # public passages the cloud retrieves
    greedy: bool = True
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0
    mode: AnswerMode = "dragon"  # dragon | vdrag | sw | cloud | text | concat | device (dragon_edge.baselines)
    # "auto": where the scheduler's estimates from earlier requests on this link say (the device
    # when there are none); "device"/"cloud" start there (and stay there if scheduling is off)
    aggregator: m.Side | Literal["auto"] = "auto"
    scheduling: bool = True
    max_depth: int = 32  # the cap of the draft window (dragon_core.scheduler.draft_window)
    # top-K of each side's mixture on the wire (~180 B/token); 0 sends full vectors (exact mode,
    # ~196 kB/token for SmolLM2) — DRAGON is exact w.r.t. the canonical distributions either way
    dist_top_k: int = 32
    use_cloud: bool = True
    emulate_decode_ms: float = 0.0  # experiments: a slower device
    cloud_open_timeout_s: float = 30.0

    def validate(self) -> "AnswerOptions":
        """``InvalidOptions`` (one line, naming the field) for any option out of range or of the
        wrong type; the rules are ``dragon_core.validation``'s, which the cloud applies too."""
        check_answer_options(self)
        return self


MAX_DEVICE_TOKENS = 1 << 15  # a bound on the type; the model's context bounds it further
MAX_PASSAGES = 1024


def check_answer_options(o: AnswerOptions) -> None:
    """Every ``AnswerOptions`` field, once, for the SDK, the CLI and the runtime."""
    v.check_max_tokens(o.max_tokens, MAX_DEVICE_TOKENS)
    v.check_k(o.k, MAX_PASSAGES, lo=0)
    v.check_k(o.cloud_k, MAX_PASSAGES, "cloud_k")
    for name in ("greedy", "scheduling", "use_cloud"):
        if not isinstance(getattr(o, name), bool):
            raise InvalidOptions(name, f"{name} must be true or false, got {getattr(o, name)!r}")
    v.check_temperature(o.temperature)
    v.check_sampling_temperature(o.greedy, o.temperature)
    v.check_top_p(o.top_p)
    v.check_int("top_k", o.top_k, 0, v.MAX_TOP_K)
    v.check_seed(o.seed)
    if not isinstance(o.mode, str):
        raise InvalidOptions("mode", f"mode must be a string, got {o.mode!r}")
    wire_mode(o.mode)  # UnknownMode (a DragonError) names the choices
    if o.aggregator not in ("auto", "device", "cloud"):
        raise InvalidOptions("aggregator", f"aggregator must be auto, device or cloud, got {o.aggregator!r}")
    v.check_int("max_depth", o.max_depth, 1, v.MAX_DEPTH)
    v.check_int("dist_top_k", o.dist_top_k, 0, v.MAX_TOP_K)
    if v.check_number("emulate_decode_ms", o.emulate_decode_ms) < 0:
        raise InvalidOptions("emulate_decode_ms", "emulate_decode_ms must be >= 0")
    if v.check_number("cloud_open_timeout_s", o.cloud_open_timeout_s) <= 0:
        raise InvalidOptions("cloud_open_timeout_s", "cloud_open_timeout_s must be > 0")


def answer_options(max_tokens: int | None = None, temperature: float | None = None, top_p: float | None = None,
                   seed: int | None = None, extra: dict[str, Any] | None = None) -> AnswerOptions:
    """The ``AnswerOptions`` for OpenAI-style arguments plus DRAGON's own, validated once
    (``InvalidOptions`` / ``UnknownMode`` with a one-line message): the SDK, the CLI and
    the local server (``dragon-edge serve``) use it."""
    opts = AnswerOptions()
    if max_tokens is not None:
        opts.max_tokens = max_tokens
    # temperature 0 (or unset) is greedy decoding, as in the OpenAI API's deterministic use
    if temperature is not None:
        v.check_temperature(temperature)
    if temperature:
        opts.greedy, opts.temperature = False, float(temperature)
    if top_p is not None:
        opts.top_p = v.check_top_p(top_p)
    if seed is not None:
        opts.seed = v.check_seed(seed)
    for key, value in (extra or {}).items():
        if not hasattr(opts, key):
            raise TypeError(f"unknown option {key!r}; DRAGON options: {sorted(AnswerOptions.__dataclass_fields__)}")
        setattr(opts, key, value)
    return opts.validate()  # an unknown mode or a bad value fails here, at create(), not at the first chunk


@dataclass
class Source:
    side: str  # "device" (private) or "cloud" (public)
    name: str
    score: float | None = None
    text: str | None = None  # private passages stay local: only shown to the app itself


@dataclass
class AnswerStats:
    mode: str = ""  # the mode that ran ("device" when use_cloud=False); ``degraded``: it had to finish on the device
    tokens: int = 0
    degraded: bool = False
    finish_reason: str = ""
    device_only: bool = False
    ttft_s: float | None = None
    per_token_latency_ms: list[float] = field(default_factory=list)
    acceptance_device: float | None = None
    acceptance_cloud: float | None = None
    rollbacks: int = 0
    handovers: int = 0
    aggregator_steps: dict[str, int] = field(default_factory=dict)
    final_aggregator: str | None = None
    delta_z_ms: float | None = None  # the scheduler's last ΔZ, where this side aggregated
    bytes_sent: int = 0
    bytes_received: int = 0
    sources: list[Source] = field(default_factory=list)
    # the cloud's typed error for this request ({"code", "message"}), e.g. quota_exceeded or
    # request_idle_timeout: the answer then finished on the device (degraded)
    cloud_error: dict | None = None

    @property
    def bytes_per_token(self) -> float:
        return (self.bytes_sent + self.bytes_received) / max(1, self.tokens)

    def as_dict(self) -> dict:
        d = {k: v for k, v in self.__dict__.items() if k != "sources"}
        d["bytes_per_token"] = self.bytes_per_token
        d["sources"] = [{k: v for k, v in src.__dict__.items() if v is not None} for src in self.sources]
        return d


@dataclass
class Piece:
    """One streamed text delta (``text`` may be empty on the final piece)."""

    text: str
    token_ids: tuple[int, ...]
    finished: AnswerStats | None = None


class EdgeRuntime:
    def __init__(self, engine: Engine, tokenizer, identity: Identity, eos_ids: Sequence[int], store=None,
                 link=None) -> None:
        self.engine, self.tokenizer, self.identity = engine, tokenizer, identity
        self.eos_ids = frozenset(eos_ids)
        self.store = store
        self.link = link
        self._local_ids = 0
        self.priors: dict[str, m.SchedulerPrior] = {}  # per cloud URL: the last request's estimates

    # ------------------------------------------------------------------ the answer backend (dragon_http)
    @property
    def max_model_len(self) -> int:
        """The device engine's context per stream, in tokens."""
        return int(getattr(self.engine, "n_ctx", None) or getattr(self.engine, "max_len"))

    async def answer_chat(self, messages: list[dict], **opts: Any):
        """The OpenAI routes' entrance (``dragon_http.answer.AnswerBackend``): a DRAGON answer to
        the last user message, as the SDK gives (``dragon_edge.answer.EdgeAnswer``)."""
        from dragon_edge.answer import EdgeAnswer

        return await EdgeAnswer.start(self, last_user_message(messages), **opts)

    async def answer_text(self, prompt: str, **opts: Any):
        """``/v1/completions``: the prompt is the question (DRAGON lays it out with the passages
        in the chat template on both sides, as the link requires; no raw continuation)."""
        from dragon_edge.answer import EdgeAnswer

        return await EdgeAnswer.start(self, prompt, **opts)

    # ------------------------------------------------------------------ retrieval + prompts
    def private_passages(self, query: str, k: int):
        if self.store is None or k <= 0:
            return []
        return self.store.search(query, k)

    # ------------------------------------------------------------------ answering
    async def answer(self, query: str, opts: AnswerOptions) -> AsyncIterator[Piece]:
        t0 = time.monotonic()
        check_answer_options(opts)  # InvalidOptions / UnknownMode before any work
        v.check_text("query", query)
        mode = wire_mode(opts.mode)
        passages = self.private_passages(query, opts.k)
        prompts, scores = passage_prompts(self.tokenizer, query, [p.text for p in passages],
                                          [p.score for p in passages])
        stats = AnswerStats(mode=opts.mode if opts.use_cloud else "device",  # what runs, as asked
                            sources=[Source("device", p.source, float(p.score), p.text) for p in passages])
        link = self.link if opts.use_cloud and opts.mode != "device" else None
        degraded = False
        if link is not None:
            try:
                await link.connect()
            except DragonError as exc:
                log.warning("answering device-only: %s", exc)
                link, degraded = None, True
        rid = link.new_request_id() if link is not None else self._next_local_id()
        open_msg = m.Open(rid, query, k=opts.cloud_k, max_tokens=opts.max_tokens, seed=opts.seed,
                          sampling=m.Sampling(opts.greedy, opts.temperature, opts.top_k, opts.top_p),
                          mode=mode, scheduling=opts.scheduling, max_depth=opts.max_depth,
                          dist_top_k=opts.dist_top_k, **self._placement(opts, link))
        public = None
        if link is not None and mode == "text":  # DRCG/Text: only the query goes up
            public = await self._public_passages(link, open_msg, opts.cloud_open_timeout_s, stats)
            link, degraded = None, public is None  # the device decodes alone from here on
            if public is not None and opts.mode == "text":
                prompts, scores = passage_prompts(self.tokenizer, query, [p.text for p in passages] + public.passages,
                                                  [p.score for p in passages] + public.scores)
        if opts.mode == "concat":  # DRCG: one prompt, one stream (private only if the cloud gave nothing)
            prompts, scores = [self._concatenated(query, passages, public)], [0.0]
        config = s.SessionConfig.from_open(open_msg, self.eos_ids, vocab_size=self.engine.vocab_size)
        session = s.Session("device", config, log_mass(scores), solo=link is None, degraded=degraded)
        stats.device_only = link is None and public is None
        temperature = opts.temperature if not opts.greedy else 1.0
        # cloud-only: the device's streams are prefilled only if the cloud is lost mid-answer;
        # otherwise the prefill runs in the background while the Open goes up (TTFT: issue 13)
        group = await LazyGroup(self.engine, prompts, temperature, prefill_now=mode != "cloud").started()
        queue: asyncio.Queue[tuple[int, ...] | None] = asyncio.Queue()

        async def send(msg: m.Message) -> None:
            if link is not None:
                await link.send(msg)

        driver = SessionDriver(session, group, scores, send, on_commit=lambda toks: queue.put_nowait(tuple(toks)),
                               emulate_decode_ms=opts.emulate_decode_ms)
        if link is not None:
            if link.rtt_ms is not None:  # the link's latest round trip: the window needs it before any ping
                driver.feed(s.RttSample(link.rtt_ms))
            await link.open(open_msg, driver)
        run = asyncio.create_task(driver.run())
        run.add_done_callback(lambda _: queue.put_nowait(None))
        decoded = IncrementalText(self.tokenizer, self.eos_ids)
        emitted = ""
        last = t0
        try:
            while (toks := await queue.get()) is not None:
                now = time.monotonic()
                stats.ttft_s = stats.ttft_s if stats.ttft_s is not None else now - t0
                stats.per_token_latency_ms.append((now - last) * 1000)
                last = now
                text = decoded.push(toks)
                if text is None:
                    continue  # half a UTF-8 character: wait for the rest
                delta, emitted = text[len(emitted):], text
                yield Piece(delta, toks)
            finish = await run
        finally:
            if not run.done():
                driver.feed(s.CancelRequest("the application stopped reading"))
                await asyncio.gather(run, return_exceptions=True)
            opened = link.opened_now(rid) if link is not None else None
            if link is not None:
                traffic = link.release(rid)  # this request's frames only: answers may share the link
            await group.close()
        if opened is not None:
            stats.sources += [Source("cloud", name) for name in opened.sources]
        if link is not None:
            stats.bytes_sent, stats.bytes_received = traffic.sent, traffic.received
        self._fill_stats(stats, session, finish)
        if mode == "cloud" and not stats.degraded:  # the private passages were never used
            stats.sources = [src for src in stats.sources if src.side == "cloud"]
        # only modes where both sides draft measure what the scheduler needs (cloud-only and text don't)
        if link is not None and mode in ("dragon", "vdrag", "sw") and not stats.degraded \
                and (prior := session.scheduler.estimates.prior("device")):
            self.priors[link.url] = prior
        yield Piece(decoded.text()[len(emitted):], (), finished=stats)

    def _fill_stats(self, stats: AnswerStats, session: s.Session, finish: s.Finish) -> None:
        st = session.stats
        stats.tokens = len(session.committed)
        stats.degraded = finish.degraded or session.degraded
        stats.finish_reason = finish.reason
        stats.rollbacks = st.rollbacks
        # moves either way (the device's own count misses those the cloud made)
        stats.handovers = sum(a != b for a, b in zip(st.aggregator_by_step, st.aggregator_by_step[1:]))
        stats.final_aggregator = session.aggregator
        if session.peer_error is not None:
            stats.cloud_error = dict(code=session.peer_error.code, message=session.peer_error.message)
        stats.delta_z_ms = session.scheduler.last_delta_z
        for side in st.aggregator_by_step:
            stats.aggregator_steps[side] = stats.aggregator_steps.get(side, 0) + 1
        if st.verified:
            stats.acceptance_device = st.accepted_local / st.verified
            stats.acceptance_cloud = st.accepted_remote / st.verified

    async def _public_passages(self, link, open_msg: m.Open, timeout_s: float, stats: AnswerStats) -> m.Opened | None:
        """DRCG/Text: the cloud's top-k public passages (None, logged, if it cannot give them)."""
        try:
            opened = await link.fetch_passages(open_msg, timeout_s)
        except DragonError as exc:
            log.warning("DRCG/Text got no public passages, answering device-only: %s", exc)
            return None
        finally:
            traffic = link.release(open_msg.request_id)  # this request's frames only
            stats.bytes_sent, stats.bytes_received = traffic.sent, traffic.received
        k = open_msg.k  # a cloud sending more than asked does not get to fill the device's context
        opened = m.Opened(opened.request_id, opened.sources[:k], opened.passages[:k], opened.scores[:k])
        stats.sources += [Source("cloud", name, score, text)
                          for name, text, score in zip(opened.sources, opened.passages, opened.scores)]
        return opened

    def _concatenated(self, query: str, passages, public: m.Opened | None) -> list[int]:
        """DRCG's one prompt: private and public passages together, best score first (the
        scores are comparable across sides: one retriever contract)."""
        ranked = [(float(p.score), p.text) for p in passages]
        if public is not None:
            ranked += [(float(sc), text) for text, sc in zip(public.passages, public.scores)]
        ranked.sort(key=lambda t: -t[0])  # stable: ties keep private before public
        return concatenated_prompt(self.tokenizer, query, [text for _, text in ranked])

    def _placement(self, opts: AnswerOptions, link) -> dict:
        """The first aggregator, and the prior both sides' schedulers start from."""
        # the prior goes up even when the aggregator is pinned: both sides size their draft
        # window from its RTT and paces from the first token on (scheduler.draft_window)
        prior = self.priors.get(link.url) if link is not None else None
        aggregator = opts.aggregator
        if aggregator == "auto":
            aggregator = initial_aggregator(prior, max_tokens=opts.max_tokens) if opts.scheduling else "device"
        return dict(aggregator=aggregator, prior=prior)

    def _next_local_id(self) -> int:
        self._local_ids += 1
        return self._local_ids

    async def close(self) -> None:
        if self.link is not None:
            await self.link.close()
        await self.engine.close()
