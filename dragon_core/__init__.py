"""The DRAGON protocol, pure: numpy and msgspec, no files, clocks, sockets or event loops.

Both sides (``dragon_edge``, ``dragon_vllm``) and the simulator (``testing.netsim``) run this
same code; ``tests/core/test_core_is_pure.py`` holds the boundary. The names below are imported on
first use; the modules, one concept each, are listed in docs/ARCHITECTURE.md.
"""

from __future__ import annotations

from dragon_core.exports import lazy_exports

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

__getattr__ = lazy_exports(__name__, _HOMES)
