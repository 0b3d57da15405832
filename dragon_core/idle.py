"""When has a request been left waiting on its peer for too long? The per-request idle rule of
the link, sans-I/O (every call takes the time; no clock inside).

``liveness.PeerLiveness`` judges a whole connection: a peer that answers pings is alive. That
is not enough: a live peer can open requests and then never send a draft or a target for them,
and each such request holds its k engine streams and their KV blocks. So each open request also
has a deadline: it is **idle** when its side has nothing of its own in flight (the session is
``awaiting_peer``: no draft being computed, so it moves on only when the peer sends something)
and the peer has sent no frame for that request for longer than ``deadline``.

Time spent working locally never counts against the peer: while the session computes, the
peer's silence is expected (it waits on us). So a cloud-only request (the cloud decodes alone,
the device sends nothing) never idles, and a slow engine on our side never blames the peer. The
silence rule itself, including "a late check does not judge", is ``PeerLiveness``'s.
"""

from __future__ import annotations

from dragon_core.liveness import PeerLiveness

# Far above a legitimate wait: a device's prefill plus max_depth decode steps. A sequence-wise
# (``sw``) request with the cloud aggregating waits for the device's whole answer: raise it there.
DEFAULT_REQUEST_IDLE_S = 30.0


class RequestIdle:
    def __init__(self, deadline: float, now: float) -> None:
        """``deadline`` <= 0 or inf: never idle. ``now``: when the request opened."""
        self._silence = PeerLiveness.for_link(deadline, now)

    @property
    def enabled(self) -> bool:
        return self._silence.enabled

    @property
    def deadline(self) -> float:
        return self._silence.deadline

    @property
    def tick(self) -> float:
        """How often the host should call ``expired`` (inf when disabled)."""
        return self._silence.tick

    def heard(self, now: float) -> None:
        """A frame for this request arrived from the peer."""
        self._silence.heard(now)

    def silence(self, now: float) -> float:
        return self._silence.silence(now)

    def expired(self, awaiting_peer: bool, now: float) -> bool:
        """The rule: idle iff we have been waiting on the peer, with nothing from it for this
        request, for longer than the deadline (judged by a check that is not itself late)."""
        if not awaiting_peer:
            self._silence.heard(now)  # the peer owes us nothing yet: its silence does not count
        return self._silence.lost(now)
