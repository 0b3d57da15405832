"""CONCORD's cloud evidence from per-document top-K lists (issue 14 item 2; docs/CONCORD.md).

When the cloud's engine gives each of its k document streams only its top-K (vLLM's log-probs,
as ``Dist``s in top-K form, log-probs rounded to float16), the cloud does not know its mixture
``p^c = Σ_i w_i p_i``, only bounds on it, and they must hold for the *full-vocabulary* mixture:

* stream ``i`` lists ``id`` with a float16 log-prob ``ℓ``: the true log-prob is within half a
  float16 ulp ``δ(ℓ)`` of it, so ``p_i(id) ∈ [e^(ℓ−δ), e^(ℓ+δ)]``;
* an id stream ``i`` does not list is at most ``τ_i = min(hi_i(K-th), 1 − Σ lo_i)``: the top-K
  are the K largest (an unlisted id is at most the smallest listed one), and all unlisted ids
  together hold what the listed ones leave;
* so ``p^c(id) ∈ [Σ_{i lists id} w_i lo_i, Σ_{i lists id} w_i hi_i + Σ_{i does not} w_i τ_i]``,
  and an id no stream lists is at most ``Σ_i w_i τ_i``.

The frame lists the ``top_m`` ids with the largest lower ends, with their upper ends
(``Evidence.upper``); the tail is the largest of ``Σ w_i τ_i`` and the upper ends left off.

A request for ``θ`` can be answered only while ``Σ w_i τ_i < θ`` (then every id that may reach
``θ`` is in the union and gets listed); otherwise ``stream_supplement`` says so (None) and the
cloud answers dense. Pure: numpy only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from dragon_core import messages as m
from dragon_core.certificate import round_up_fp16
from dragon_core.dist import Dist


@dataclass(frozen=True)
class StreamBounds:
    """Bounds on ``p^c`` over the union of the streams' lists, and on every id outside it."""

    ids: np.ndarray  # int64, sorted, the union
    lo: np.ndarray
    hi: np.ndarray
    outside: float  # Σ w_i τ_i: any id no stream lists


def stream_bounds(doc_dists: Sequence[Dist], scores: Sequence[float]) -> StreamBounds:
    """The bounds above from the streams' top-K ``Dist``s and their retrieval scores."""
    r = np.asarray(scores, dtype=np.float64)
    w = np.exp(r - r.max())
    w /= w.sum()
    per_stream = [_one_stream(d) for d in doc_dists]
    union = np.unique(np.concatenate([ids for ids, _, _, _ in per_stream]))
    lo, hi = np.zeros(union.size), np.zeros(union.size)
    outside = 0.0
    for wi, (ids, lo_i, hi_i, tau_i) in zip(w, per_stream):
        pos = np.searchsorted(union, ids)
        listed = np.zeros(union.size, dtype=bool)
        listed[pos] = True
        lo[pos] += wi * lo_i
        hi[pos] += wi * hi_i
        hi[~listed] += wi * tau_i
        outside += wi * tau_i
    # the float64 weights and sums round too (a CI run: two streams sure of one id summed to
    # 1 - 1e-16 as its upper end): widen by far more than their error, far less than fp16's
    slack = 2.0 ** -40
    return StreamBounds(union, lo * (1 - slack), np.minimum(hi * (1 + slack), 1.0), min(1.0, outside * (1 + slack)))


def _one_stream(d: Dist) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    if d.ids is None:  # a full vector: every id listed (float32, rounding far below float16's)
        p = d.probs()
        ids = np.arange(d.vocab_size)
        return ids, p * (1 - 2.0 ** -20), np.minimum(1.0, p * (1 + 2.0 ** -20)), 0.0
    lp = d.logprobs.astype(np.float64)
    with np.errstate(invalid="ignore"):  # -inf (an impossible id) has no ulp; handled below
        delta = np.abs(np.spacing(np.abs(d.logprobs))).astype(np.float64) / 2  # half a float16 ulp
        lo = np.where(np.isneginf(lp), 0.0, np.exp(lp - delta))
        hi = np.where(np.isneginf(lp), 0.0, np.minimum(1.0, np.exp(lp + delta)))
    if d.ids.size >= d.vocab_size:
        return d.ids.astype(np.int64), lo, hi, 0.0
    tau = min(float(hi.min()), max(0.0, 1.0 - float(lo.sum())))
    return d.ids.astype(np.int64), lo, hi, tau


def stream_evidence(request_id: int, step: int, bounds: StreamBounds, top_m: int,
                    log_h: float | None) -> tuple[m.Evidence, np.ndarray]:
    """The step's frame: the ``top_m`` ids with the largest lower ends (ties to the lowest id),
    as intervals. Returns the frame and the ids it lists."""
    order = np.lexsort((bounds.ids, -bounds.lo))
    take, rest = order[:max(0, top_m)], order[max(0, top_m):]
    tail = max([bounds.outside, *bounds.hi[rest].tolist()])
    return _interval_frame(request_id, step, bounds, take, tail, log_h), bounds.ids[take]


def stream_supplement(request_id: int, step: int, bounds: StreamBounds, theta: float,
                      listed: np.ndarray) -> tuple[m.Evidence, np.ndarray] | None:
    """The reply to ``θ``: every union id whose upper end reaches ``θ`` and is not listed yet;
    None when an id outside the union may reach ``θ`` (answer dense instead)."""
    if bounds.outside >= theta:
        return None
    unlisted = ~np.isin(bounds.ids, listed)
    new = np.flatnonzero(unlisted & (bounds.hi >= theta))
    new = new[np.lexsort((bounds.ids[new], -bounds.lo[new]))]
    unlisted[new] = False
    tail = max([bounds.outside, *bounds.hi[unlisted].tolist()])
    frame = _interval_frame(request_id, step, bounds, new, tail, None)
    return frame, np.concatenate([np.asarray(listed, dtype=np.int64), bounds.ids[new]])


def _interval_frame(request_id: int, step: int, bounds: StreamBounds, take: np.ndarray, tail: float,
                    log_h: float | None) -> m.Evidence:
    """Lower ends to nearest float16 (the device widens them down), upper ends likewise (widened
    up), the tail rounded up."""
    values = np.concatenate([bounds.lo[take].astype("<f2"), np.array([round_up_fp16(min(1.0, tail))], dtype="<f2")])
    upper = np.maximum(bounds.hi[take].astype("<f2"), bounds.lo[take].astype("<f2"))
    return m.Evidence(request_id, step, bounds.ids[take].astype("<i4").tobytes(), values.tobytes(), log_h,
                      upper.tobytes())
