"""CONCORD's certified greedy step (issue 14; docs/CONCORD.md): decide the dense greedy token
``argmax_y η^d p^d(y) + η^c p^c(y)`` from *part* of the cloud's mixture ``p^c``.

The device holds its own side mixture ``p^d`` in full. The cloud sends **evidence**: for a few
token ids an interval ``[lo, hi]`` that contains ``p^c(id)``, and a tail bound ``τ`` that every
other id's ``p^c`` stays below. Then for every token

    L(y) = η^d p^d(y) + η^c · (lo(y) if listed else 0)
    U(y) = η^d p^d(y) + η^c · (hi(y) if listed else τ)

bound the dense score, and ``ŷ = argmax L`` is *certified* when ``L(ŷ) > max_{y≠ŷ} U(y) + ε``:
no other token can reach ``ŷ``'s score, whatever the unsent part of ``p^c`` is. Intervals rather
than points make the wire's fp16 rounding (and a mixture computed from per-document top-K lists)
part of the bound instead of a fudge factor; ``ε`` covers only the device's float64 arithmetic.

When the certificate fails, the evidence that can settle the step is exactly the ids with
``p^c ≥ θ``, ``θ = (L(ŷ) − 2ε − max_{y unlisted} η^d p^d(y)) / η^c``: an unlisted token needs at
least that much cloud mass to reach ``L(ŷ)``. After the cloud lists them it may lower ``τ`` to
``θ``. If ``θ ≤ 0`` (the device cannot rule anything out) the step needs the dense distribution.
Ties never certify (the margin is strict), so the dense rule, lowest id among equals, decides them.

Pure: numpy only; the session (and the cloud's engine) call it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

EPS = 1e-9  # float64 sums of <= 2 terms per token; far above their rounding, far below any real margin
FP16_REL = 2.0 ** -11  # half an ulp of a float16 significand, relative
FP16_ABS = 2.0 ** -25  # half the smallest float16 subnormal: what rounds to 0


@dataclass(frozen=True)
class Evidence:
    """Sound facts about ``p^c`` for one step: ``lo[i] <= p^c(ids[i]) <= hi[i]``, and
    ``p^c(y) <= tail`` for every id not listed."""

    ids: np.ndarray  # int64, distinct
    lo: np.ndarray  # float64
    hi: np.ndarray  # float64
    tail: float

    def __post_init__(self) -> None:
        if not (self.ids.shape == self.lo.shape == self.hi.shape) or self.ids.ndim != 1:
            raise ValueError("evidence ids, lo and hi must be 1-D arrays of one length")
        if np.unique(self.ids).size != self.ids.size:
            raise ValueError("evidence ids must be distinct")
        if not (np.all(self.lo >= 0) and np.all(self.lo <= self.hi) and 0 <= self.tail <= 1):
            raise ValueError("evidence needs 0 <= lo <= hi and 0 <= tail <= 1")


@dataclass(frozen=True)
class Verdict:
    """The outcome of one check: a certified ``token``, else the threshold ``theta`` of the ids
    to ask for, else ``dense`` (ask for the whole distribution)."""

    token: int | None
    theta: float | None = None
    dense: bool = False


# ---------------------------------------------------------------------------- evidence (cloud)
def point_evidence(probs: np.ndarray, m: int) -> Evidence:
    """The cloud's top-``m`` of a full mixture, as it travels in float16: each listed value
    widened by its rounding, ``τ = min(p_(m), 1 − Σ top-m)`` rounded up."""
    p = np.asarray(probs, dtype=np.float64)
    m = max(0, min(m, p.size))
    ids = np.argsort(-p, kind="stable")[:m]
    sent = p[ids].astype(np.float16).astype(np.float64)
    lo, hi = widen_fp16(sent)
    listed_mass = float(p[ids].sum())
    tail = min(float(p[ids[-1]]) if m else 1.0, max(0.0, 1.0 - listed_mass))
    return Evidence(ids.astype(np.int64), lo, hi, round_up_fp16(tail))


def mixture_evidence(stream_ids: Sequence[np.ndarray], stream_probs: Sequence[np.ndarray],
                     stream_tails: Sequence[float], weights: Sequence[float], m: int) -> Evidence:
    """Evidence for ``p^c = Σ_i w_i p_i`` when each document stream gave only its top-K
    (``ids``, ``probs``) and a tail bound ``τ_i`` for its unlisted ids (what vLLM's log-probs
    give): a listed id's mass is at least the streams that list it, and at most that plus
    ``Σ w_i τ_i`` over the streams that do not; an id no stream lists is below ``Σ w_i τ_i``.
    The ``m`` ids with the largest lower bounds are sent."""
    w = np.asarray(weights, dtype=np.float64)
    union = np.unique(np.concatenate([np.asarray(i, dtype=np.int64) for i in stream_ids])) \
        if len(stream_ids) else np.zeros(0, dtype=np.int64)
    lo = np.zeros(union.size)
    missing = np.zeros(union.size)  # Σ w_i τ_i over the streams that do not list the id
    for wi, ids, probs, tau in zip(w, stream_ids, stream_probs, stream_tails):
        pos = np.searchsorted(union, np.asarray(ids, dtype=np.int64))
        listed = np.zeros(union.size, dtype=bool)
        listed[pos] = True
        lo[pos] += wi * np.asarray(probs, dtype=np.float64)
        missing[~listed] += wi * float(tau)
    ranked = np.argsort(-lo, kind="stable")
    order, dropped = ranked[:max(0, m)], ranked[max(0, m):]
    # a token left off the list is bounded by its own upper bound, one no stream lists by Σ w_i τ_i
    unlisted_tail = float(np.dot(w, np.asarray(stream_tails, dtype=np.float64)))
    tail = max([unlisted_tail, *(lo[dropped] + missing[dropped]).tolist()])
    sent_lo, _ = widen_fp16(lo[order].astype(np.float16).astype(np.float64))
    _, sent_hi = widen_fp16((lo[order] + missing[order]).astype(np.float16).astype(np.float64))
    return Evidence(union[order], sent_lo, np.maximum(sent_hi, sent_lo), round_up_fp16(min(1.0, tail)))


def supplement(probs: np.ndarray, theta: float, sent: Evidence) -> Evidence:
    """The cloud's answer to an evidence request: every id with ``p^c >= θ`` not sent yet,
    joined to what was sent. Every id left unlisted is below ``θ`` now, so the tail becomes at
    most ``θ`` (a float64 on the wire, compared exactly). So each request lists a new id or the
    next check settles the step: the asking ends within the vocabulary's size, in practice at
    once (``θ`` can fall when new evidence changes the candidate ``ŷ``)."""
    p = np.asarray(probs, dtype=np.float64)
    listed = np.zeros(p.size, dtype=bool)
    listed[sent.ids] = True
    new = np.flatnonzero((p >= theta) & ~listed)
    new = new[np.argsort(-p[new], kind="stable")]
    lo, hi = widen_fp16(p[new].astype(np.float16).astype(np.float64))
    listed[new] = True
    tail = float(p[~listed].max()) if (~listed).any() else 0.0
    return Evidence(np.concatenate([sent.ids, new.astype(np.int64)]), np.concatenate([sent.lo, lo]),
                    np.concatenate([sent.hi, hi]), min(sent.tail, float(theta), round_up_fp16(tail)))


def widen_fp16(sent: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The interval a float16 value came from (round to nearest): ``v·(1 ± 2^-11) ± 2^-25``."""
    sent = np.asarray(sent, dtype=np.float64)
    return np.maximum(0.0, sent * (1 - FP16_REL) - FP16_ABS), sent * (1 + FP16_REL) + FP16_ABS


