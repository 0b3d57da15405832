"""The DRAGON protocol, pure: numpy and msgspec, no files, clocks, sockets or event loops.

Both sides (``dragon_edge``, ``dragon_vllm``) and the simulator (``testing.netsim``) run this
same code; ``tests/core/test_core_is_pure.py`` holds the boundary. The names below are imported on
first use; the modules, one concept each, are listed in docs/ARCHITECTURE.md.
"""

from dragon_core.exports import lazy_exports, public_names

_HOMES = {  # each module, with the public names it holds
    "dragon_core.session": ("Session", "SessionConfig"),
    "dragon_core.request": ("RequestSpec",),
    "dragon_core.connection": ("LinkConnection",),
    "dragon_core.handshake": ("Identity",),
    "dragon_core.dist": ("Dist",),
    "dragon_core.engine": ("StreamGroup", "Engine"),
    "dragon_core.errors": ("DragonError", "ProtocolError"),
}
__all__ = public_names(_HOMES)
__getattr__ = lazy_exports(__name__, _HOMES)
