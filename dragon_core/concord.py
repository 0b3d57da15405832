"""CONCORD's two roles inside a ``Session`` (issue 14; docs/CONCORD.md, docs/ALGORITHMS.md §6).

A session whose mode row crosses ``"evidence"`` hands its decoding to one of these; the session
keeps everything the modes share (events, actions, stream sync, commits, cancel, a lost peer,
protocol errors). Greedy decoding only.

* ``ConcordDevice`` aggregates. Each step it computes its own mixture ``p^d`` on the committed
  prefix, and either commits locally (the waiting debt says waiting does not pay, or the cloud
  is gone) or consults the cloud's evidence for the step: a certified token commits at once,
  otherwise it asks for the ids that can settle the step (``θ``), and last for the dense
  mixture. Every committed token goes up as ``Tokens``; evidence for a step already committed
  (late) only updates the debt and the stats.
* ``ConcordCloud`` follows: it computes its mixture on the prefix it was sent (skipping ahead
  when the device outran it), publishes the step's ``Evidence`` and answers requests for more.

Time enters only through the events' ``at_ms`` (the host's clock, like ``liveness``); without it
a wait is counted as one round trip of the scheduler's RTT estimate.
"""

from __future__ import annotations

import numpy as np

from dragon_core import concord_wire as cw
from dragon_core import messages as m
from dragon_core import session as sess  # a module reference: the session imports this module too
from dragon_core.aggregate import cross_side_weights
from dragon_core.certificate import Evidence, WaitingDebt, certify
from dragon_core.codec import dist_from_wire, dist_to_wire
from dragon_core.dist import Dist
from dragon_core.errors import OutOfVocabulary, ProtocolError
from dragon_core.speculative import DRAFT_CLOUD, DRAFT_DEVICE, VERIFY, draft, step_rng, synchronous_target

RHO, GAIN = 0.9, 8.0  # the debt's decay and the gain of a step the evidence changed (§6's start)
RUN_MAX = 4  # one-entry frames the cloud holds for one EvidenceRun: a step's evidence waits for
# at most 3 more of the cloud's steps, ~10 ms on a GPU against a device step of ~28 ms
LATE_KEPT = 16  # local steps whose p^d awaits late evidence (~RTT / local step; a full p^d holds ~0.6 MB)


def lookahead(config: "sess.SessionConfig") -> int:
    """Steps the cloud computes past the device's last token it has (the request's
    ``max_depth``; 1: none ahead). The device refuses evidence further out than this."""
    return max(1, config.max_depth)


