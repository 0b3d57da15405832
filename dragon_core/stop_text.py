"""Stop strings without leaking a partial match.

An answer grows a few characters at a time. If it ends with ``"L"`` and a stop string is
``"Lyon"``, that ``"L"`` may be the start of the stop string (then it must never be shown) or
plain text (then it must be). So the tail that could still become a stop string is held back
until later text decides it. One rule for every caller that shows text as it commits (the
OpenAI routes, streaming or not; the device's SDK could use the same).
"""

from __future__ import annotations

from typing import Sequence


def releasable(text: str, stops: Sequence[str], shown: int = 0) -> tuple[int, bool]:
    """How much of ``text`` (the whole answer so far) may be shown, and whether it stopped.

    * A stop string occurs: ``(where the first one starts, True)``; the answer ends there.
    * None occurs: ``(len(text) - held, False)``, where ``held`` is the longest tail of
      ``text`` that is the beginning of some stop string.

    ``shown``: how much was released before. A stop string cannot start before it (its
    beginning would have been held back), so the search starts there; this keeps a long
    answer linear instead of quadratic.
    """
    stops = [s for s in stops if s]
    if not stops:
        return len(text), False
    hits = [i for i in (text.find(s, shown) for s in stops) if i >= 0]
    if hits:
        return min(hits), True
    return len(text) - _held_tail(text, stops, shown), False


def _held_tail(text: str, stops: Sequence[str], shown: int) -> int:
    """Length of the longest tail of ``text[shown:]`` that a stop string starts with."""
    longest = min(max(len(s) for s in stops) - 1, len(text) - shown)
    for n in range(longest, 0, -1):
        tail = text[-n:]
        if any(s.startswith(tail) for s in stops):
            return n
    return 0
