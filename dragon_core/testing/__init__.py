"""Test harnesses built only from the protocol's pure parts: the deterministic network simulator
(``netsim``) and the centralized references a distributed answer must equal (``reference``).

Nothing here touches files, clocks or event loops, so it lives inside ``dragon_core`` and is held
to the same import boundary (tests/core/test_core_is_pure.py).
"""

__all__ = ["netsim", "reference"]
