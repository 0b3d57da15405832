"""The device runtime: everything one answer needs, wired together.

Per question: retrieve from the private store, lay out the prompts as the mode says
(``dragon_core.modes``), open the k local streams, ask the cloud to join over the link (if there
is one) with the request's ``RequestSpec``, and run the device ``Session`` as an
``AnswerStream`` (driver, text deltas, stop strings, cancellation). The cloud sees the query
text and the protocol frames, nothing else.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, AsyncIterator, Literal, Sequence

from dragon_core import iterative
from dragon_core import messages as m
from dragon_core import session as s
from dragon_core import validation as v
from dragon_core.aggregate import log_mass
from dragon_core.connection import Traffic
from dragon_core.engine import Engine
from dragon_core.errors import DragonError, InvalidOptions
from dragon_core.handshake import Identity
from dragon_core.modes import AnswerMode, ModeRule, mode_rule
from dragon_core.prompt import concatenated_prompt, last_user_message, passage_prompts
from dragon_core.request import RequestSpec
from dragon_core.scheduler import initial_aggregator
from dragon_edge.baselines import LazyGroup
from dragon_edge.engines.common import Worker
from dragon_edge.stats import AnswerStats, Source, Timing, answer_stats
from dragon_host.answer_stream import AnswerStream
from dragon_host.documents import Documents
from dragon_host.slow_group import slowed

__all__ = ["AnswerOptions", "AnswerStats", "EdgeRuntime", "Piece", "Source", "answer_options", "check_answer_options"]

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
    mode: AnswerMode = "dragon"  # dragon | vdrag | sw | cloud | text | concat | device (dragon_core.modes)
    # "auto": where the scheduler's estimates from earlier requests on this link say (the device
    # when there are none); "device"/"cloud" start there (and stay there if scheduling is off)
    aggregator: m.Side | Literal["auto"] = "auto"
    scheduling: bool = True
    max_depth: int = 32  # the cap of the draft window (dragon_core.scheduler.draft_window)
    # top-K of each side's mixture on the wire (~180 B/token); 0 sends full vectors (exact mode,
    # ~196 kB/token for SmolLM2) — DRAGON is exact w.r.t. the canonical distributions either way
    dist_top_k: int = 32
    use_cloud: bool = True
    # CONCORD (mode="concord", greedy only; docs/CONCORD.md): the device waits for the cloud's
    # evidence while its waiting debt is <= concord_debt_max (inf: every step, exact dense greedy
    # DRAGON; -inf: never, device-only); concord_top_m: entries the cloud's evidence lists per step
    concord_debt_max: float = 4.0
    concord_top_m: int = 1
    # iterative retrieval (dragon_core.iterative): both sides retrieve again every n generated
    # tokens, the question and the answer so far as the query (0: once, before the answer)
    retrieve_every: int = 0
    emulate_decode_ms: float = 0.0  # experiments: a slower device
    cloud_open_timeout_s: float = 30.0

    def spec(self, query: str, *, aggregator: m.Side, prior: m.SchedulerPrior | None) -> RequestSpec:
        """The request as both sides see it (the first aggregator and the prior: ``_placement``)."""
        return RequestSpec(query=query, k=self.cloud_k, max_tokens=self.max_tokens, seed=self.seed,
                           sampling=m.Sampling(self.greedy, self.temperature, self.top_k, self.top_p),
                           mode=mode_rule(self.mode).wire, aggregator=aggregator, scheduling=self.scheduling,
                           max_depth=self.max_depth, dist_top_k=self.dist_top_k, prior=prior,
                           concord_top_m=self.concord_top_m, concord_debt_max=float(self.concord_debt_max),
                           retrieve_every=self.retrieve_every)

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
    mode_rule(o.mode)  # UnknownMode (a DragonError) names the choices
    v.check_concord(o.mode, o.greedy, o.concord_debt_max, o.concord_top_m)
    v.check_retrieve_every(mode_rule(o.mode).wire, o.retrieve_every)
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
    # temperature 0 (or unset, or below vLLM's epsilon) is greedy decoding, as in the OpenAI API's
    # deterministic use
    if temperature is not None:
        v.check_temperature(temperature)
    if not v.temperature_is_greedy(temperature):
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
class Piece:
    """One streamed text delta (``text`` may be empty on the final piece)."""

    text: str
    token_ids: tuple[int, ...]
    finished: AnswerStats | None = None


@dataclass
class _Plan:
    """One answer, decided before its decode starts (``EdgeRuntime._plan``)."""

    rule: ModeRule
    spec: RequestSpec
    rid: int
    passages: list  # the private passages retrieved
    prompts: list[list[int]]  # the device's streams, laid out as the mode says
    scores: list[float]
    link: Any  # the CloudLink the answer runs over; None: the device decodes alone
    degraded: bool  # the cloud was wanted and could not be had
    public: m.Opened | None = None  # DRCG/Text: the cloud's public passages (text)
    opened: m.Opened | None = None  # what the cloud said when it joined (its sources)
    traffic: Traffic | None = None  # this request's bytes on the link


class EdgeRuntime:
    def __init__(self, engine: Engine, tokenizer, identity: Identity, eos_ids: Sequence[int], store=None,
                 link=None) -> None:
        self.engine, self.tokenizer, self.identity = engine, tokenizer, identity
        self.eos_ids = frozenset(eos_ids)
        self.store = store
        self.link = link
        self._local_ids = 0
        # the private store's searches run here, off the event loop: embedding a query takes
        # tens of ms on a CPU, and the loop meanwhile serves other answers' tokens and the link
        self._store_worker = Worker("private-store")
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
        """The top-``k`` private passages for ``query`` (blocking; ``find_private`` is the
        event loop's way)."""
        if self.store is None or k <= 0:
            return []
        return self.store.search(query, k)

    async def find_private(self, query: str, k: int):
        """``private_passages`` on the store's own thread (the store is thread-safe: one lock)."""
        return await self._store_worker.run(self.private_passages, query, k)

    # ------------------------------------------------------------------ answering
    async def answer(self, query: str, opts: AnswerOptions, stops: Sequence[str] = ()) -> AsyncIterator[Piece]:
        """The answer's text as tokens commit, then a last piece with the stats; ``stops``:
        stop strings (the answer ends before the first, with its decode cancelled)."""
        timing = Timing(time.monotonic())
        plan = await self._plan(query, opts)
        stream = await self._start(plan, opts, stops)
        tail = ""
        try:
            async for delta in stream.deltas():
                if not delta.tokens:  # the session finished: the text left, with the stats below
                    tail = delta.text
                    continue
                timing.token(delta.at)
                yield Piece(delta.text, delta.tokens)  # text may be empty: half a character, a held tail
            finish = await stream.finish()
        finally:
            await self._end(plan, stream)
        yield Piece(tail, (), finished=self._finished(plan, opts, stream, finish, timing))

    async def _plan(self, query: str, opts: AnswerOptions) -> "_Plan":
        """Everything decided before decoding: the mode, the private passages, the link (or
        none), the request's spec and id, and for DRCG the cloud's public passages."""
        check_answer_options(opts)  # InvalidOptions / UnknownMode before any work
        v.check_text("query", query)
        rule = mode_rule(opts.mode)
        passages = await self.find_private(query, opts.k)
        prompts, scores = self._prompts(rule, query, passages, None)
        link, degraded = await self._connect(opts, rule)
        rid = link.new_request_id() if link is not None else self._next_local_id()
        plan = _Plan(rule, opts.spec(query, **self._placement(opts, link)), rid, passages, prompts, scores,
                     link, degraded)
        if link is not None and rule.crosses == "passages":  # DRCG: only the query goes up
            plan.public, plan.traffic = await self._public_passages(link, plan.spec.to_open(rid),
                                                                    opts.cloud_open_timeout_s)
            plan.link, plan.degraded = None, plan.public is None  # the device decodes alone from here on
            if plan.public is not None:
                plan.prompts, plan.scores = self._prompts(rule, query, passages, plan.public)
        return plan

    async def _start(self, plan: "_Plan", opts: AnswerOptions, stops: Sequence[str]) -> AnswerStream:
        """The device's session on its streams, running, with the cloud joined over the link."""
        spec, link = plan.spec, plan.link
        config = s.SessionConfig.from_spec(spec, plan.rid, self.eos_ids, vocab_size=self.engine.vocab_size)
        session = s.Session("device", config, log_mass(plan.scores), solo=link is None, degraded=plan.degraded)
        # cloud-only: the device's streams are prefilled only if the cloud is lost mid-answer;
        # otherwise the prefill runs in the background while the Open goes up (TTFT: issue 13)
        lazy = await LazyGroup(self.engine, plan.prompts, spec.engine_temperature,
                               prefill_now=plan.rule.device_prefills).started()
        stream = AnswerStream(session, slowed(lazy, opts.emulate_decode_ms), plan.scores, _sender(link),
                              self.tokenizer, self.eos_ids, stops, documents=self._documents(plan, opts),
                              first_documents=Documents(tuple(p.id for p in plan.passages),
                                                        tuple(float(p.score) for p in plan.passages)))
        if link is not None:
            if link.rtt_ms is not None:  # the link's latest round trip: the window needs it before any ping
                stream.driver.feed(s.RttSample(link.rtt_ms))
            await link.open(spec.to_open(plan.rid), stream.driver)
        return stream.start()

    async def _end(self, plan: "_Plan", stream: AnswerStream) -> None:
        """Stop the decode if it still runs, give the request back to the link (what the cloud
        said when it opened, and this request's bytes), free the streams."""
        await stream.cancel()
        if plan.link is not None:
            plan.opened = plan.link.opened_now(plan.rid)
            plan.traffic = plan.link.release(plan.rid)
        await stream.close()

    def _finished(self, plan: "_Plan", opts: AnswerOptions, stream: AnswerStream, finish: s.Finish,
                  timing: Timing) -> AnswerStats:
        """The answer's stats, and the scheduler's estimates kept for the next request here."""
        link, session = plan.link, stream.session
        stats = answer_stats(mode=opts.mode if opts.use_cloud else "device", rule=plan.rule,  # what runs, as asked
                             private=plan.passages, public=plan.public, opened=plan.opened,
                             device_only=link is None and plan.public is None, session=session, finish=finish,
                             timing=timing, traffic=plan.traffic)
        docs = stream.driver.documents
        stats.retrievals = docs.stats.retrievals if docs is not None else 0
        if link is not None and plan.rule.both_draft and not stats.degraded \
                and (prior := session.scheduler.estimates.prior("device")):
            self.priors[link.url] = prior
        return stats

    async def _connect(self, opts: AnswerOptions, rule: ModeRule):
        """The link this answer uses (None: device-only), and whether that is a degradation."""
        link = self.link if opts.use_cloud and rule.uses_link else None
        if link is None:
            return None, False
        try:
            await link.connect()
        except DragonError as exc:
            log.warning("answering device-only: %s", exc)
            return None, True
        return link, False

    def _documents(self, plan: "_Plan", opts: AnswerOptions) -> "PrivateDocuments | None":
        """Iterative retrieval over the private store (None: retrieve once)."""
        if not (opts.retrieve_every and opts.k and plan.rule.prompts == "per_passage"):
            return None
        return PrivateDocuments(self, plan, opts)

    def _prompts(self, rule: ModeRule, query: str, passages, public: m.Opened | None):
        """The device's prompts and their scores, laid out as the mode says."""
        if rule.prompts == "concatenated":  # DRCG: one prompt, one stream
            return [self._concatenated(query, passages, public)], [0.0]
        texts, scores = [p.text for p in passages], [p.score for p in passages]
        if rule.prompts == "with_public" and public is not None:
            texts, scores = texts + public.passages, scores + public.scores
        return passage_prompts(self.tokenizer, query, texts, scores)

    async def _public_passages(self, link, open_msg: m.Open, timeout_s: float):
        """DRCG/Text: the cloud's top-k public passages (None, logged, if it cannot give them),
        and the bytes that request took on the link."""
        opened = None
        try:
            opened = await link.fetch_passages(open_msg, timeout_s)
        except DragonError as exc:
            log.warning("DRCG/Text got no public passages, answering device-only: %s", exc)
        finally:
            traffic = link.release(open_msg.request_id)
        if opened is None:
            return None, traffic
        k = open_msg.k  # a cloud sending more than asked does not get to fill the device's context
        return m.Opened(opened.request_id, opened.sources[:k], opened.passages[:k], opened.scores[:k]), traffic

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
        self._store_worker.shutdown()


def _sender(link):
    """Where the session's frames go: the link, or nowhere for a device-only answer."""
    async def send(msg: m.Message) -> None:
        if link is not None:
            await link.send(msg)
    return send


class PrivateDocuments:
    """The device's documents at a retrieval boundary (``dragon_host.documents``): the private
    passages of the question and the answer so far, laid out as the mode says. No speculation:
    the private store is small and local, its retrieval is not worth hiding."""

    def __init__(self, runtime: EdgeRuntime, plan: "_Plan", opts: AnswerOptions) -> None:
        self.runtime, self.plan, self.opts = runtime, plan, opts

    async def retrieve(self, prefix) -> Documents:
        rt = self.runtime
        answer = rt.tokenizer.decode(list(prefix), skip_special_tokens=True)
        passages = await rt.find_private(iterative.query(self.plan.spec.query, answer), self.opts.k)
        return Documents(tuple(p.id for p in passages), tuple(float(p.score) for p in passages), passages)

    async def speculate(self, prefix) -> Documents | None:
        return None

    async def open(self, docs: Documents):
        rt = self.runtime
        prompts, _ = rt._prompts(self.plan.rule, self.plan.spec.query, docs.payload, None)
        group = await rt.engine.open_group(prompts, self.plan.spec.engine_temperature)
        return slowed(group, self.opts.emulate_decode_ms)
