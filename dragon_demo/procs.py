"""Run the cloud as a child process on loopback: a free port, start, wait until healthy, stop."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url: str, proc: subprocess.Popen, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the cloud exited during start-up (code {proc.returncode})")
        try:
            with urllib.request.urlopen(url + "/health", timeout=1) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"the cloud did not become healthy within {timeout_s:.0f} s")


def start_cloud(index_dir: Path, token: str, log_path: Path, extra_args: tuple[str, ...] = (), port: int = 0,
                timeout_s: float = 120.0) -> tuple[subprocess.Popen, int]:
    """Spawn ``dragon-cloud serve``; returns the process and the port it bound (``port=0``: a
    free one, bound by the server itself before its model loads, so no other process can take
    it in between). ``wait_healthy`` then waits for the model."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", VLLM_CPU_KVCACHE_SPACE=os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"),
               DRAGON_TOKEN=token)
    port_file = log_path.with_suffix(".port")
    port_file.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "dragon_vllm.cli", "serve", "--index", str(index_dir), "--port", str(port),
           "--port-file", str(port_file), "--max-num-seqs", "32", "--max-model-len", "1024", *extra_args]
    proc = subprocess.Popen(cmd, env=env, stdout=log_path.open("w"), stderr=subprocess.STDOUT,
                            start_new_session=True)
    deadline = time.monotonic() + timeout_s
    while not (port_file.exists() and port_file.read_text().endswith("\n")):
        if proc.poll() is not None or time.monotonic() > deadline:
            stop(proc)
            raise RuntimeError(f"the cloud did not bind a port (exit {proc.returncode}); see {log_path}:\n"
                               + log_path.read_text()[-2000:])
        time.sleep(0.05)
    return proc, int(port_file.read_text())


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
