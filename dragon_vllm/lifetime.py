"""vLLM's engine processes die with the process that started them.

vLLM starts its engine core (and the engine core its workers) as child processes and stops them
on a clean shutdown. When the parent dies without one (SIGKILL, OOM killer, a crashed test run)
they stayed behind, orphaned, holding the model, the KV cache and the GPU (seen: a leftover
``EngineCore`` + ``Worker`` with 2.9 GB after a killed test run). Linux's parent-death signal fixes
that at the source: each vLLM child asks the kernel for SIGKILL when its parent goes.

Called from the ``vllm.general_plugins`` entry point (``plugin.register``), which vLLM runs in
every vLLM process; only child processes (``multiprocessing.parent_process()`` set) arm it. Not
armed where the plugin is not installed (the GPU machine runs the project from ``PYTHONPATH``).
"""

from __future__ import annotations

import ctypes
import logging
import multiprocessing
import os
import signal
import sys

log = logging.getLogger("dragon.lifetime")

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def die_with_parent() -> bool:
    """In a vLLM child process: SIGKILL this process when its parent dies. True if armed."""
    if not sys.platform.startswith("linux") or multiprocessing.parent_process() is None:
        return False
    parent = os.getppid()
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) != 0:
            log.warning("prctl(PR_SET_PDEATHSIG) failed: errno %d", ctypes.get_errno())
            return False
    except OSError as exc:
        log.warning("no parent-death signal: %s", exc)
        return False
    if os.getppid() != parent or parent == 1:  # the parent died before the signal was armed
        os.kill(os.getpid(), signal.SIGKILL)
    return True
