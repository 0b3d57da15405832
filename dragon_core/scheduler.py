"""Greedy Scheduling (docs/ALGORITHMS.md §4): which side aggregates.

``l`` is the current aggregator, ``r`` the other side. ``c`` = per-draft decode latency,
``rtt`` = round trip, ``α`` = acceptance rate of that side's drafts. The aggregator moves to
``r`` iff ``ΔZ = Z^l - Z^r > 0`` — in words: aggregate on the side slower by more than an RTT;
in between, on the side whose drafts are rejected more often. Hysteresis [ours]: the move also
needs ``ΔZ`` above a margin and a minimum number of steps since the last move. Ties go to the
device [ours]: there committed tokens reach the app half an RTT sooner and the device's mixture
stays on the device, so the cloud hands back unless it is strictly better (``ΔZ > -tie_ms``).

Estimates start from a ``SchedulerPrior`` (the previous requests on the same link) when there is
one, so a request can start on the right side instead of spending its first steps learning it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from dragon_core.messages import SchedulerPrior, Side
from dragon_core.validation import check_prior


def steady_wait(c_l: float, c_r: float, rtt: float, alpha_r: float) -> float:
    """``Z^l``: expected wait per target token with the aggregator on ``l``."""
    return alpha_r * max(c_l, c_r) + (1.0 - alpha_r) * max(c_l, c_r + rtt)


def delta_z(c_l: float, c_r: float, rtt: float, alpha_l: float, alpha_r: float) -> float:
    """``ΔZ = Z^l - Z^r`` by the four-case formula (``j = c^r - c^l``)."""
    j = c_r - c_l
    if j >= rtt:
        return (1.0 - alpha_r) * rtt
    if j >= 0:
        return (1.0 - alpha_l) * j + (alpha_l - alpha_r) * rtt
    if j >= -rtt:
        return (1.0 - alpha_r) * j + (alpha_l - alpha_r) * rtt
    return (alpha_l - 1.0) * rtt


# The draft window: undecided drafts a side keeps ahead of its last target token. A draft is
# verified, and its target comes back, one round trip after it was sent; the aggregator commits a
# token every ``max(c_l, c_r)`` meanwhile. So a window shorter than ``RTT / pace`` stalls the
# pipeline every round trip, as a TCP window shorter than the bandwidth-delay product does (at
# RTT 300 ms and a 26 ms device, a fixed 8 gave ~41 ms per token, not 26: issue 13). A longer one
# only risks more rolled-back drafts, so the window grows only as far as the estimates say.
MIN_WINDOW = 8  # the fixed depth used before the estimates (and at low RTT)
WINDOW_SLACK = 3  # steps on top of RTT / pace: the RTT's jitter and the peer's own draft time


def draft_window(estimates: "Estimates", max_depth: int) -> int:
    """How many undecided drafts to keep ahead: enough to cover one round trip at the commit
    pace, at least ``MIN_WINDOW``, never more than ``max_depth`` (the request's cap)."""
    floor = min(max_depth, MIN_WINDOW)
    values = (estimates.rtt.value, estimates.c_local.value, estimates.c_remote.value)
    if any(v is None or not math.isfinite(v) for v in values):
        return floor  # one side's pace alone may be the faster one: it would overshoot
    rtt, c_l, c_r = values
    needed = math.ceil(rtt / max(c_l, c_r, 1e-3)) + WINDOW_SLACK
    return max(floor, min(max_depth, needed))


def observe_draft_time(c: "Ewma", step: int, ms: float) -> None:
    """A draft's measured time as a sample of ``c`` (the per-draft decode latency). The first
    draft of a request (step 0) is no sample: its time includes the prompt's prefill (the device
    prefills while its Open goes up, the cloud after its retrieval), often 10-30 decode steps on
    a CPU. Averaged in, one such time moved ``c`` by a fifth of it: on a slowed cloud the
    device's first draft (0.7-2 s on a loaded CPU) made the device look slower than the cloud by an
    RTT, and a request its prior had placed on the cloud handed back after one step. It stands
    in only where nothing else is known (no prior yet), until the first real sample replaces it."""
    if step > 0:
        c.update(ms)
    elif c.value is None:
        c.value, c.provisional = ms, True


@dataclass
class Ewma:
    """Exponentially weighted moving average; ``None`` until the first sample."""

    weight: float = 0.2
    value: float | None = None
    count: int = 0
    provisional: bool = False  # ``value`` is a stand-in, not a sample: the next sample replaces it

    def update(self, x: float) -> None:
        fresh = self.value is None or self.provisional
        self.value = x if fresh else (1 - self.weight) * self.value + self.weight * x
        self.provisional = False
        self.count += 1


@dataclass
class SchedulerConfig:
    margin_ms: float = 1.0  # ΔZ must exceed this ...
    margin_frac: float = 0.05  # ... and this fraction of Z^l
    min_dwell_steps: int = 4  # steps on one side before it may move again
    min_samples: int = 2  # observations of each estimate before any move
    tie_ms: float = 0.5  # the cloud keeps aggregating only if better by more than this


@dataclass
class Estimates:
    """Online estimates, seen from one side: ``local`` is this side, ``remote`` the other."""

    c_local: Ewma = field(default_factory=Ewma)
    c_remote: Ewma = field(default_factory=Ewma)
    rtt: Ewma = field(default_factory=Ewma)
    alpha_local: Ewma = field(default_factory=lambda: Ewma(weight=0.1))
    alpha_remote: Ewma = field(default_factory=lambda: Ewma(weight=0.1))

    def ready(self, n: int) -> bool:
        return all(e.count >= n for e in (self.c_local, self.c_remote, self.rtt))

    def seed(self, prior: SchedulerPrior, side: Side, count: int) -> None:
        """Start from ``prior`` as if ``count`` samples of each had been seen. A prior with a
        NaN, an infinity, a negative time or a rate outside [0, 1] raises ``InvalidOptions``:
        one such value would poison every later ΔZ (NaN compares false, so no move ever)."""
        check_prior(prior)
        device = side == "device"
        pairs = ((self.c_local, prior.device_ms if device else prior.cloud_ms),
                 (self.c_remote, prior.cloud_ms if device else prior.device_ms),
                 (self.rtt, prior.rtt_ms),
                 (self.alpha_local, prior.alpha_device if device else prior.alpha_cloud),
                 (self.alpha_remote, prior.alpha_cloud if device else prior.alpha_device))
        for ewma, value in pairs:
            ewma.value, ewma.count, ewma.provisional = float(value), count, False

    def prior(self, side: Side) -> SchedulerPrior | None:
        """These estimates as a prior for the next request (None until every one has a value)."""
        values = [e.value for e in (self.c_local, self.c_remote, self.rtt, self.alpha_local, self.alpha_remote)]
        if any(v is None or not math.isfinite(v) for v in values):
            return None  # a non-finite estimate is no prior (the next request learns afresh)
        c_l, c_r, rtt, a_l, a_r = values
        a_l, a_r = (min(1.0, max(0.0, a)) for a in (a_l, a_r))  # an EWMA of 0/1 may round past 1 by an ulp
        if side == "device":
            return SchedulerPrior(c_l, c_r, rtt, a_l, a_r)
        return SchedulerPrior(c_r, c_l, rtt, a_r, a_l)


class GreedyScheduler:
    """Decides, after each target token on the aggregating side, whether to hand over."""

    def __init__(self, config: SchedulerConfig | None = None) -> None:
        self.config = config or SchedulerConfig()
        self.estimates = Estimates()
        # dwell guards against ping-pong after a move; the first move may come as soon as the
        # estimates are ready (every step spent on the wrong side costs latency)
        self._steps_since_move = self.config.min_dwell_steps
        self.last_delta_z: float | None = None

    def on_target(self) -> None:
        self._steps_since_move += 1

    def on_moved(self) -> None:
        self._steps_since_move = 0

    def should_hand_over(self, aggregator: Side, tokens_left: int | None = None) -> bool:
        """Called by the aggregator (``l`` = this side, ``aggregator``). ``tokens_left``: the
        tokens the answer may still take; given, a move to the cloud must also pay for itself."""
        e, cfg = self.estimates, self.config
        if not e.ready(cfg.min_samples) or self._steps_since_move < cfg.min_dwell_steps:
            return False
        c_l, c_r, rtt = e.c_local.value, e.c_remote.value, e.rtt.value
        a_l = 1.0 if e.alpha_local.value is None else e.alpha_local.value
        a_r = 1.0 if e.alpha_remote.value is None else e.alpha_remote.value
        dz = delta_z(c_l, c_r, rtt, a_l, a_r)
        self.last_delta_z = dz
        if aggregator == "cloud":
            return dz > -cfg.tie_ms
        return dz > max(cfg.margin_ms, cfg.margin_frac * steady_wait(c_l, c_r, rtt, a_r)) \
            and pays_for_the_move(dz, rtt, tokens_left)


def pays_for_the_move(delta_z_ms: float, rtt_ms: float, tokens_left: int | None) -> bool:
    """A move to the cloud costs the app about one round trip once: the tokens after it are
    decided on the cloud and reach the device half an RTT later, from drafts that went up half an
    RTT earlier (and a first token decided there waits for that round trip: TTFT). ΔZ is a
    steady-state saving per token, so the move is worth it only if the tokens left repay it
    (measured on the H200 testbed at RTT 300 ms: answers of 20 tokens started on the cloud had a
    TTFT 1.5x device-only's for ~15 ms/token saved; issue 13). The way back costs nothing: the
    device then holds the cloud's pending drafts at once. ``None``: no horizon, no check."""
    return tokens_left is None or delta_z_ms * tokens_left > rtt_ms


def initial_aggregator(prior: SchedulerPrior | None, config: SchedulerConfig | None = None,
                       max_tokens: int | None = None) -> Side:
    """Where a scheduled request should start: on the device unless the prior says the rule
    would move it to the cloud at once (and, given ``max_tokens``, that the answer is long
    enough to repay the round trip the first token then waits for)."""
    if prior is None:
        return "device"
    scheduler = GreedyScheduler(config)
    scheduler.estimates.seed(prior, "device", scheduler.config.min_samples)
    return "cloud" if scheduler.should_hand_over("device", max_tokens) else "device"
