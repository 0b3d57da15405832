"""``dragon-cloud serve --api-servers N``: N API server processes on one engine core.

Why: with one process, every device link, retrieval and gang of the cloud is served by one
Python thread, which saturated at 256 devices on an H200 (README, Benchmarks). vLLM's remedy for
a saturated front end is several API server processes sharing one engine core (``vllm serve
--api-server-count N``); this is the same for DRAGON:

* the supervisor (this process) builds the vLLM config exactly as ``make_engine`` does
  (``engine.engine_config``), starts the engine core through vLLM's own functions
  (``vllm_frontends``, the one module that touches those internals) and waits until it is ready;
* then it starts N API server processes (spawned). Process ``i`` builds an ``AsyncLLM`` client of
  that engine core (``client_count=N, client_index=i``) and the same aiohttp app as one process
  does (``load_cloud`` + ``server.build_app``: the link, the OpenAI routes, the index, the
  retriever), on the shared port (SO_REUSEPORT, ``shared_port``). A device's link stays on the
  process that accepted it; the engine core's scheduler (the gang scheduler and the mixing
  logits processor) batches everyone's streams;
* what was global is shared out: each process admits within 1/N of the engine's seats and KV
  blocks (``admission.admission_share``) and numbers its stream groups apart from the others (the
  vLLM request ids and gang keys are built from them; ``engine.make_engine``); ``/health`` and
  ``/metrics`` answer for their process, labelled with its index (``api_server_identity``).

Lifecycle: SIGTERM/SIGINT to the supervisor stops the API servers first (each closes its links
as one process does today) and then the engine core. An API server or an engine core that dies
takes the whole server down, with a log line saying which: no half-alive server. Orphans: every
child arms the parent-death signal (``lifetime.die_with_parent``), so a SIGKILLed supervisor
leaves nothing behind either.

Not supported yet: ``--data-parallel-size > 1`` together with ``--api-servers > 1``.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
from dataclasses import dataclass, field, replace
from multiprocessing import connection
from typing import Any

from dragon_vllm.server import ServerConfig
from dragon_vllm.vllm_frontends import EngineCore, FrontendSeat, check_api_servers_supported, launch_engine_core

log = logging.getLogger("dragon.api_servers")

# load_cloud's keyword arguments that shape the vLLM config (load_cloud hands them to make_engine):
# the supervisor builds the engine core's config from exactly these, as each API server does
ENGINE_CONFIG_KEYS = ("logprobs_k", "max_num_seqs", "max_model_len", "kv_cache_gib", "gpu_memory_utilization",
                      "mixing", "rollback")
# an API server's graceful stop (aiohttp's shutdown_timeout closes the links) plus a margin
STOP_TIMEOUT_S = 20.0
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# each API server's process title, + its index (ps, benchmarks/bench_cloud_load.py's CPU accounting)
PROCESS_TITLE = "dragon-cloud::api_server_"


class StopRequested(BaseException):  # not an Exception: vLLM's start-up code must not swallow it
    """SIGTERM or SIGINT reached the supervisor."""


@dataclass
class ServePlan:
    """Everything an API server process needs to build the same app as one process (picklable)."""

    host: str
    port: int
    cloud_kwargs: dict[str, Any]  # load_cloud(**cloud_kwargs): model, index_dir, default_k, ...
    server_config: ServerConfig
    device_tokens: dict[str, str] = field(default_factory=dict)
    run_app_kwargs: dict[str, Any] = field(default_factory=dict)  # web.run_app's timeouts
    verbose: bool = False


def serve_api_servers(plan: ServePlan, count: int) -> int:
    """Run the engine core and ``count`` API servers until a signal or a death; the exit code."""
    check_api_servers_supported()
    _raise_on_stop_signals()
    core: EngineCore | None = None
    servers: list[multiprocessing.process.BaseProcess] = []
    code = 0
    try:
        core = launch_engine_core(_supervisor_config(plan, count), count)
        servers = _start_api_servers(plan, core.seats)
        core.release_listeners()
        log.info("%d API servers on port %d, one engine core", count, plan.port)
        code = _watch(servers, core)
    except StopRequested:
        log.info("stop requested")
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second signal must not cut the shutdown short
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        _stop_api_servers(servers)
        if core is not None:
            core.shutdown(timeout_s=STOP_TIMEOUT_S)
    return code


def _raise_on_stop_signals() -> None:
    def handler(signum, frame):
        raise StopRequested(signal.Signals(signum).name)

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)


def _supervisor_config(plan: ServePlan, count: int):
    from dragon_host.models import get_model
    from dragon_vllm.engine import engine_config

    kwargs = {key: plan.cloud_kwargs[key] for key in ENGINE_CONFIG_KEYS if key in plan.cloud_kwargs}
    hf_dir = get_model(plan.cloud_kwargs["model"]).hf_dir()
    config, _ = engine_config(str(hf_dir), api_processes=(count, -1), **kwargs)
    return config


def _start_api_servers(plan: ServePlan, seats: list[FrontendSeat]) -> list:
    # spawn, not fork: the supervisor holds vLLM's and ZMQ's state, a forked copy of which is unsafe
    spawn = multiprocessing.get_context("spawn")
    servers = []
    for seat in seats:
        proc = spawn.Process(target=run_api_server, args=(plan, seat), name=f"DragonApiServer_{seat.index}")
        proc.start()
        servers.append(proc)
    return servers


def _watch(servers: list, core: EngineCore) -> int:
    """Until a process of the server ends (1) or a stop signal (``StopRequested``)."""
    watched = {proc.sentinel: f"API server {i} (pid {proc.pid})" for i, proc in enumerate(servers)}
    watched.update({sentinel: "the engine core" for sentinel in core.sentinels()})
    ended = connection.wait(list(watched))
    for sentinel in ended:
        exitcode = next((p.exitcode for p in servers if p.sentinel == sentinel), None)
        log.error("%s exited%s: stopping the whole server (no half-alive server)", watched[sentinel],
                  "" if exitcode is None else f" with code {exitcode}")
    return 1


def _stop_api_servers(servers: list) -> None:
    """SIGTERM (each closes its links, as one process does), then SIGKILL whoever is left."""
    for proc in servers:
        if proc.is_alive():
            proc.terminate()
    for proc in servers:
        proc.join(STOP_TIMEOUT_S)
        if proc.is_alive():
            log.error("API server %s did not stop within %.0f s: killed", proc.name, STOP_TIMEOUT_S)
            proc.kill()
            proc.join(5)


# ---------------------------------------------------------------------------- one API server process
def run_api_server(plan: ServePlan, seat: FrontendSeat) -> None:
    """One API server: today's app on the shared port, its engine a client of the shared core."""
    from dragon_vllm.lifetime import die_with_parent

    die_with_parent()  # before anything else: a supervisor that dies takes us with it
    _set_process_title(seat.index)
    logging.basicConfig(level=logging.INFO if plan.verbose else logging.WARNING, format=LOG_FORMAT)
    logging.getLogger("dragon").setLevel(logging.INFO)
    from aiohttp import web

    from dragon_vllm.shared_port import bind_shared

    sock = bind_shared(plan.host, plan.port)
    web.run_app(_make_app(plan, seat), sock=sock, print=lambda msg: log.info("api server %d: %s", seat.index, msg),
                **plan.run_app_kwargs)


def _set_process_title(index: int) -> None:
    try:
        import setproctitle  # a vLLM dependency; only cosmetic, so optional
    except ImportError:
        return
    setproctitle.setproctitle(f"{PROCESS_TITLE}{index}")


async def _make_app(plan: ServePlan, seat: FrontendSeat):
    from dragon_vllm.loader import load_cloud
    from dragon_vllm.server import build_app

    # make_engine(api_server=seat): this process's share of the admission, its own group ids
    cloud = await load_cloud(**plan.cloud_kwargs, api_server=seat)
    app = build_app(cloud, replace(plan.server_config, api_server=seat.index))
    app["dragon_link"].device_tokens.update(plan.device_tokens)
    log.info("api server %d of %d ready (pid %d)", seat.index, seat.count, os.getpid())
    return app