class ConcordDevice:
    def __init__(self, session: "sess.Session") -> None:
        if not session.config.sampling.greedy:
            raise ValueError("concord certifies greedy tokens; sampling is not supported")
        self.s = session
        self.debt = WaitingDebt(d_max=session.config.concord_debt_max, rho=RHO, gain=GAIN)
        self.cloud_log_h: float | None = None
        self._local: Dist | None = None  # p^d at the current step
        self._local_at: float | None = None  # when it was ready (host clock)
        self._consult: bool | None = None  # this step's choice, made when p^d is ready
        self._evidence: dict[int, Evidence] = {}  # the current step's, merged
        self._dense: Dist | None = None  # the current step's dense reply
        self._asked: float | None = None  # θ of the request in flight (<= 0: dense)
        self._supplemented = False
        self._waits = 0  # times this step stopped to wait for the cloud (first evidence, replies)
        self._now: float | None = None  # host time of the event being handled
        self._late: dict[int, tuple[int, Dist]] = {}  # step -> (local token, p^d), awaiting evidence
        self._guess: dict[int, int] = {}  # step -> the cloud's guess of our token there (its ``prev``)
        self._ahead: dict[int, list[m.Evidence]] = {}  # frames for steps not reached yet
        self._unsent_tokens: list[int] = []  # committed, guessed by the cloud, not sent yet
        self._unsent_from = 0  # the step of the first of them

    # ------------------------------------------------------------------ events
    def on_local_dist(self, ev: "sess.LocalDist") -> None:
        self._local, self._local_at, self._now = ev.dist, ev.at_ms, ev.at_ms
        self._consult = not self.s.solo and self.debt.should_wait()

    def on_peer(self, msg: m.Message, at_ms: float | None) -> None:
        if isinstance(msg, m.EvidenceRun):
            for frame in cw.unpack_run(msg):
                if self.s.finished is None:
                    self.on_peer(frame, at_ms)
            return
        if not isinstance(msg, m.Evidence):
            raise ProtocolError(f"unexpected {type(msg).__name__} in a concord request (device)")
        step = len(self.s.committed)
        if msg.log_h is not None:
            self.cloud_log_h = msg.log_h
        elif self.cloud_log_h is None:  # without η nothing certifies: waiting would never end
            raise ProtocolError("the cloud's first evidence must carry its log h")
        if cw.chain_basis(msg) > step or msg.step >= step + lookahead(self.s.config):
            raise ProtocolError(f"evidence for step {msg.step} on {cw.chain_basis(msg)} of our tokens, "
                                f"but {step} were committed (window {self.s.config.max_depth})")
        if msg.chain is not None:
            self.s._check_vocab([msg.chain[1]])
            self._guess[msg.step - 1] = msg.chain[1]  # the frames come in order: the later guess holds
        if msg.step > step:
            self._ahead.setdefault(msg.step, []).append(msg)  # read when that step comes
            return
        self._take(msg, at_ms)

    def _take(self, msg: m.Evidence, at_ms: float | None) -> None:
        """A frame for the current step or an earlier one, used only if it was computed on the
        tokens committed here (the cloud's guesses, where it guessed, equal them)."""
        step = len(self.s.committed)
        if not self._on_our_prefix(msg):
            self.s.stats.evidence_missed += 1  # guessed wrong: the cloud's next frames will be right
            return
        bounds = cw.bounds_from_wire(msg, self.s.config.vocab_size)
        if msg.step < step:
            self._on_late(msg.step, bounds)
            return
        if msg.dist is not None:
            self._dense = self._checked(dist_from_wire(msg.dist))
        else:
            held = self._evidence.get(step)
            self._evidence[step] = cw.merge(held, bounds, self._asked if held is not None else None)
        self._asked = None
        self._now = at_ms

    def _on_our_prefix(self, msg: m.Evidence) -> bool:
        """Whether the frame's prefix is the committed one: its guesses (``prev`` and those of the
        frames before it) equal the tokens committed at those steps."""
        committed = self.s.committed
        return all(self._guess.get(j) == committed[j] for j in range(cw.chain_basis(msg), msg.step))

    # ------------------------------------------------------------------ moving on
    def pump(self) -> None:
        s = self.s
        if s.finished is None and self._local is not None:
            self._try_commit()
        step = len(s.committed)
        if s.finished is None and self._local is None and s._computing is None and step < s.config.max_tokens:
            s._sync_streams(list(s.committed))
            s._computing = (s.epoch, step)
            s._emit(_compute(s, step))

    def _try_commit(self) -> None:
        step, local = len(self.s.committed), self._local
        own = draft(local, self.s.config.sampling, step_rng(self.s.config.seed, DRAFT_DEVICE, step))
        if self.s.solo or not self._consult:
            self._tally("local")
            self._late[step] = (own, local)
            self._commit(own)
            return
        if self._dense is not None:
            _, eta_c = self._etas()
            token = synchronous_target(local, self._dense, eta_c, self.s.config.sampling, step_rng(self.s.config.seed, VERIFY, step))
            self._tally("dense")
            self._commit_consulted(token, own)
            return
        evidence = self._evidence.get(step)
        if evidence is None or self.cloud_log_h is None or self._asked is not None:
            self._waits = max(self._waits, 1)
            self._flush_tokens()  # the cloud may need them to reach this step
            return  # waiting for the cloud
        eta_d, eta_c = self._etas()
        verdict = certify(local.probs(), eta_d, eta_c, evidence)
        if verdict.token is not None:
            self._tally("certified")
            self._commit_consulted(verdict.token, own)
            return
        self._asked = 0.0 if verdict.dense else cw.theta_for_wire(verdict.theta)  # the tail merge() sets
        self._supplemented |= not verdict.dense
        self._waits += 1
        self.s.stats.evidence_requests += 1
        self._flush_tokens()  # the cloud answers for the prefix it holds
        self.s._emit(_send(m.EvidenceRequest(self.s.config.request_id, step, self._asked)))

    def _tally(self, kind: str) -> None:
        stats = self.s.stats
        setattr(stats, f"steps_{kind}", getattr(stats, f"steps_{kind}") + 1)
        stats.concord_by_step.append(kind)

    def _commit_consulted(self, token: int, own: int) -> None:
        self.s.stats.steps_supplemented += int(self._supplemented)
        self.debt.record(self._waited_steps(), token != own)
        self._commit(token)

    def _commit(self, token: int) -> None:
        s, step = self.s, len(self.s.committed)
        if not s.solo:
            self._send_token(step, token)
        held = self._evidence.pop(step, None)
        self._local = self._dense = self._consult = self._asked = None
        self._supplemented, self._waits = False, 0
        if held is not None and step in self._late:
            self._on_late(step, held)  # evidence that came but was not waited for
        while len(self._late) > LATE_KEPT:
            self._late.pop(min(self._late))
        s._record_commit(token)
        for frame in self._ahead.pop(step + 1, ()):  # evidence the cloud sent ahead for the next step
            if s.finished is None:
                self._take(frame, self._now)

    def _send_token(self, step: int, token: int) -> None:
        """Committed tokens go up in batches while they are the ones the cloud guessed: it
        computes on them already, and needs them only to move its window on (a batch is at most
        half of it, so the cloud keeps computing while the batch travels). A token it guessed
        wrong or did not guess, the last one, and any the cloud may need to reach a step the
        device waits on go at once."""
        if not self._unsent_tokens:
            self._unsent_from = step
        self._unsent_tokens.append(token)
        cfg = self.s.config
        ends = token in cfg.eos_ids or step + 1 >= cfg.max_tokens
        if self._guess.get(step) != token or ends or len(self._unsent_tokens) >= max(1, lookahead(cfg) // 2):
            self._flush_tokens()

    def _flush_tokens(self) -> None:
        if self._unsent_tokens:
            self.s._emit(_send(m.Tokens(self.s.config.request_id, self._unsent_from, self._unsent_tokens)))
            self._unsent_tokens = []

    # ------------------------------------------------------------------ statistics
    def _on_late(self, step: int, bounds: Evidence) -> None:
        """Evidence for a step committed locally: did it change the token? (The debt's ``f_t``:
        the certified token if the evidence certifies one, else the best lower bound's.)"""
        kept = self._late.pop(step, None)
        if kept is None or self.cloud_log_h is None:
            return
        own, local = kept
        eta_d, eta_c = self._etas()
        verdict = certify(local.probs(), eta_d, eta_c, bounds)
        lower = eta_d * local.probs()
        lower[bounds.ids] += eta_c * bounds.lo
        guess = verdict.token if verdict.token is not None else int(np.argmax(lower))
        changed = guess != own
        self.s.stats.evidence_late += 1
        self.s.stats.local_overruled += int(changed)
        self.debt.record(0.0, changed)

    def _waited_steps(self) -> float:
        """The wait of this step in local-step units (the debt's ``c_t``): from ``p^d`` ready to
        the commit, on the host's clock; without one, a round trip (the RTT estimate) per wait."""
        est = self.s.scheduler.estimates
        if not self._waits:
            waited = 0.0
        elif self._local_at is not None and self._now is not None:
            waited = max(0.0, self._now - self._local_at)
        else:
            waited = self._waits * (est.rtt.value or 0.0)
        self.s.stats.waited_ms += waited
        return waited / max(est.c_local.value or 0.0, 1e-3)

    def _etas(self) -> tuple[float, float]:
        _, eta_c = cross_side_weights(self.s.log_h, self.cloud_log_h)
        return 1.0 - eta_c, eta_c  # as DRAGON's target: (1 − η^c) p^d + η^c p^c

    def _checked(self, dist: Dist) -> Dist:
        vocab = self._local.vocab_size if self._local is not None else self.s.config.vocab_size
        if vocab and dist.vocab_size != vocab:
            raise OutOfVocabulary("the cloud's mixture does not match this side's vocabulary")
        return dist


class ConcordCloud:
    """Runs ahead of the device's tokens: after a step's evidence it appends its own greedy token
    (its guess of the device's) and computes the next step, up to the request's window
    (``max_depth``) past the device's last token. A frame says what it was computed on: the
    device's first ``basis`` tokens, then guesses, the last of them ``prev``; the earlier guesses
    went in the earlier frames, which arrive first. So the device uses evidence ahead exactly
    where its committed tokens equal the guesses. A device token that differs (or one the cloud
    had not reached) restarts the guessing on the device's tokens: the work in flight is dropped
    (new epoch). ``max_depth = 1``: no guessing, every frame on the device's tokens alone.

    Frames ahead go out in runs (``EvidenceRun``, up to ``RUN_MAX`` steps in one frame): a
    one-entry frame for a step the device has not reached waits for the next ones, and goes as
    soon as the step is the device's next (as far as this side knows), the run is full, the
    computing stops (the window's edge, the answer's end) or another frame must go first. A
    wrong guess drops the frames held on it, unsent."""

    def __init__(self, session: "sess.Session") -> None:
        if not session.config.sampling.greedy:
            raise ValueError("concord certifies greedy tokens; sampling is not supported")
        self.s = session
        self._next = 0  # the chain's next step to compute (step 0 at once, on the prompts alone)
        self._guess: dict[int, int] = {}  # step -> this side's own greedy token there, on the chain
        self._kept: dict[int, tuple[Dist, np.ndarray]] = {}  # step -> (mixture, ids listed), for requests
        self._asks: list[m.EvidenceRequest] = []  # requests for steps still to compute
        self._sent_log_h = False
        self._run: list[m.Evidence] = []  # one-entry frames ahead, held for one EvidenceRun

    def on_local_dist(self, ev: "sess.LocalDist") -> None:
        s, step = self.s, ev.step
        guess = draft(ev.dist, s.config.sampling, step_rng(s.config.seed, DRAFT_CLOUD, step))
        frame, listed = cw.first_evidence(s.config.request_id, step, ev.dist.probs(), s.config.concord_top_m,
                                          None if self._sent_log_h else s.log_h, self._chain(step))
        self._sent_log_h = True
        self._guess[step], self._next = guess, max(self._next, step + 1)
        if step >= len(s.committed):  # a step the device passed already can be asked for no more
            self._kept[step] = (ev.dist, listed)
        self._publish(frame, guess)
        asks = [a for a in self._asks if a.step == step]
        self._asks = [a for a in self._asks if a.step > step]
        for ask in asks:
            self._answer(ask)

    def on_peer(self, msg: m.Message, at_ms: float | None) -> None:
        s = self.s
        if isinstance(msg, m.Tokens):
            if msg.step != len(s.committed):
                raise ProtocolError(f"tokens from step {msg.step}, expected {len(s.committed)}")
            s._check_vocab(msg.tokens)
            for token in msg.tokens:
                if s.finished is None:
                    self._follow(token)
        elif isinstance(msg, m.EvidenceRequest):
            if msg.step != len(s.committed):
                raise ProtocolError(f"evidence request for step {msg.step}, the prefix is {len(s.committed)}")
            if msg.step in self._kept:
                self._answer(msg)
            else:
                self._asks.append(msg)  # answered once the step's mixture is computed
        else:
            raise ProtocolError(f"unexpected {type(msg).__name__} in a concord request (cloud)")

    def _follow(self, token: int) -> None:
        """The device committed ``token``. Guessed right: the work ahead holds. Guessed wrong:
        everything computed or computing past it is on a wrong prefix (new epoch: the result in
        flight is dropped) and the next step is computed on the device's tokens. Not guessed yet
        (the device outran this side): what is in flight is on its tokens still, and comes late."""
        s, step = self.s, len(self.s.committed)
        self._kept.pop(step, None)  # the device is past it: no request can name it now
        s._record_commit(token)
        guess = self._guess.get(step)
        if guess is None:
            self._next = max(self._next, step + 1)
        elif guess != token:
            self._guess.clear()
            self._kept.clear()
            self._run.clear()  # on the wrong prefix: never sent
            s.epoch += 1
            self._next = step + 1

    def pump(self) -> None:
        s = self.s
        step = len(s.committed)
        last = self._token_at(self._next - 1)
        ahead = self._next < min(step + lookahead(s.config), s.config.max_tokens)
        if s.finished is None and s._computing is None and ahead and last not in s.config.eos_ids:
            s._sync_streams(list(s.committed) + [self._guess[j] for j in range(step, self._next)])
            s._computing = (s.epoch, self._next)
            s._emit(_compute(s, self._next))
        if s._computing is None or (self._run and self._run[0].step <= step):
            self._flush_run()  # nothing more is coming for now, or the device's tokens reached a held step

    def _token_at(self, step: int) -> int | None:
        """The chain's token at ``step``: the device's where it is known here (a step computed
        after the device passed it guessed for nothing: an EOS guessed there must not stop the
        chain), else this side's guess."""
        committed = self.s.committed
        return committed[step] if 0 <= step < len(committed) else self._guess.get(step)

    def _publish(self, frame: m.Evidence, guess: int) -> None:
        """Send a step's frame, or hold it for a run (see the class docstring)."""
        reached = len(self.s.committed)  # the device's next step, as far as this side knows
        runnable = cw.runnable(frame, guess)
        if self._run and (self._run[0].step <= reached or not runnable or frame.step != self._run[-1].step + 1):
            self._flush_run()  # frames go in step order; a held step the device reached goes now
        if frame.step <= reached or not runnable:
            self.s._emit(_send(cw.pack_run([frame]) if runnable else frame))
            return
        self._run.append(frame)
        if len(self._run) >= RUN_MAX:
            self._flush_run()

    def _flush_run(self) -> None:
        if self._run:
            self.s._emit(_send(cw.pack_run(self._run)))
            self._run = []

    def _chain(self, step: int) -> tuple[int, int] | None:
        """A frame's ``(basis, prev)`` for ``step``: the device's tokens up to where they are
        known here, guesses after (the guesses the device's tokens confirmed are its tokens;
        one they contradicted would have dropped this work). None: its tokens alone."""
        basis = len(self.s.committed)
        return None if step <= basis else (basis, self._guess[step - 1])

    def _answer(self, ask: m.EvidenceRequest) -> None:
        s = self.s
        self._flush_run()  # frames go in step order
        dist, listed = self._kept[ask.step]
        if ask.theta <= 0:
            s._emit(_send(cw.dense_evidence(s.config.request_id, ask.step, dist_to_wire(dist), self._chain(ask.step))))
            return
        frame, listed = cw.supplement_evidence(s.config.request_id, ask.step, dist.probs(), ask.theta, listed,
                                               self._chain(ask.step))
        self._kept[ask.step] = (dist, listed)
        s._emit(_send(frame))


def _send(msg: m.Message) -> "sess.Send":
    return sess.Send(msg)


def _compute(s: "sess.Session", step: int) -> "sess.ComputeDist":
    """This side's mixture on the committed prefix, in the form the wire (and the dense
    reference) uses: the request's ``dist_top_k``."""
    return sess.ComputeDist(s.epoch, step, s.config.dist_top_k)