def round_up_fp16(x: float) -> float:
    """The smallest float16 value >= ``x`` (a tail bound must stay a bound on the wire)."""
    v = np.float16(x)
    if float(v) < x:
        v = np.nextafter(v, np.float16(np.inf))
    return float(v)


# ---------------------------------------------------------------------------- the check (device)
def certify(device_probs: np.ndarray, eta_device: float, eta_cloud: float, evidence: Evidence,
            eps: float = EPS) -> Verdict:
    """Certify the dense greedy token from the device's full ``p^d`` and the cloud's evidence."""
    base = eta_device * np.asarray(device_probs, dtype=np.float64)
    lower = base.copy()
    upper = base + eta_cloud * evidence.tail
    lower[evidence.ids] += eta_cloud * evidence.lo
    upper[evidence.ids] = base[evidence.ids] + eta_cloud * evidence.hi
    best = int(np.argmax(lower))
    rival = _max_without(upper, best)
    if lower[best] > rival + eps:
        return Verdict(best)
    unlisted = np.ones(base.size, dtype=bool)
    unlisted[evidence.ids] = False
    unlisted[best] = False
    strongest_unlisted = float(base[unlisted].max()) if unlisted.any() else 0.0
    # 2ε, not ε: once every id at or above θ is listed, the tail is θ itself, and the next
    # check must then pass the strict ε margin (with ε it lands exactly on it and goes dense)
    theta = (lower[best] - 2 * eps - strongest_unlisted) / eta_cloud if eta_cloud > 0 else 0.0
    if theta <= 0 or theta >= evidence.tail:  # nothing left to rule out by asking for more ids
        return Verdict(None, dense=True)
    return Verdict(None, theta=float(theta))


def dense_argmax(device_probs: np.ndarray, cloud_probs: np.ndarray, eta_device: float, eta_cloud: float) -> int:
    """The reference: the dense greedy token (lowest id among exact ties, as ``np.argmax``)."""
    return int(np.argmax(eta_device * np.asarray(device_probs, dtype=np.float64)
                         + eta_cloud * np.asarray(cloud_probs, dtype=np.float64)))


def _max_without(values: np.ndarray, index: int) -> float:
    if values.size == 1:
        return -np.inf
    saved = values[index]
    values[index] = -np.inf
    out = float(values.max())
    values[index] = saved
    return out


# ---------------------------------------------------------------------------- waiting debt
@dataclass
class WaitingDebt:
    """Whether waiting for the cloud's evidence is still paying off (docs/ALGORITHMS.md §6, kept
    in docs/CONCORD.md): ``D ← ρ·D + c_t − g·f_t``, with ``c_t`` the time spent waiting at step
    ``t`` in local-step units and ``f_t = 1`` when the evidence changed the token the device alone
    would have committed. Wait at the next step iff ``D <= d_max``: ``d_max = inf`` always waits
    (exact dense greedy), ``-inf`` never waits (device-only)."""

    d_max: float = 4.0
    rho: float = 0.9
    gain: float = 4.0
    debt: float = 0.0

    def should_wait(self) -> bool:
        return self.debt <= self.d_max

    def record(self, waited_steps: float, changed_token: bool) -> None:
        self.debt = self.rho * self.debt + waited_steps - self.gain * float(changed_token)
