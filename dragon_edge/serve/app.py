"""The aiohttp application of ``dragon-edge serve``: the shared OpenAI routes
(``dragon_http.openai_routes``) over the device's ``EdgeRuntime``, the store's routes, the chat
page, ``/health`` and ``/v1/dragon/status``.

Middlewares, outermost first: ``LocalOnly`` (a loopback server answers only loopback ``Host``
names and no other web page's requests), API keys (a 401 before any byte of the body is read),
the body guard (size cap and deadline), and unexpected errors as a one-line 500 in OpenAI's
shape (logged with the traceback).
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field

from aiohttp import web

from dragon_core.handshake import LINK_PATH
from dragon_edge.runtime import MAX_DEVICE_TOKENS, EdgeRuntime
from dragon_edge.serve.documents import DocumentRoutes
from dragon_edge.serve.extras import EdgeExtras
from dragon_edge.serve.page import add_page
from dragon_edge.store import DocumentStore
from dragon_http.auth import ApiKeyCheck
from dragon_http.errors import error_response
from dragon_http.guard import DEFAULT_BODY_TIMEOUT_S, DEFAULT_MAX_BODY_BYTES, BodyGuard, Handler
from dragon_http.loopback import LocalOnly, is_loopback
from dragon_http.openai_routes import OpenAIRoutes

log = logging.getLogger("dragon.edge.serve")


@dataclass
class AppConfig:
    served_model: str
    host: str = "127.0.0.1"
    api_keys: list[str] = field(default_factory=list)  # empty: the /v1 routes are open (fine on loopback)
    body_timeout_s: float = DEFAULT_BODY_TIMEOUT_S
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES


def build_app(runtime: EdgeRuntime, store: DocumentStore, config: AppConfig) -> web.Application:
    middlewares = [LocalOnly(loopback_host=is_loopback(config.host)).middleware]
    if config.api_keys:
        middlewares.append(ApiKeyCheck(config.api_keys).middleware)
    middlewares += [BodyGuard(config.body_timeout_s, config.max_body_bytes).middleware, _errors_as_json]
    app = web.Application(client_max_size=config.max_body_bytes, middlewares=middlewares)
    OpenAIRoutes(runtime, config.served_model, max_tokens=min(MAX_DEVICE_TOKENS, runtime.max_model_len - 1),
                 extras=EdgeExtras(), write_timeout_s=config.body_timeout_s).add_routes(app)
    DocumentRoutes(store).add_routes(app)
    add_page(app)
    app.router.add_get("/health", _health)
    app.router.add_get("/v1/dragon/status", _status(runtime, store, config))
    return app  # the runtime and the store belong to the caller (server.serve closes them)


@web.middleware
async def _errors_as_json(request: web.Request, handler: Handler) -> web.StreamResponse:
    """An unexpected error is a 500 the ``openai`` package can read (``InternalServerError``),
    not aiohttp's HTML page; the traceback goes to the log."""
    try:
        return await handler(request)
    except web.HTTPException:
        raise
    except Exception as exc:  # noqa: BLE001 - the last resort of one request; the server goes on
        log.exception("%s %s failed", request.method, request.path)
        return error_response(500, f"{type(exc).__name__}: {' '.join(str(exc).split())}", "server_error")


async def _health(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


def _status(runtime: EdgeRuntime, store: DocumentStore, config: AppConfig):
    async def handle(request: web.Request) -> web.Response:
        link = runtime.link
        st = await asyncio.to_thread(store.stats)  # waits for the store's lock during an ingest
        return web.json_response(dict(
            model=config.served_model,
            cloud=link.url.removesuffix(LINK_PATH) if link is not None else None,
            cloud_connected=bool(link is not None and link.connected),
            rtt_ms=getattr(link, "rtt_ms", None),
            store=dict(path=st.path, sources=st.sources, passages=st.passages),
        ))

    return handle
