"""Shared fixtures. Models come from the registry; a missing model FAILS the test with the
registry's error (which says how to install it) instead of skipping it."""

from __future__ import annotations

import os

import pytest

# Never reach a model hub from a test: every model is a local file.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from dragon_host.models import ModelSpec, get_model  # noqa: E402


@pytest.fixture(scope="session")
def smollm2() -> ModelSpec:
    """SmolLM2-135M-Instruct, with its GGUF installed and its safetensors folder prepared
    (raises ModelNotInstalled otherwise: run scripts/setup.sh)."""
    spec = get_model("smollm2-135m")
    spec.gguf_path()
    spec.hf_dir()
    return spec


# The shared end-to-end world (one cloud process for every e2e file): see e2e_world.py.
from e2e_world import cloud, e2e_loop, proxies, reference_engine, runtime, world  # noqa: E402,F401


def pytest_collection_modifyitems(config, items):
    """Tests that kill the shared cloud run last, so no other test needs it restarted."""
    items.sort(key=lambda item: item.get_closest_marker("kills_shared_cloud") is not None)


# ---------------------------------------------------------------------------- nothing left running
_SESSION_START = None


def pytest_sessionstart(session):
    """Remember when the suite began: processes of ours started later must be gone at its end."""
    global _SESSION_START
    import procs

    me = procs.read(os.getpid())
    _SESSION_START = me.start if me else None


def pytest_sessionfinish(session, exitstatus):
    """The suite fails if it leaves a process of ours orphaned (a vLLM engine, a cloud, a netem
    proxy): every fixture must reap what it starts. Teardown gets 20 s to finish first."""
    import time

    import procs

    if _SESSION_START is None or not os.path.isdir("/proc"):
        return
    deadline = time.monotonic() + 20
    while (left := procs.ours_orphaned_since(_SESSION_START)) and time.monotonic() < deadline:
        time.sleep(0.5)
    if left:
        lines = "\n".join(f"  pid {p.pid}: {p.cmdline[:120]}" for p in left)
        print(f"\nprocesses left running by the test suite (orphaned):\n{lines}")
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
