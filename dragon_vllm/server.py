"""The cloud server: one aiohttp app with the device link, the OpenAI-compatible API,
``/health`` and ``/metrics``, on one shared vLLM engine."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from aiohttp import web

from dragon_vllm.backend import DragonCloud
from dragon_vllm.link import LinkLimits, LinkServer
from dragon_vllm.metrics import CloudMetrics, engine_stats
from dragon_vllm.openai_api import OpenAIRoutes

log = logging.getLogger("dragon.cloud")


@dataclass
class ServerConfig:
    served_model: str
    auth_token: str | None = None
    limits: LinkLimits = LinkLimits()


def build_app(cloud: DragonCloud, config: ServerConfig, metrics: CloudMetrics | None = None) -> web.Application:
    metrics = metrics or CloudMetrics(engine_stats(cloud.engine))
    cloud.metrics = metrics
    link = LinkServer(cloud, config.auth_token, config.limits, stats=metrics)
    app = web.Application(client_max_size=config.limits.max_frame_bytes)
    link.add_routes(app)
    OpenAIRoutes(cloud, config.served_model, max_tokens=config.limits.max_tokens,
                 max_k=config.limits.max_k).add_routes(app)
    app.router.add_get("/metrics", metrics.handle)
    app.router.add_get("/health", _health(cloud, link))
    app["dragon_link"], app["dragon_cloud"] = link, cloud

    async def on_shutdown(app: web.Application) -> None:
        log.info("shutting down: closing %d device link(s)", len(link.connections))
        await link.close_all()

    async def on_cleanup(app: web.Application) -> None:
        await cloud.engine.close()

    app.on_shutdown.append(on_shutdown)
    app.on_cleanup.append(on_cleanup)
    return app


def _health(cloud: DragonCloud, link: LinkServer):
    engine_stats_now = engine_stats(cloud.engine)

    async def health(request: web.Request) -> web.Response:
        return web.json_response({
            "status": "ok",
            "model": cloud.identity.model,
            "public_index": cloud.index is not None,
            "device_links": len(link.connections),
            "link_requests": link.active_requests,
            "engine": engine_stats_now() if engine_stats_now else {},
        })

    return health
