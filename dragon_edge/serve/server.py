"""Start ``dragon-edge serve``, say where it listens, stop it gracefully.

The model, the retriever and the store load before the socket opens (a client never waits on
a half-started server); the address goes to the log and, with ``--port-file``, to a file (port
0 picks a free port: tests and scripts read it there). SIGINT or SIGTERM stops accepting,
gives running answers ``SHUTDOWN_GRACE_S`` to finish, closes the link to the cloud and the
engine, and exits 0.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from dataclasses import dataclass
from pathlib import Path

from aiohttp import web

from dragon_edge.serve.app import AppConfig, build_app
from dragon_http.guard import DEFAULT_HEADER_TIMEOUT_S

log = logging.getLogger("dragon.edge.serve")

DEFAULT_PORT = 8088
SHUTDOWN_GRACE_S = 5.0


@dataclass
class ServeOptions:
    app: AppConfig
    store: Path
    cloud: str | None
    token: str
    engine: str
    port: int = DEFAULT_PORT
    port_file: Path | None = None
    peer_timeout_s: float | None = None
    header_timeout_s: float = DEFAULT_HEADER_TIMEOUT_S


async def serve(opts: ServeOptions) -> None:
    from dragon_edge.sdk import AsyncDragonClient
    from dragon_edge.store import DocumentStore

    t0 = time.monotonic()
    store = DocumentStore(opts.store.expanduser(), create=True)
    client = AsyncDragonClient(cloud_url=opts.cloud, store=store, model=opts.app.served_model, engine=opts.engine,
                               auth_token=opts.token, peer_timeout_s=opts.peer_timeout_s)
    runtime = await client.runtime()  # the SDK's loading, so both entrances run the same device
    await asyncio.to_thread(store.search, "warm-up", 1)  # load the retriever before the first question
    runner = web.AppRunner(build_app(runtime, store, opts.app), keepalive_timeout=opts.header_timeout_s,
                           shutdown_timeout=SHUTDOWN_GRACE_S)
    await runner.setup()
    site = web.TCPSite(runner, opts.app.host, opts.port)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # the bound port (``--port 0`` picks one)
    base = f"http://{_url_host(opts.app.host)}:{port}"
    stats = store.stats()
    log.info("dragon-edge serve: listening on %s (ready in %.1f s)", base, time.monotonic() - t0)
    log.info("  chat page %s/ ; OpenAI base URL %s/v1, model %r%s", base, base, opts.app.served_model,
             ", API key required" if opts.app.api_keys else "")
    log.info("  cloud: %s; private store %s: %d sources, %d passages", opts.cloud or "none (answers are device-only)",
             stats.path, stats.sources, stats.passages)
    if opts.port_file is not None:
        tmp = opts.port_file.with_suffix(".tmp")
        tmp.write_text(f"{port}\n")
        tmp.replace(opts.port_file)  # whole or absent: a reader never sees half a number
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("stopping: no new connections; running answers get %.0f s to finish", SHUTDOWN_GRACE_S)
    await runner.cleanup()
    await runtime.close()  # the link to the cloud, then the engine
    store.close()
    log.info("stopped")


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host
