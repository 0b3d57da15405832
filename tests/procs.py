"""Processes of ours, read from /proc (Linux): for the leftover check at the end of the suite and
the parent-death test. No psutil: it is not a dependency."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

OURS = ("VLLM::", "dragon_vllm.cli", "dragon-cloud", "benchmarks.netem")


@dataclass(frozen=True)
class Proc:
    pid: int
    ppid: int
    state: str
    start: int  # clock ticks since boot
    cmdline: str


def read(pid: int) -> Proc | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmdline = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2:].split()  # after "pid (comm) "
    return Proc(pid, int(fields[1]), fields[0], int(fields[19]), cmdline)


def all_procs() -> list[Proc]:
    out = []
    for name in os.listdir("/proc"):
        if name.isdigit() and (p := read(int(name))) is not None:
            out.append(p)
    return out


def alive(pid: int) -> bool:
    p = read(pid)
    return p is not None and p.state != "Z"


def children(pid: int) -> list[Proc]:
    return [p for p in all_procs() if p.ppid == pid]


def ours_orphaned_since(start: int) -> list[Proc]:
    """Processes of ours started after ``start`` whose parent is gone (re-parented to 1)."""
    return [p for p in all_procs() if p.ppid == 1 and p.start >= start and p.state != "Z"
            and any(tag in p.cmdline for tag in OURS)]


def wait_gone(pids: list[int], timeout_s: float) -> list[int]:
    """The pids still alive after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while (left := [p for p in pids if alive(p)]) and time.monotonic() < deadline:
        time.sleep(0.2)
    return left
