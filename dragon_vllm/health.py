"""What ``/health`` says, read from the admission control's state (``engine_stats``).

* ``ok`` (200): streams and KV blocks to spare, nobody waiting.
* ``degraded`` (200): still admitting at once, but ``DEGRADED_AT`` or more of the stream slots
  or of the KV-block budget is taken: a monitor should look, a load balancer keeps sending.
* ``saturated`` (503, ``Retry-After``): a request arriving now would wait, because requests
  are already queued for admission or a slot or the KV budget is used up. A load balancer
  takes the server out of rotation until it drains (503 is what they all understand).
"""

from __future__ import annotations

from dataclasses import dataclass, field

DEGRADED_AT = 0.8
RETRY_AFTER_S = 1


@dataclass(frozen=True)
class Health:
    status: str
    http_status: int
    reasons: list[str] = field(default_factory=list)


def assess(stats: dict) -> Health:
    """``stats``: ``open_streams``, ``max_streams``, ``reserved_blocks``, ``kv_blocks_capacity``,
    ``queued_groups`` (any missing: that resource is not judged)."""
    queued = stats.get("queued_groups") or 0
    streams = _share(stats.get("open_streams"), stats.get("max_streams"))
    blocks = _share(stats.get("reserved_blocks"), stats.get("kv_blocks_capacity"))
    full = [name for name, share in (("stream slots", streams), ("KV blocks", blocks)) if share >= 1.0]
    if queued or full:
        reasons = ([f"{queued} request(s) waiting for admission"] if queued else []) + [f"{n} all taken" for n in full]
        return Health("saturated", 503, reasons)
    busy = [f"{name} {share:.0%} taken" for name, share in (("stream slots", streams), ("KV blocks", blocks))
            if share >= DEGRADED_AT]
    if busy:
        return Health("degraded", 200, busy)
    return Health("ok", 200)


def _share(used, capacity) -> float:
    if not isinstance(used, (int, float)) or not isinstance(capacity, (int, float)) or capacity <= 0:
        return 0.0
    return used / capacity
