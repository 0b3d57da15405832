"""When is a silent peer lost? The dead-peer rule of the link, sans-I/O (no clocks: every call
takes the time, in any unit as long as it is the same one as the deadline's).

Both ends of a link ping every ``ping_interval`` and answer every ping with a pong, from the
read loop, whatever the engine is doing. So a live peer is never silent for much longer than a
ping interval plus the link's delay variation, and a peer that stays silent for longer than
``deadline`` (several ping intervals) is lost. Any frame counts as life (a draft is as good as
a pong). A peer sending nothing at all is what a blackholed or half-dead TCP connection looks
like: the kernel would notice only after minutes of retransmissions.

A check that itself comes late (our own loop was stalled for more than ``stall`` since the
previous check: a blocking call, a suspended laptop) does not judge: frames the peer sent
during the stall may still be waiting in our socket. The next check, after the read loop has
had its turn, does.

The device link (``dragon_edge.link``), the cloud link (``dragon_vllm.link``) and the simulator
(``dragon_core.testing.netsim``) all use this class.
"""

from __future__ import annotations

import math

DEFAULT_PEER_TIMEOUT_S = 3.0


class PeerLiveness:
    def __init__(self, deadline: float, now: float, stall: float | None = None) -> None:
        """``deadline``: the longest silence a live peer may keep (<= 0 or inf: never lost).
        ``now``: when we last heard the peer (the handshake). ``stall``: a check later than this
        after the previous check is not judged (None: every check judges)."""
        if math.isnan(deadline) or (stall is not None and not stall > 0):
            raise ValueError("deadline must be a number, stall > 0 or None")
        self.deadline = deadline if deadline > 0 else math.inf
        self.stall = stall
        self.last_heard = now
        self._last_check: float | None = None

    @classmethod
    def for_link(cls, deadline_s: float, now: float) -> "PeerLiveness":
        """The links' setting: checks every ``tick`` (a twentieth of the deadline, at most 0.1 s);
        a check more than a quarter of the deadline after the previous one does not judge. A
        judged check has read every frame that arrived before the previous check, so the silence
        it measures is short by at most ``stall``: never a false loss for a peer silent less than
        three quarters of the deadline."""
        stall = deadline_s / 4 if deadline_s > 0 and math.isfinite(deadline_s) else None
        return cls(deadline_s, now, stall)

    @property
    def tick(self) -> float:
        """How often a link checks (inf when disabled)."""
        return min(0.1, self.deadline / 20) if self.enabled else math.inf

    @property
    def enabled(self) -> bool:
        return math.isfinite(self.deadline)

    def heard(self, now: float) -> None:
        """A frame (any frame) arrived from the peer at ``now``."""
        self.last_heard = max(self.last_heard, now)

    def silence(self, now: float) -> float:
        """How long the peer has been silent at ``now``."""
        return max(0.0, now - self.last_heard)

    def lost(self, now: float) -> bool:
        """The rule: the peer is lost at ``now`` iff it has been silent for longer than the
        deadline, judged by a check that is not itself late."""
        late = self.stall is not None and self._last_check is not None and now - self._last_check > self.stall
        self._last_check = now
        return not late and self.silence(now) > self.deadline

    def next_check(self, now: float) -> float:
        """How long from ``now`` until the deadline can pass if nothing arrives (inf: never)."""
        return max(0.0, self.last_heard + self.deadline - now)
