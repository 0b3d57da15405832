"""The cloud server: one aiohttp app with the device link, the OpenAI-compatible API,
``/health`` and ``/metrics``, on one shared vLLM engine.

Middlewares, outermost first: OpenAI-route metrics (so that refusals count), API keys (a 401
before any byte of the body is read), the body guard (size cap and deadline).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from aiohttp import web

from dragon_vllm import health
from dragon_http.auth import ApiKeyCheck
from dragon_vllm.backend import DragonCloud
from dragon_http.guard import DEFAULT_BODY_TIMEOUT_S, DEFAULT_MAX_BODY_BYTES, BodyGuard
from dragon_vllm.link import LinkLimits, LinkServer
from dragon_vllm.metrics import CloudMetrics, engine_stats
from dragon_vllm.openai_api import OpenAIRoutes

log = logging.getLogger("dragon.cloud")


@dataclass
class ServerConfig:
    served_model: str
    auth_token: str | None = None
    limits: LinkLimits = LinkLimits()
    api_keys: list[str] = field(default_factory=list)  # empty: the OpenAI routes are open
    protect_probes: bool = False  # /health and /metrics need an API key too
    body_timeout_s: float = DEFAULT_BODY_TIMEOUT_S
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    api_server: int | None = None  # this process's index among --api-servers N (None: the only one)


def build_app(cloud: DragonCloud, config: ServerConfig, metrics: CloudMetrics | None = None) -> web.Application:
    metrics = metrics or CloudMetrics(engine_stats(cloud.engine), getattr(cloud.index, "retrieval_stats", None))
    cloud.metrics = metrics
    link = LinkServer(cloud, config.auth_token, config.limits, stats=metrics)
    middlewares = [metrics.observe_openai]
    if config.api_keys:
        middlewares.append(ApiKeyCheck(config.api_keys, config.protect_probes).middleware)
    middlewares.append(BodyGuard(config.body_timeout_s, config.max_body_bytes).middleware)
    app = web.Application(client_max_size=config.limits.max_frame_bytes, middlewares=middlewares)
    link.add_routes(app)
    OpenAIRoutes(cloud, config.served_model, max_tokens=config.limits.max_tokens, max_k=config.limits.max_k,
                 metrics=metrics, write_timeout_s=config.body_timeout_s).add_routes(app)
    app.router.add_get("/metrics", metrics.handle)
    app.router.add_get("/health", _health(cloud, link, config.api_server))
    app["dragon_link"], app["dragon_cloud"] = link, cloud
    if config.api_server is not None:
        from dragon_vllm.api_server_identity import identify

        identify(app, metrics, config.api_server)

    async def on_shutdown(app: web.Application) -> None:
        log.info("shutting down: closing %d device link(s)", len(link.connections))
        await link.close_all()

    async def on_cleanup(app: web.Application) -> None:
        await cloud.engine.close()

    app.on_shutdown.append(on_shutdown)
    app.on_cleanup.append(on_cleanup)
    return app


def _health(cloud: DragonCloud, link: LinkServer, api_server: int | None = None):
    engine_stats_now = engine_stats(cloud.engine)
    # --api-servers N: each process answers for itself (its links, its share of the admission)
    identity = {} if api_server is None else {"api_server": api_server}

    async def handle(request: web.Request) -> web.Response:
        stats = engine_stats_now() if engine_stats_now else {}
        verdict = health.assess(stats)
        headers = {"Retry-After": str(health.RETRY_AFTER_S)} if verdict.http_status == 503 else None
        return web.json_response({
            "status": verdict.status,
            "reasons": verdict.reasons,
            "model": cloud.identity.model,
            "public_index": cloud.index is not None,
            "device_links": len(link.connections),
            "link_requests": link.active_requests,
            "engine": stats,
            **identity,
        }, status=verdict.http_status, headers=headers)

    return handle
