"""What an answer reports about itself (the SDK's ``dragon`` field): ``AnswerStats``, filled
once, at the end, by ``finish_stats``."""

from __future__ import annotations

from dataclasses import dataclass, field

from dragon_core import messages as m
from dragon_core import session as s
from dragon_core.modes import ModeRule


@dataclass
class Source:
    side: str  # "device" (private) or "cloud" (public)
    name: str
    score: float | None = None
    text: str | None = None  # private passages stay local: only shown to the app itself


@dataclass
class AnswerStats:
    mode: str = ""  # the mode that ran ("device" when use_cloud=False); ``degraded``: it had to finish on the device
    tokens: int = 0
    degraded: bool = False
    finish_reason: str = ""
    device_only: bool = False
    ttft_s: float | None = None
    per_token_latency_ms: list[float] = field(default_factory=list)
    acceptance_device: float | None = None
    acceptance_cloud: float | None = None
    rollbacks: int = 0
    handovers: int = 0
    aggregator_steps: dict[str, int] = field(default_factory=dict)
    final_aggregator: str | None = None
    delta_z_ms: float | None = None  # the scheduler's last ΔZ, where this side aggregated
    bytes_sent: int = 0
    bytes_received: int = 0
    sources: list[Source] = field(default_factory=list)
    # the cloud's typed error for this request ({"code", "message"}), e.g. quota_exceeded or
    # request_idle_timeout: the answer then finished on the device (degraded)
    cloud_error: dict | None = None

    @property
    def bytes_per_token(self) -> float:
        return (self.bytes_sent + self.bytes_received) / max(1, self.tokens)

    def as_dict(self) -> dict:
        d = {k: v for k, v in self.__dict__.items() if k != "sources"}
        d["bytes_per_token"] = self.bytes_per_token
        d["sources"] = [{k: v for k, v in src.__dict__.items() if v is not None} for src in self.sources]
        return d

    def count_traffic(self, traffic) -> None:
        """This request's frames on the link (``link.release``): answers may share the link."""
        self.bytes_sent, self.bytes_received = traffic.sent, traffic.received


def finish_stats(stats: AnswerStats, session: s.Session, finish: s.Finish, rule: ModeRule,
                 opened: m.Opened | None) -> AnswerStats:
    """Everything the session knows, once it has finished."""
    st = session.stats
    stats.tokens = len(session.committed)
    stats.degraded = finish.degraded or session.degraded
    stats.finish_reason = finish.reason
    stats.rollbacks = st.rollbacks
    # moves either way (the device's own count misses those the cloud made)
    stats.handovers = sum(a != b for a, b in zip(st.aggregator_by_step, st.aggregator_by_step[1:]))
    stats.final_aggregator = session.aggregator
    if session.peer_error is not None:
        stats.cloud_error = dict(code=session.peer_error.code, message=session.peer_error.message)
    stats.delta_z_ms = session.scheduler.last_delta_z
    for side in st.aggregator_by_step:
        stats.aggregator_steps[side] = stats.aggregator_steps.get(side, 0) + 1
    if st.verified:
        stats.acceptance_device = st.accepted_local / st.verified
        stats.acceptance_cloud = st.accepted_remote / st.verified
    if opened is not None:
        stats.sources += [Source("cloud", name) for name in opened.sources]
    if not rule.device_passages and not stats.degraded:  # the private passages were never used
        stats.sources = [src for src in stats.sources if src.side == "cloud"]
    return stats
