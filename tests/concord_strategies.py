"""Hypothesis strategies for CONCORD's frames and the cloud mixtures behind them, shared by the
frames' tests (tests/core/test_concord_wire.py) and their fuzzing (tests/sim/test_concord_fuzz.py)."""

from __future__ import annotations

import numpy as np
from hypothesis import HealthCheck, assume, settings
from hypothesis import strategies as st

from dragon_core import codec
from dragon_core import concord_wire as cw
from dragon_core import messages as m
from dragon_core.dist import Dist
from dragon_core.errors import CodecError

FUZZ = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                                      HealthCheck.filter_too_much])
VOCAB = 12


# ------------------------------------------------------------------ strategies
def probs(draw, size: int) -> np.ndarray:
    """Distributions that break bounds: peaked, flat, exact ties, values at float16's edges."""
    kind = draw(st.sampled_from(["random", "peaked", "ties", "fp16-edge", "tiny"]))
    if kind == "ties":
        raw = np.array([draw(st.integers(0, 3)) for _ in range(size)], dtype=np.float64)
    elif kind == "fp16-edge":
        base = float(np.float16(draw(st.floats(1e-7, 0.5))))
        raw = np.array([base * (1 + draw(st.integers(0, 2)) * 2 ** -10) for _ in range(size)])
    elif kind == "tiny":  # subnormal float16 territory next to one big entry
        raw = np.array([draw(st.floats(0.0, 6e-8)) for _ in range(size)])
        raw[draw(st.integers(0, size - 1))] = 1.0
    else:
        raw = np.array([draw(st.floats(0.0, 1.0)) for _ in range(size)])
        if kind == "peaked":
            raw[draw(st.integers(0, size - 1))] += draw(st.floats(1.0, 100.0))
    assume(raw.sum() > 0)
    return raw / raw.sum()


@st.composite
def evidence_frames(draw) -> m.Evidence:
    p = probs(draw, VOCAB)
    kind = draw(st.sampled_from(["first", "supplement", "dense"]))
    if kind == "dense":
        return cw.dense_evidence(draw(st.integers(0, 2**40)), draw(st.integers(0, 5000)),
                                 codec.dist_to_wire(Dist.full(np.log(np.maximum(p, 1e-30)))))
    frame, listed = cw.first_evidence(draw(st.integers(0, 2**40)), draw(st.integers(0, 5000)), p,
                                      draw(st.integers(0, VOCAB)), draw(st.none() | st.floats(-50, 50)))
    if kind == "supplement":
        frame, _ = cw.supplement_evidence(frame.request_id, frame.step, p, draw(st.floats(1e-6, 1.0)), listed)
    return frame


@st.composite
def evidence_runs(draw) -> m.EvidenceRun:
    """What the cloud sends ahead: one-entry frames of consecutive steps on its own chain."""
    n = draw(st.integers(2, 8))
    rid, step = draw(st.integers(0, 2**40)), draw(st.integers(1, 5000))
    basis = draw(st.integers(0, step))
    chain = None if basis == step else (basis, draw(st.integers(0, VOCAB - 1)))
    frames = []
    for i in range(n):
        frame, _ = cw.first_evidence(rid, step + i, probs(draw, VOCAB), 1, None,
                                     chain if i == 0 else (basis, int(np.frombuffer(frames[-1].ids, "<i4")[0])))
        frames.append(frame)
    return cw.pack_run(frames)


concord_messages = st.one_of(
    evidence_frames(),
    evidence_runs(),
    st.builds(m.EvidenceRequest, request_id=st.integers(0, 2**63 - 1), step=st.integers(0, 1 << 20),
              theta=st.floats(-1.0, 1.0)),
    st.builds(m.Open, request_id=st.integers(0, 2**40), query=st.text(max_size=20), k=st.integers(1, 16),
              max_tokens=st.integers(1, 512), seed=st.integers(0, 99), mode=st.just("concord"),
              concord_top_m=st.integers(0, cw.MAX_TOP_M),
              concord_debt_max=st.floats(allow_nan=False)),
)


def decode_checked(frame: bytes) -> m.Message | None:
    """A Message (that survives re-encoding and reads back as evidence) or a CodecError."""
    try:
        msg = codec.decode(frame)
    except CodecError:
        return None
    assert codec.decode(codec.encode(msg)) == msg
    frames = cw.unpack_run(msg) if isinstance(msg, m.EvidenceRun) else [msg]
    for frame in frames:
        if isinstance(frame, m.Evidence):
            codec.decode(codec.encode(frame))  # every step of a run is a valid frame itself
            bounds = cw.bounds_from_wire(frame)
            assert np.all(bounds.lo <= bounds.hi) and 0 <= bounds.tail <= 1
    return msg
