"""The per-request, per-side DRAGON session: a sans-I/O state machine (in the style of h11).

Feed it events (``handle(event)``); it returns actions for its driver to carry out, in order.
It never blocks and never touches a socket or an engine. The driver owns the engine's k
document streams and executes ``Rollback`` / ``Append`` / ``ComputeDist`` on them *in order*;
it answers each ``ComputeDist`` with a ``LocalDist`` event carrying this side's canonical mixed
distribution (``dragon_core.dist.Dist``). Results that arrive after a rollback carry an old
epoch and are dropped, so the driver never has to cancel anything.

One class serves both sides, the aggregating role that moves between them (Greedy Scheduling),
and the baselines: what each mode changes (draft depth, synchronous decisions, whole-sequence
sends, the cloud-only ``Tokens`` stream) is a row of ``dragon_core.modes``; CONCORD's evidence
exchange is its own module (``dragon_core.concord``), which the session hands its decoding to.
A session whose peer is gone
continues alone (``solo``): its drafts *are* samples of its own distribution, so every draft is
committed as is.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Sequence

from dragon_core import concord  # a module reference: concord calls back into this module
from dragon_core import messages as m
from dragon_core.aggregate import cross_side_weights
from dragon_core.codec import dist_from_wire, dist_to_wire
from dragon_core.dist import Dist
from dragon_core.errors import OutOfVocabulary, ProtocolError
from dragon_core.request import RequestSpec, spec_fields
from dragon_core.scheduler import GreedyScheduler, SchedulerConfig, draft_window, observe_draft_time
from dragon_core.speculative import DRAFT_CLOUD, DRAFT_DEVICE, VERIFY, draft, step_rng, synchronous_target, verify

FinishReason = Literal["eos", "length", "cancelled", "peer_lost", "error"]


# ---------------------------------------------------------------------------- configuration
@dataclass(frozen=True, kw_only=True)
class SessionConfig(RequestSpec):
    """One side's configuration: the request's spec (what both sides agree on; the device sends
    it in ``Open``) plus what only this side knows."""

    request_id: int
    eos_ids: frozenset[int]
    # "epoch" drops stale drafts; "step" mimics the reference code (tests show it is inexact)
    tagging: Literal["epoch", "step"] = "epoch"
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    vocab_size: int = 0  # this side's vocabulary (0: unknown); token ids a peer sends must fit it

    def __post_init__(self) -> None:
        if self.rule.aggregator is not None:  # a pinned aggregator has nothing to schedule
            object.__setattr__(self, "aggregator", self.rule.aggregator)
            object.__setattr__(self, "scheduling", False)

    @property
    def depth(self) -> int:
        return self.rule.depth_for(self.max_depth, self.max_tokens)

    @staticmethod
    def from_spec(spec: RequestSpec, request_id: int, eos_ids: Sequence[int], **local) -> "SessionConfig":
        return SessionConfig(**spec_fields(spec), request_id=request_id, eos_ids=frozenset(eos_ids), **local)

    @staticmethod
    def from_open(msg: m.Open, eos_ids: Sequence[int], **local) -> "SessionConfig":
        return SessionConfig.from_spec(RequestSpec.from_open(msg), msg.request_id, eos_ids, **local)


# ---------------------------------------------------------------------------- events (inputs)
@dataclass(frozen=True)
class Start:
    """Begin decoding (the local streams hold the prompts, no generated tokens)."""


@dataclass(frozen=True)
class LocalDist:
    """Answer to ``ComputeDist``: this side's canonical mixture at ``step``."""

    epoch: int
    step: int
    dist: Dist
    decode_ms: float = 0.0
    at_ms: float | None = None  # the host's clock when it was ready (CONCORD times its waits)
    # the retrieval mass of the documents this step was computed over; None: the request's one
    # retrieval (the session's log_h). Iterative retrieval (dragon_core.iterative) changes it
    # at each retrieval boundary.
    log_h: float | None = None
    # RaLMSpec: the boundary whose documents were *speculated* (from the request's cache, not
    # yet checked against the real retrieval) when this step's streams were set up; the draft
    # is held until a ``RetrievalChecked`` for that boundary says they were right
    speculated: int | None = None


@dataclass(frozen=True)
class PeerMessage:
    msg: m.Draft | m.Target | m.Tokens | m.Evidence | m.EvidenceRun | m.EvidenceRequest | m.Cancel | m.Error
    at_ms: float | None = None  # the host's clock when it arrived (CONCORD times its waits)


