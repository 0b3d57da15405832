"""Where a benchmark ran: machine, load, package versions and the code's commit, recorded next
to its numbers (absolute times on a shared 2-core machine mean little without them)."""

from __future__ import annotations

import importlib.metadata as md
import os
import platform
from typing import Sequence


def describe(packages: Sequence[str]) -> dict:
    """CPU count and affinity, Python, platform, the load average now, the installed version of
    each of ``packages`` (absent ones left out), and the commit (``code_version``)."""
    from benchmarks.bench_cloud_load import code_version

    env = dict(cpu_count=os.cpu_count(), affinity=len(os.sched_getaffinity(0)), machine=platform.machine(),
               python=platform.python_version(), platform=platform.platform(), loadavg_at_start=os.getloadavg())
    for dist in packages:
        try:
            env[dist] = md.version(dist)
        except md.PackageNotFoundError:
            pass
    env.update(code_version())
    return env
