"""Prometheus metrics of the cloud (``GET /metrics``).

Counters are cumulative, as Prometheus expects: tokens/s is ``rate(dragon_tokens_total[1m])``,
acceptance is ``rate(dragon_cloud_drafts_accepted_total) / rate(dragon_verified_steps_total)``,
bytes/token is ``rate(dragon_link_bytes_total) / rate(dragon_tokens_total{kind="link"})``.

The engine's own counters (``VllmEngine.stats()``, also in ``/health``) are exported as they are
read at scrape time: ``dragon_engine_<name>_total`` for the cumulative ones (stream groups
opened, engine chunks, reopens after a rollback, repairs, prompt tokens and prompt tokens served
from the prefix cache, so the hit rate over an interval is ``rate(..._cached_tokens_total) /
rate(..._prompt_tokens_total)``) and ``dragon_engine_<name>`` gauges for the instantaneous ones
(open streams, queued groups, reserved and total KV blocks of the admission control, its stream
slots).

The OpenAI routes (``/v1/models``, ``/v1/completions``, ``/v1/chat/completions``) are counted by
``observe_openai`` (a middleware, so refusals by the auth and body guards count too):
``dragon_openai_requests_total{route,status}`` (errors by status: 400, 401, 408, 413, 499 =
the client left, ...), ``dragon_openai_request_seconds{route}`` (a histogram: first byte of the
request to the end of its answer, streams included), ``dragon_openai_tokens_total{route,kind}``
(prompt and completion tokens of answers served) and ``dragon_openai_active_requests{route}``.
"""

from __future__ import annotations

import time
from typing import Awaitable, Callable

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from dragon_core import session as s
from dragon_vllm.rank_metrics import rank_families


# cumulative engine counters -> dragon_engine_<name>_total; instantaneous values -> dragon_engine_<name>
ENGINE_COUNTERS = {
    "groups": "Stream groups opened (one per request)",
    "chunks": "Input chunks fed to vLLM sessions (in-engine path: one per drafted chunk)",
    "reopens": "Stream groups reopened after a rollback (abort + reopen with the accepted prefix)",
    "repairs": "In-engine drafts repaired after a rejection",
    "prompt_tokens": "Prompt tokens of opened (and reopened) streams",
    "cached_tokens": "Prompt tokens served from vLLM's prefix cache",
}
ENGINE_GAUGES = {
    "open_streams": "Open vLLM streams (documents x requests)",
    "queued_groups": "Stream groups waiting for admission",
    "reserved_blocks": "KV blocks reserved by the admission control",
    "kv_blocks_capacity": "KV blocks of the engine's cache (the admission control's budget)",
    "max_streams": "Streams the admission control lets be open at once",
}
OPENAI_ROUTES = ("/v1/models", "/v1/completions", "/v1/chat/completions")
# latency buckets (seconds): a refusal takes milliseconds, an answer of 1,000 tokens on a CPU a minute
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


def engine_stats(engine):
    """The engine's stats (``VllmEngine.stats()``: groups, chunks, reopens, repairs, prompt and
    prefix-cached tokens, open streams, ...) plus its admission capacity (``kv_blocks_capacity``,
    ``max_streams``) and settings (``mixing``, ``chunk_tokens``, ``logprobs_k``, ``block_size``), for
    ``/health`` and ``/metrics``; ``None`` for an engine without stats."""
    stats = getattr(engine, "stats", None)
    if stats is None:
        return None

    def read() -> dict:
        out = dict(stats())
        admission = getattr(engine, "admission", None)
        if admission is not None:
            out.setdefault("kv_blocks_capacity", admission.max_blocks)
            out.setdefault("max_streams", admission.max_slots)
        for name in ("mixing", "chunk_tokens", "logprobs_k", "block_size"):  # how it runs, for whoever reads the stats
            if name not in out and isinstance(getattr(engine, name, None), (bool, int)):
                out[name] = getattr(engine, name)
        return out

    return read


