"""Prometheus metrics of the cloud (``GET /metrics``).

Counters are cumulative, as Prometheus expects: tokens/s is ``rate(dragon_tokens_total[1m])``,
acceptance is ``rate(dragon_cloud_drafts_accepted_total) / rate(dragon_verified_steps_total)``,
bytes/token is ``rate(dragon_link_bytes_total) / rate(dragon_tokens_total{kind="link"})``.
"""

from __future__ import annotations

from typing import Callable

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, generate_latest

from dragon_core import session as s


class CloudMetrics:
    def __init__(self, engine_stats: Callable[[], dict] | None = None) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("dragon_requests", "Requests by front door and outcome", ["kind", "outcome"], registry=r)
        self.tokens = Counter("dragon_tokens", "Committed tokens by front door", ["kind"], registry=r)
        self.verified = Counter("dragon_verified_steps", "DRAGON steps decided with both drafts", registry=r)
        self.cloud_accepted = Counter("dragon_cloud_drafts_accepted", "Cloud drafts accepted", registry=r)
        self.rollbacks = Counter("dragon_rollbacks", "Stream rollbacks on the cloud", registry=r)
        self.handovers = Counter("dragon_handovers", "Aggregator moves", registry=r)
        self.link_bytes = Counter("dragon_link_bytes", "Bytes on the device link", ["direction"], registry=r)
        self.active = Gauge("dragon_active_requests", "Requests being decoded", ["kind"], registry=r)
        self.streams = Gauge("dragon_open_streams", "Open vLLM streams (documents x requests)", registry=r)
        self.prefix_hit = Gauge("dragon_prefix_cache_hit_ratio", "Prompt tokens served from the prefix cache",
                                registry=r)
        self._engine_stats = engine_stats

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

    def on_session(self, session: s.Session, kind: str = "link") -> None:
        st = session.stats
        self.tokens.labels(kind).inc(len(session.committed))
        self.rollbacks.inc(st.rollbacks)
        self.handovers.inc(st.handovers)
        if kind == "link":
            self.verified.inc(st.verified)
            self.cloud_accepted.inc(st.accepted_local)

    # ------------------------------------------------------------------ route
    async def handle(self, request: web.Request) -> web.Response:
        if self._engine_stats is not None:
            stats = self._engine_stats()
            self.streams.set(stats.get("open_streams", 0))
            if stats.get("prompt_tokens"):
                self.prefix_hit.set(stats.get("cached_tokens", 0) / stats["prompt_tokens"])
        body = generate_latest(self.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})
