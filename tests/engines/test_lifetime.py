"""vLLM's engine processes die with their parent, even on SIGKILL (``dragon_vllm/lifetime.py``)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

import procs
from dragon_vllm.lifetime import die_with_parent

SCRIPT = textwrap.dedent("""
    import asyncio, sys

    async def main():
        from pathlib import Path
        from dragon_vllm.engine import make_engine
        engine = make_engine(sys.argv[1], max_num_seqs=4, max_model_len=256, mixing=False)
        Path(sys.argv[2]).write_text("ready")
        await asyncio.sleep(600)

    if __name__ == "__main__":
        asyncio.run(main())
""")


def test_the_main_process_arms_nothing():
    assert die_with_parent() is False  # pytest is no multiprocessing child


@pytest.mark.slow
def test_engine_processes_die_when_their_parent_is_killed(tmp_path, smollm2):
    script = tmp_path / "engine_owner.py"
    script.write_text(SCRIPT)
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1", HF_HUB_OFFLINE="1")
    ready = tmp_path / "ready"
    # "ready" comes as a file: on a shared stdout pipe the engine processes' log lines (one without
    # its newline) can swallow a marker line, and a blocking readline then waits forever
    owner = subprocess.Popen([sys.executable, str(script), str(smollm2.hf_dir()), str(ready)],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    try:
        deadline = time.monotonic() + 300
        while not ready.exists():
            assert owner.poll() is None, "the engine owner exited before the engine started"
            assert time.monotonic() < deadline, "the engine did not start within 300 s"
            time.sleep(0.2)
        engine = [p for p in procs.children(owner.pid) if "VLLM::" in p.cmdline]
        assert engine, "no vLLM engine process under the owner"
        family = [p.pid for p in engine] + [c.pid for p in engine for c in procs.children(p.pid)]
        owner.send_signal(signal.SIGKILL)
        owner.wait(30)
        assert procs.wait_gone(family, 20) == [], "vLLM processes outlived their SIGKILLed parent"
    finally:
        if owner.poll() is None:
            owner.kill()
