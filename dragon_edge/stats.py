"""What an answer reports about itself (the SDK's ``dragon`` field): ``AnswerStats``, built
once, at the end, by ``answer_stats`` (the tokens' timing is kept as they come by ``Timing``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

from dragon_core import messages as m
from dragon_core import session as s
from dragon_core.connection import Traffic
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
    retrievals: int = 0  # iterative retrieval: the device's private passages retrieved again (boundaries, rollbacks)
    aggregator_steps: dict[str, int] = field(default_factory=dict)
    # the same in order, as runs: [["device", 4], ["cloud", 19]] = 4 steps on the device, then 19
    aggregator_runs: list[list] = field(default_factory=list)
    final_aggregator: str | None = None
    delta_z_ms: float | None = None  # the scheduler's last ΔZ, where this side aggregated
    bytes_sent: int = 0
    bytes_received: int = 0
    sources: list[Source] = field(default_factory=list)
    # the cloud's typed error for this request ({"code", "message"}), e.g. quota_exceeded or
    # request_idle_timeout: the answer then finished on the device (degraded)
    cloud_error: dict | None = None
    # CONCORD (mode concord; None in the other modes; docs/CONCORD.md): how each step committed —
    # certified from the cloud's evidence, from its dense mixture, or locally (not exact);
    # consulted = certified + dense (each equals dense DRAGON greedy); supplemented: consulted
    # steps that asked for the ids above θ at least once
    steps_certified: int | None = None
    steps_local: int | None = None
    steps_dense: int | None = None
    steps_consulted: int | None = None
    steps_supplemented: int | None = None
    evidence_requests: int | None = None
    evidence_late: int | None = None
    evidence_missed: int | None = None  # computed ahead by the cloud on a guess of ours that was wrong
    local_overruled: int | None = None
    waited_ms: float | None = None

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


@dataclass
class Timing:
    """When the answer started and when each token came: time to first token, and the gap
    before each token (the first one's counted from the start)."""

    t0: float
    ttft_s: float | None = None
    per_token_latency_ms: list[float] = field(default_factory=list)
    last: float | None = None

    def token(self, at: float) -> None:
        if self.ttft_s is None:
            self.ttft_s = at - self.t0
        self.per_token_latency_ms.append((at - (self.t0 if self.last is None else self.last)) * 1000)
        self.last = at


CONCORD_COUNTS = ("steps_certified", "steps_local", "steps_dense", "steps_consulted", "steps_supplemented",
                  "evidence_requests", "evidence_late", "evidence_missed", "local_overruled", "waited_ms")


def answer_stats(*, mode: str, rule: ModeRule, private: Sequence, public: m.Opened | None, opened: m.Opened | None,
                 device_only: bool, session: s.Session, finish: s.Finish, timing: Timing,
                 traffic: Traffic | None) -> AnswerStats:
    """The stats of one finished answer: its sources (the private passages; DRCG's public ones
    with their text, DRAGON's by name), its timing, this request's bytes on the link (answers
    may share the link) and what the session knows."""
    stats = AnswerStats(mode=mode, sources=[Source("device", p.source, float(p.score), p.text) for p in private],
                        device_only=device_only, ttft_s=timing.ttft_s,
                        per_token_latency_ms=timing.per_token_latency_ms)
    if public is not None:
        stats.sources += [Source("cloud", name, score, text)
                          for name, text, score in zip(public.sources, public.passages, public.scores)]
    if traffic is not None:
        stats.count_traffic(traffic)
    return _from_session(stats, session, finish, rule, opened)


def _from_session(stats: AnswerStats, session: s.Session, finish: s.Finish, rule: ModeRule,
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
        if stats.aggregator_runs and stats.aggregator_runs[-1][0] == side:
            stats.aggregator_runs[-1][1] += 1
        else:
            stats.aggregator_runs.append([side, 1])
    if rule.crosses == "evidence":
        for name in CONCORD_COUNTS:
            setattr(stats, name, getattr(st, name))
    if st.verified:
        stats.acceptance_device = st.accepted_local / st.verified
        stats.acceptance_cloud = st.accepted_remote / st.verified
    if opened is not None:
        stats.sources += [Source("cloud", name) for name in opened.sources]
    if not rule.device_passages and not stats.degraded:  # the private passages were never used
        stats.sources = [src for src in stats.sources if src.side == "cloud"]
    return stats
