"""The bookkeeping of a stream group that every engine does the same way.

A group holds k streams ``prompt_i + generated``, where ``generated`` is one token list shared
by all of them (lockstep, ``dragon_core.engine``). What the engine keeps of those tokens (a KV
cache, vLLM sessions, a gang of rows) differs by engine; the list itself, its length and what
a rollback may ask for do not, so they are written once here and both the device's and the
cloud's groups build on this class.
"""

from __future__ import annotations

from typing import Sequence


class Lockstep:
    """k prompts and the generated tokens they share; ``length`` counts generated tokens only."""

    # What an impossible rollback, and a call on a closed group, raise: on the device a
    # ValueError and a RuntimeError (a caller's bug), in the cloud a ProtocolError (the
    # request came from the peer, who is told so).
    rollback_error: type[Exception] = ValueError
    closed_error: type[Exception] = RuntimeError

    def __init__(self, prompts: list[list[int]]) -> None:
        self.prompts = prompts
        self._generated: list[int] = []
        self._closed = False

    @property
    def num_streams(self) -> int:
        return len(self.prompts)

    @property
    def length(self) -> int:
        return len(self._generated)

    def _extend(self, tokens: Sequence[int]) -> None:
        self._generated.extend(int(t) for t in tokens)

    def _truncate(self, length: int) -> bool:
        """Keep the first ``length`` generated tokens; False when there was nothing to drop."""
        if not 0 <= length <= len(self._generated):
            raise self.rollback_error(f"cannot roll back to {length}: the streams hold {len(self._generated)} tokens")
        if length == len(self._generated):
            return False
        del self._generated[length:]
        return True

    def _check_open(self) -> None:
        if self._closed:
            raise self.closed_error("the stream group is closed")

    def _mark_closed(self) -> bool:
        """Mark the group closed; True only the first time (closing twice is allowed and a no-op)."""
        first, self._closed = not self._closed, True
        return first
