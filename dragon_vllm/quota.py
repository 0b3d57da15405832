"""Quotas per device identity, across all of its connections.

The link caps requests per connection; a device that opens more connections would get around
that cap, and the streams its requests hold (k each, with their KV blocks) are what everyone
shares. So the cloud also counts, per identity (``dragon_vllm.device_tokens``: a named token, or
the peer's address), the requests it has open and the streams they may hold, and refuses an
``Open`` that would go over either limit at once (``QuotaExceeded``) rather than queueing it.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Usage:
    requests: int = 0
    streams: int = 0


class IdentityQuotas:
    def __init__(self, max_requests: int, max_streams: int) -> None:
        """Limits per identity; 0 = no limit."""
        if max_requests < 0 or max_streams < 0:
            raise ValueError("quotas must be >= 0 (0: no limit)")
        self.max_requests, self.max_streams = max_requests, max_streams
        self._usage: dict[str, Usage] = {}

    def claim(self, identity: str, streams: int) -> str | None:
        """Count one more request holding ``streams`` streams, or say why not (nothing counted)."""
        used = self._usage.get(identity, Usage())
        if self.max_requests and used.requests + 1 > self.max_requests:
            return f"{identity} already has {used.requests} open requests (quota {self.max_requests} per identity)"
        if self.max_streams and used.streams + streams > self.max_streams:
            return (f"{identity} holds {used.streams} streams and this request needs {streams} "
                    f"(quota {self.max_streams} per identity)")
        self._usage[identity] = Usage(used.requests + 1, used.streams + streams)
        return None

    def release(self, identity: str, streams: int) -> None:
        used = self._usage[identity]
        used.requests -= 1
        used.streams -= streams
        if used.requests == 0:
            del self._usage[identity]  # nothing kept for identities that come and go

    def usage(self) -> dict[str, Usage]:
        return {name: Usage(u.requests, u.streams) for name, u in self._usage.items()}