@dataclass(frozen=True)
class RttSample:
    rtt_ms: float


@dataclass(frozen=True)
class PeerLost:
    reason: str = "peer lost"


@dataclass(frozen=True)
class CancelRequest:
    reason: str = "cancelled by the application"


@dataclass(frozen=True)
class RetrievalChecked:
    """RaLMSpec: the real retrieval for the answer prefix ``prefix`` (a boundary's: its length is
    the boundary step) came back. ``ok``: it equals what was speculated, so the drafts held on it
    may go. Not ok: every draft of ours from that step on was computed over wrong documents: they
    are dropped (none left this side, none was decided) and recomputed over the real ones (the
    driver swaps them in). It may come before or after the drafts it judges."""

    prefix: tuple[int, ...]
    ok: bool


Event = Start | LocalDist | PeerMessage | RttSample | PeerLost | CancelRequest | RetrievalChecked


# ---------------------------------------------------------------------------- actions (outputs)
@dataclass(frozen=True)
class Send:
    msg: m.Message


@dataclass(frozen=True)
class Rollback:
    """Truncate every local stream to ``length`` generated tokens."""

    length: int


@dataclass(frozen=True)
class Append:
    tokens: tuple[int, ...]


@dataclass(frozen=True)
class ComputeDist:
    """Compute the local mixture at the end of the streams (which hold ``step`` tokens), as
    the wire carries it: its ``dist_top_k`` most likely ids (0: the full vector). The session
    says so because the compressed mixture *is* the canonical one both sides aggregate."""

    epoch: int
    step: int
    dist_top_k: int = 0


@dataclass(frozen=True)
class Commit:
    """Target tokens decided: stream them to the user."""

    step: int
    tokens: tuple[int, ...]


@dataclass(frozen=True)
class Finish:
    reason: FinishReason
    degraded: bool = False
    detail: str = ""


Action = Send | Rollback | Append | ComputeDist | Commit | Finish


# ---------------------------------------------------------------------------- bookkeeping
@dataclass(frozen=True)
class _Draft:
    step: int
    token: int
    dist: Dist
    log_h: float  # this side's retrieval mass at this step


@dataclass(frozen=True)
class _RemoteDraft:
    token: int
    dist: Dist
    log_h: float


@dataclass
class SessionStats:
    drafts: int = 0
    verified: int = 0  # steps decided with both sides' drafts (not solo)
    accepted_local: int = 0
    accepted_remote: int = 0
    decided_here: int = 0
    rollbacks: int = 0
    stale_dropped: int = 0
    retrieval_rollbacks: int = 0  # RaLMSpec: speculated documents found wrong, their drafts recomputed
    handovers: int = 0
    aggregator_by_step: list[str] = field(default_factory=list)
    # CONCORD (docs/CONCORD.md): how each step was committed, and what its evidence cost
    steps_certified: int = 0  # by the certificate (the step's evidence, maybe supplemented)
    steps_dense: int = 0  # from the cloud's dense mixture (the certificate could not settle it)
    steps_local: int = 0  # without the cloud's evidence (debt, or the cloud lost): not exact
    steps_supplemented: int = 0  # consulted steps that asked for ids above θ at least once
    evidence_requests: int = 0  # EvidenceRequests sent (θ > 0 and dense)
    evidence_late: int = 0  # evidence for a step committed locally, read for the debt
    evidence_missed: int = 0  # evidence the cloud computed ahead on a guess that proved wrong
    local_overruled: int = 0  # ... whose evidence pointed to another token than the local one
    waited_ms: float = 0.0  # time the device spent waiting for evidence (host clock)
    concord_by_step: list[str] = field(default_factory=list)  # "certified" | "dense" | "local"

    @property
    def steps_consulted(self) -> int:
        """CONCORD steps committed from the cloud's evidence: each equals dense greedy."""
        return self.steps_certified + self.steps_dense