class _EngineCollector:
    """Reads the engine's stats at scrape time (they live in the engine, not in this registry)."""

    def __init__(self, engine_stats: Callable[[], dict]) -> None:
        self._engine_stats = engine_stats

    def collect(self):
        stats = self._engine_stats() or {}
        for name, doc in ENGINE_COUNTERS.items():
            if isinstance(stats.get(name), (int, float)):
                yield CounterMetricFamily(f"dragon_engine_{name}", doc, value=float(stats[name]))
        for name, doc in ENGINE_GAUGES.items():
            if isinstance(stats.get(name), (int, float)):
                yield GaugeMetricFamily(f"dragon_engine_{name}", doc, value=float(stats[name]))
        yield from rank_families(stats.get("ranks"))  # data parallel only (ranked_engine.py)


# the public index's retrieval (PublicIndex.retrieval_stats(), read at scrape time): mean retrieval
# time is rate(dragon_retrieval_seconds_total) / rate(dragon_retrieval_searches_total); the lookahead
# cluster cache's hit rate is rate(..._cache_hits_total) / (rate(..._hits_total) + rate(..._misses_total))
RETRIEVAL_COUNTERS = {
    "retrieval_searches": "Public-index searches (one per batch of queries)",
    "retrieval_queries": "Queries answered by the public index",
    "retrieval_seconds": "Public-index retrieval time, query arrival to top-k ready (embedding, faiss, passages)",
    "cache_hits": "Probed IVF clusters found in the lookahead cluster cache",
    "cache_misses": "Probed IVF clusters scanned from host memory instead",
}
RETRIEVAL_GAUGES = {
    "cache_hit_rate": "Lookahead cluster cache hit rate since start",
    "cache_used_bytes": "Bytes of IVF clusters held by the lookahead cluster cache",
    "cache_budget_bytes": "Byte budget of the lookahead cluster cache",
}


class _RetrievalCollector:
    """Reads the public index's retrieval counters at scrape time."""

    def __init__(self, retrieval_stats: Callable[[], dict]) -> None:
        self._retrieval_stats = retrieval_stats

    def collect(self):
        stats = self._retrieval_stats() or {}
        for name, doc in RETRIEVAL_COUNTERS.items():
            if isinstance(stats.get(name), (int, float)):
                yield CounterMetricFamily(_retrieval_name(name), doc, value=float(stats[name]))
        for name, doc in RETRIEVAL_GAUGES.items():
            if isinstance(stats.get(name), (int, float)):
                yield GaugeMetricFamily(_retrieval_name(name), doc, value=float(stats[name]))


def _retrieval_name(stat: str) -> str:
    """retrieval_seconds -> dragon_retrieval_seconds, cache_hits -> dragon_retrieval_cache_hits."""
    return f"dragon_{stat}" if stat.startswith("retrieval_") else f"dragon_retrieval_{stat}"


