"""The DRAGON protocol, pure: numpy and msgspec, no files, clocks, sockets or event loops.

Both sides (``dragon_edge``, ``dragon_vllm``) and the simulator (``testing.netsim``) run this
same code; ``tests/test_core_is_pure.py`` holds the boundary. The names below are imported on
first use; the modules, one concept each, are listed in docs/ARCHITECTURE.md.
"""

from __future__ import annotations

_HOMES = {
    "Session": "dragon_core.session",
    "SessionConfig": "dragon_core.session",
    "RequestSpec": "dragon_core.request",
    "LinkConnection": "dragon_core.connection",
    "Identity": "dragon_core.handshake",
    "Dist": "dragon_core.dist",
    "StreamGroup": "dragon_core.engine",
    "Engine": "dragon_core.engine",
    "DragonError": "dragon_core.errors",
    "ProtocolError": "dragon_core.errors",
}

__all__ = list(_HOMES)


def __getattr__(name: str):
    if name not in _HOMES:
        raise AttributeError(f"module 'dragon_core' has no attribute {name!r}")
    # __import__ rather than importlib: the package's own import boundary allows no importlib
    return getattr(__import__(_HOMES[name], fromlist=[name]), name)