# ---------------------------------------------------------------------------- the session
class Session:
    def __init__(self, side: m.Side, config: SessionConfig, log_h: float, *, solo: bool = False,
                 degraded: bool = False) -> None:
        """``solo``: decode alone (device-only); ``degraded``: alone because the cloud failed."""
        self.side = side
        self.peer = m.other_side(side)
        self.config = config
        self.log_h = log_h
        self.aggregator: m.Side = side if solo else config.aggregator
        self.solo = solo
        self.degraded = degraded
        self.finished: Finish | None = None
        self.committed: list[int] = []
        self.epoch = 0
        self.remote_epoch = 0
        self.stats = SessionStats()
        self.scheduler = GreedyScheduler(config.scheduler)
        if config.prior is not None:
            self.scheduler.estimates.seed(config.prior, side, config.scheduler.min_samples)
        self._drafts: list[_Draft] = []  # undecided local drafts, steps committed..
        self._stream: list[int] = []  # generated tokens currently in the local streams
        self._computing: tuple[int, int] | None = None
        self._discard_computing = False  # the step in flight was computed over documents found wrong
        self._unchecked: dict[int, tuple[int, ...]] = {}  # RaLMSpec: boundary -> its prefix, speculated, unchecked
        self._checks: dict[tuple[int, ...], bool] = {}  # boundary prefixes the real retrieval judged
        self._remote: dict[int, _RemoteDraft] = {}
        self._unsent: list[m.Draft] = []  # sequence-wise mode sends its drafts in one batch
        self._draft_purpose = DRAFT_DEVICE if side == "device" else DRAFT_CLOUD
        self._out: list[Action] = []
        self.peer_error: m.Error | None = None  # the peer's typed error for this request, if it sent one
        self._concord = None  # CONCORD's role on this side, when the mode's evidence crosses
        if config.rule.crosses == "evidence":
            self._concord = (concord.ConcordDevice if side == "device" else concord.ConcordCloud)(self)

    # ------------------------------------------------------------------ public API
    @property
    def is_aggregator(self) -> bool:
        return self.aggregator == self.side

    @property
    def awaiting_peer(self) -> bool:
        """Nothing of ours is in flight: the session moves on only when the peer sends something
        (the request idle rule, ``dragon_core.idle``, counts the peer's silence only then)."""
        return self.finished is None and not self.solo and self._computing is None

    @property
    def decides_alone(self) -> bool:
        """No peer draft to verify: a solo session, or either side of a cloud-only request."""
        return self.solo or self.config.rule.streams_tokens

    def handle(self, event: Event) -> list[Action]:
        """Process one event; return the actions it causes (in the order to execute them)."""
        self._out = []
        if self.finished is None:
            try:
                self._dispatch(event)
                self._pump()
            except ProtocolError as exc:
                self._on_protocol_error(exc)
                self._pump()
        out, self._out = self._out, []
        return out

    def _on_protocol_error(self, exc: ProtocolError) -> None:
        """A peer broke the protocol: tell it, then the device goes on alone, the cloud stops."""
        self._emit(Send(m.Error(exc.code, str(exc), self.config.request_id)))
        if self.side == "cloud":
            self._finish("error", str(exc))
            return
        self.epoch += 1  # invalidates any draft in flight; streams resync to the committed text
        self._drafts.clear()
        self._on_peer_gone(f"protocol error: {exc}")

    # ------------------------------------------------------------------ dispatch
    def _dispatch(self, event: Event) -> None:
        if isinstance(event, Start):
            return
        if isinstance(event, LocalDist):
            self._on_local_dist(event)
        elif isinstance(event, PeerMessage):
            self._on_peer(event.msg, event.at_ms)
        elif isinstance(event, RttSample):
            self.scheduler.estimates.rtt.update(event.rtt_ms)
        elif isinstance(event, PeerLost):
            self._on_peer_gone(event.reason)
        elif isinstance(event, RetrievalChecked):
            self._on_retrieval_checked(event)
        elif isinstance(event, CancelRequest):
            if not self.solo:
                self._emit(Send(m.Cancel(self.config.request_id, event.reason)))
            self._finish("cancelled", event.reason)
        else:
            raise TypeError(f"unknown event {event!r}")

    def _on_peer(self, msg: m.Message, at_ms: float | None = None) -> None:
        if self.solo:
            return  # late frames from a peer we already gave up on
        if self._concord is not None and not isinstance(msg, (m.Cancel, m.Error)):
            self._concord.on_peer(msg, at_ms)
            return
        if isinstance(msg, m.Draft):
            self._on_remote_draft(msg)
        elif isinstance(msg, m.Target):
            self._on_target(msg)
        elif isinstance(msg, m.Tokens):
            self._on_tokens(msg)
        elif isinstance(msg, m.Cancel):
            self._on_peer_gone(f"peer cancelled: {msg.reason}")
        elif isinstance(msg, m.Error):
            self.peer_error = msg
            self._on_peer_gone(f"peer error {msg.code}: {msg.message}")
        else:
            raise ProtocolError(f"unexpected message {type(msg).__name__} in a session")

    # ------------------------------------------------------------------ local drafting
    def _on_local_dist(self, ev: LocalDist) -> None:
        if self._computing != (ev.epoch, ev.step):
            raise RuntimeError(f"driver answered {ev.epoch, ev.step}, expected {self._computing}")
        self._computing = None
        if ev.epoch != self.epoch or self._discard_computing:
            self._discard_computing = False
            self.stats.stale_dropped += 1  # built on a prefix rolled back meanwhile, or on wrong documents
            return
        if ev.speculated is not None:
            key = tuple(self._stream[: ev.speculated])
            if self._checks.get(key) is False:  # judged wrong while it was computed: recompute
                self.stats.stale_dropped += 1
                return
            if key not in self._checks:
                self._unchecked[ev.speculated] = key
        observe_draft_time(self.scheduler.estimates.c_local, ev.step, ev.decode_ms)
        if self._concord is not None:
            self._concord.on_local_dist(ev)
            return
        token = draft(ev.dist, self.config.sampling, step_rng(self.config.seed, self._draft_purpose, ev.step, ev.epoch))
        log_h = self.log_h if ev.log_h is None else ev.log_h
        self._drafts.append(_Draft(ev.step, token, ev.dist, log_h))
        self.stats.drafts += 1
        if not self.is_aggregator:
            wire = m.Draft(self.config.request_id, self.epoch, ev.step, token, dist_to_wire(ev.dist), log_h, ev.decode_ms)
            self._unsent.append(wire)

    def _can_draft_at(self, step: int) -> bool:
        if step >= self.config.max_tokens or len(self._drafts) >= self._window():
            return False
        if self.config.rule.streams_tokens and not self.is_aggregator:
            return False  # cloud-only: the device computes nothing while the cloud is there
        return not (self._drafts and self._drafts[-1].token in self.config.eos_ids)

    def _window(self) -> int:
        """Undecided drafts allowed ahead: the mode's fixed depth, or for DRAGON the window that
        covers one round trip (``scheduler.draft_window``), capped by ``max_depth``."""
        if self.config.rule.depth != "window" or self._unchecked:
            # RaLMSpec: drafts held on speculated documents cannot be decided yet, so computing
            # ahead (up to the request's cap) is what hides the real retrieval
            return self.config.depth
        return draft_window(self.scheduler.estimates, self.config.depth)

    def _pump(self) -> None:
        """Move forward as far as the current state allows: decide, send, draft."""
        if self._concord is not None:
            self._concord.pump()
            return
        if self.finished is None and self.is_aggregator:
            self._decide_ready_steps()
        if self.finished is not None:
            return
        self._flush_drafts()
        next_step = len(self.committed) + len(self._drafts)
        if self._computing is None and self._can_draft_at(next_step):
            self._sync_streams(self.committed + [d.token for d in self._drafts])
            self._computing = (self.epoch, next_step)
            self._emit(ComputeDist(self.epoch, next_step, self.config.dist_top_k))

    def _flush_drafts(self) -> None:
        if not self._unsent or self.is_aggregator:
            return
        if self.config.rule.sends_whole_sequence and (self._can_draft_at(len(self.committed) + len(self._drafts))
                                                      or self._held_from() is not None):
            return  # sequence-wise: send only the whole sequence, checked
        held = self._held_from()
        ready = [msg for msg in self._unsent if held is None or msg.step < held]
        for msg in ready:
            self._emit(Send(msg))
        self._unsent = self._unsent[len(ready):]

    def waiting_for_retrieval(self) -> bool:
        """RaLMSpec: nothing moves until a speculated boundary is verified: drafts are held on
        unchecked documents and no further step may be computed (the window is full, or the
        answer's end was drafted). The host then verifies what it was batching, at once."""
        if not self._unchecked or self._computing is not None or self.finished is not None:
            return False
        return not self._can_draft_at(len(self.committed) + len(self._drafts))

    def _held_from(self) -> int | None:
        """RaLMSpec: the first step whose documents are speculated and unchecked (None: none);
        our drafts from there on neither leave this side nor get decided."""
        return min(self._unchecked) if self._unchecked else None

    def _on_retrieval_checked(self, ev: RetrievalChecked) -> None:
        self._checks[ev.prefix] = ev.ok
        step = len(ev.prefix)
        if not ev.ok and self._computing is not None and self._computing[1] >= step \
                and tuple(self._stream[:step]) == ev.prefix:
            self._discard_computing = True  # in flight over the wrong documents
        if self._unchecked.get(step) != ev.prefix:
            return  # not (yet) drafted on, or its drafts were dropped already (a rejection)
        del self._unchecked[step]
        if ev.ok:
            return
        self._unchecked = {b: key for b, key in self._unchecked.items() if b < step}
        self._drafts = [d for d in self._drafts if d.step < step]
        self._unsent = [msg for msg in self._unsent if msg.step < step]
        self.stats.retrieval_rollbacks += 1

    def _sync_streams(self, want: list[int]) -> None:
        keep = 0
        limit = min(len(want), len(self._stream))
        while keep < limit and want[keep] == self._stream[keep]:
            keep += 1
        if keep < len(self._stream):
            self._emit(Rollback(keep))
            self.stats.rollbacks += 1
        if keep < len(want):
            self._emit(Append(tuple(want[keep:])))
        self._stream = list(want)

    # ------------------------------------------------------------------ aggregation
    def _on_remote_draft(self, msg: m.Draft) -> None:
        if not self.is_aggregator:
            return  # crossed a handover in flight; the new aggregator holds it already
        stale = msg.step < len(self.committed) or (self.config.tagging == "epoch" and msg.epoch != self.remote_epoch)
        if stale:
            if msg.epoch > self.remote_epoch:
                raise ProtocolError(f"draft from epoch {msg.epoch}, expected {self.remote_epoch}")
            self.stats.stale_dropped += 1
            return
        if self.config.tagging == "step" and msg.step in self._remote:
            return  # the reference keeps the first draft it got for a step
        observe_draft_time(self.scheduler.estimates.c_remote, msg.step, msg.decode_ms)
        self._remote[msg.step] = _RemoteDraft(msg.token, dist_from_wire(msg.dist), msg.log_h)

    def _decide_ready_steps(self) -> None:
        while self.finished is None and self.is_aggregator:
            step = len(self.committed)
            local = self._drafts[0] if self._drafts else None
            held = self._held_from()
            if local is None or (held is not None and local.step >= held):
                return  # nothing drafted, or drafted over documents not checked yet
            if self.decides_alone:
                self._commit(local.token, accepted_local=True)
                continue
            remote = self._remote.get(step)
            if remote is None:
                return
            if remote.dist.vocab_size != local.dist.vocab_size or not 0 <= remote.token < local.dist.vocab_size:
                raise OutOfVocabulary("peer draft does not match this side's vocabulary")
            self._decide(step, local, remote)

    def _decide(self, step: int, local: _Draft, remote: _RemoteDraft) -> None:
        cfg = self.config
        _, eta_remote = cross_side_weights(local.log_h, remote.log_h)  # both sides' masses at this step
        rng = step_rng(cfg.seed, VERIFY, step)
        if cfg.rule.synchronous:
            token = synchronous_target(local.dist, remote.dist, eta_remote, cfg.sampling, rng)
        else:
            token = verify(local.token, local.dist, remote.token, remote.dist, eta_remote, cfg.sampling, rng).token
        acc_local, acc_remote = local.token == token, remote.token == token
        self.stats.decided_here += 1
        self.stats.verified += 1
        self.stats.accepted_remote += int(acc_remote)
        est = self.scheduler.estimates
        est.alpha_local.update(float(acc_local))
        est.alpha_remote.update(float(acc_remote))
        self.scheduler.on_target()
        if acc_remote:
            del self._remote[step]
        else:
            self.remote_epoch += 1
            self._remote.clear()
        ends = token in cfg.eos_ids or step + 1 >= cfg.max_tokens
        handover = bool(cfg.scheduling and not ends
                        and self.scheduler.should_hand_over(self.side, cfg.max_tokens - step - 1))
        my_epoch = self.epoch if acc_local else self.epoch + 1  # _commit bumps it on rejection
        self._emit(Send(m.Target(cfg.request_id, step, token, acc_remote, self.remote_epoch, my_epoch,
                                 handover, est.c_local.value or 0.0)))
        self._commit(token, accepted_local=acc_local)
        if handover:
            self._hand_over()

    def _hand_over(self) -> None:
        """Give the aggregator role to the peer: it gets our pending drafts after the Target."""
        self.aggregator = self.peer
        self.stats.handovers += 1
        self.scheduler.on_moved()
        self._remote.clear()
        for d in self._drafts:
            self._unsent.append(m.Draft(self.config.request_id, self.epoch, d.step, d.token,
                                        dist_to_wire(d.dist), d.log_h, self.scheduler.estimates.c_local.value or 0.0))

    # ------------------------------------------------------------------ following the aggregator
    def _on_target(self, msg: m.Target) -> None:
        if self.is_aggregator:
            raise ProtocolError("received a Target while aggregating")
        step = len(self.committed)
        if msg.step != step or not self._drafts or self._drafts[0].step != step:
            raise ProtocolError(f"target for step {msg.step}, expected {step} with a pending draft")
        self._check_vocab([msg.token])
        accepted = self._drafts[0].token == msg.token
        if self.config.tagging == "epoch" and accepted != msg.accepted:
            raise ProtocolError(f"target step {step}: accept flag disagrees with our draft")
        est = self.scheduler.estimates
        est.alpha_local.update(float(accepted))
        peer_accepted = msg.sender_epoch == self.remote_epoch  # the aggregator bumps it on rejection
        est.alpha_remote.update(float(peer_accepted))
        self.stats.verified += 1
        self.stats.accepted_remote += int(peer_accepted)
        if msg.sender_decode_ms:
            est.c_remote.update(msg.sender_decode_ms)
        self.remote_epoch = msg.sender_epoch
        self._commit(msg.token, accepted_local=accepted)
        if self.config.tagging == "epoch" and msg.recipient_epoch != self.epoch:
            raise ProtocolError(f"epoch mismatch: peer expects {msg.recipient_epoch}, we are at {self.epoch}")
        if msg.handover and self.finished is None:
            self.aggregator = self.side
            self.scheduler.on_moved()
            self._unsent.clear()
            self._remote.clear()

    def _check_vocab(self, tokens: Sequence[int]) -> None:
        vocab = self.config.vocab_size
        if vocab and not all(0 <= token < vocab for token in tokens):
            raise OutOfVocabulary(f"token ids outside this model's vocabulary of {vocab}")

    def _on_tokens(self, msg: m.Tokens) -> None:
        """Cloud-only mode: the cloud decided these tokens alone; the device commits them as is."""
        if not self.config.rule.streams_tokens or self.is_aggregator:
            raise ProtocolError("Tokens frames belong to a cloud-only request, sent by the cloud")
        if msg.step != len(self.committed):
            raise ProtocolError(f"tokens from step {msg.step}, expected {len(self.committed)}")
        self._check_vocab(msg.tokens)
        for token in msg.tokens:
            if self.finished is None:  # tokens past EOS / max_tokens are ignored
                self._record_commit(token)

    # ------------------------------------------------------------------ committing and ending
    def _commit(self, token: int, *, accepted_local: bool) -> None:
        if accepted_local:
            self._drafts.pop(0)
            self.stats.accepted_local += int(not self.decides_alone)  # acceptance counts verified steps only
        else:
            self.epoch += 1
            self._drafts.clear()
            self._unsent.clear()
            self._unchecked.clear()  # what was speculated on the rejected drafts' prefix: moot
        self._record_commit(token)

    def _record_commit(self, token: int) -> None:
        step = len(self.committed)
        self.committed.append(token)
        self.stats.aggregator_by_step.append(self.aggregator)
        if self.config.rule.streams_tokens and self.side == "cloud" and not self.solo:
            # sent before Finish, so the device gets the last token before the cloud lets go
            self._emit(Send(m.Tokens(self.config.request_id, step, [token])))
        self._emit(Commit(step, (token,)))
        if token in self.config.eos_ids:
            self._finish("eos")
        elif len(self.committed) >= self.config.max_tokens:
            self._finish("length")

    def _on_peer_gone(self, reason: str) -> None:
        """The device continues alone from the last committed token; the cloud stops."""
        if self.side == "cloud":
            self._finish("peer_lost", reason)
            return
        self.solo = True
        self.degraded = True
        self.aggregator = self.side
        self._remote.clear()
        self._unsent.clear()

    def _finish(self, reason: FinishReason, detail: str = "") -> None:
        if self.finished is None:
            self.finished = Finish(reason, self.degraded, detail)
            self._emit(self.finished)

    def _emit(self, action: Action) -> None:
        self._out.append(action)