class CloudMetrics:
    def __init__(self, engine_stats: Callable[[], dict] | None = None,
                 retrieval_stats: Callable[[], dict] | None = None) -> None:
        self.registry = CollectorRegistry()
        # what /metrics renders: the registry, or (--api-servers N) it with each process's label
        # (api_server_identity.identify)
        self.exposed = self.registry
        r = self.registry
        self.requests = Counter("dragon_requests", "Requests by front door and outcome", ["kind", "outcome"], registry=r)
        self.tokens = Counter("dragon_tokens", "Committed tokens by front door", ["kind"], registry=r)
        self.verified = Counter("dragon_verified_steps", "DRAGON steps decided with both drafts", registry=r)
        self.cloud_accepted = Counter("dragon_cloud_drafts_accepted", "Cloud drafts accepted", registry=r)
        self.rollbacks = Counter("dragon_rollbacks", "Stream rollbacks on the cloud", registry=r)
        self.handovers = Counter("dragon_handovers", "Aggregator moves", registry=r)
        self.iterative = Counter("dragon_iterative_retrievals", "Iterative retrieval at answer boundaries "
                                 "(retrieve_every): real retrievals, and RaLMSpec speculations from the request "
                                 "cache, right or wrong", ["kind"], registry=r)
        self.link_bytes = Counter("dragon_link_bytes", "Bytes on the device link", ["direction"], registry=r)
        self.active = Gauge("dragon_active_requests", "Requests being decoded", ["kind"], registry=r)
        self.streams = Gauge("dragon_open_streams", "Open vLLM streams (documents x requests)", registry=r)
        self.prefix_hit = Gauge("dragon_prefix_cache_hit_ratio", "Prompt tokens served from the prefix cache",
                                registry=r)
        self.openai_requests = Counter("dragon_openai_requests", "OpenAI-route requests by route and HTTP status",
                                       ["route", "status"], registry=r)
        self.openai_seconds = Histogram("dragon_openai_request_seconds", "OpenAI-route latency, to the answer's end",
                                        ["route"], buckets=LATENCY_BUCKETS, registry=r)
        self.openai_tokens = Counter("dragon_openai_tokens", "Tokens of OpenAI-route answers",
                                     ["route", "kind"], registry=r)
        self.openai_active = Gauge("dragon_openai_active_requests", "OpenAI-route requests in progress", ["route"],
                                   registry=r)
        self._engine_stats = engine_stats
        if engine_stats is not None:
            r.register(_EngineCollector(engine_stats))
        if retrieval_stats is not None:
            r.register(_RetrievalCollector(retrieval_stats))

    # ------------------------------------------------------------------ hooks
    def on_request(self, event: str, kind: str = "link") -> None:
        if event == "started":
            self.active.labels(kind).inc()
        else:
            self.active.labels(kind).dec()
            self.requests.labels(kind, event).inc()

    def on_bytes(self, sent: int, received: int) -> None:
        if sent:
            self.link_bytes.labels("sent").inc(sent)
        if received:
            self.link_bytes.labels("received").inc(received)

    def on_documents(self, stats) -> None:
        """A finished request's ``dragon_host.documents.DocumentStats`` (iterative retrieval)."""
        for kind in ("retrievals", "speculated", "speculated_right", "speculated_wrong"):
            self.iterative.labels(kind).inc(getattr(stats, kind))

    def on_session(self, session: s.Session, kind: str = "link") -> None:
        st = session.stats
        self.tokens.labels(kind).inc(len(session.committed))
        self.rollbacks.inc(st.rollbacks)
        self.handovers.inc(st.handovers)
        if kind == "link":
            self.verified.inc(st.verified)
            self.cloud_accepted.inc(st.accepted_local)

    def on_openai_usage(self, route: str, usage: dict) -> None:
        self.openai_tokens.labels(route, "prompt").inc(usage.get("prompt_tokens", 0))
        self.openai_tokens.labels(route, "completion").inc(usage.get("completion_tokens", 0))

    @web.middleware
    async def observe_openai(self, request: web.Request,
                             handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
        route = request.path if request.path in OPENAI_ROUTES else None
        if route is None:
            return await handler(request)
        t0, status = time.perf_counter(), 500  # an exception that escapes is a 500 to the client
        self.openai_active.labels(route).inc()
        try:
            resp = await handler(request)
            status = resp.status
            return resp
        except web.HTTPException as exc:
            status = exc.status
            raise
        finally:
            self.openai_active.labels(route).dec()
            self.openai_requests.labels(route, str(status)).inc()
            self.openai_seconds.labels(route).observe(time.perf_counter() - t0)

    # ------------------------------------------------------------------ route
    async def handle(self, request: web.Request) -> web.Response:
        if self._engine_stats is not None:
            stats = self._engine_stats()
            self.streams.set(stats.get("open_streams", 0))
            if stats.get("prompt_tokens"):
                self.prefix_hit.set(stats.get("cached_tokens", 0) / stats["prompt_tokens"])
        body = generate_latest(self.exposed)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})
