"""``dragon_core.aggregate.transform``: greedy / top-k / top-p truncation of a distribution (the
temperature is already inside it). Every sampling reference in the suite (speculative, session
simulation, e2e) draws from ``transform``, so it is checked here on its own, twice:

* by hand, on dyadic probabilities (0.5, 0.25, 0.125, ...) whose sums are exact in floating
  point, so the top-p boundary "mass exactly reaching top_p" is really hit;
* against an independent implementation, transformers' ``TopKLogitsWarper`` and
  ``TopPLogitsWarper`` (fed ``log p`` in float64), on thousands of random distributions: the
  kept support must be identical and the renormalised probabilities equal within 1e-12.

The rules (what ``transform`` does; transformers and vLLM do the same):

* greedy: one-hot at ``argmax``; among equal maxima the lowest id (numpy's argmax).
* top-k: keep every token whose probability is >= the k-th largest value, so **all ties at the
  k-th value are kept** (more than k tokens may survive), as ``TopKLogitsWarper`` does.
  ``top_k = 0`` or ``top_k >= V`` is a no-op.
* top-p: after top-k, on the renormalised remainder: keep the smallest prefix of the tokens in
  descending probability whose mass is >= ``top_p`` (the token whose mass crosses ``top_p`` is
  kept; a prefix reaching ``top_p`` exactly stops there). ``top_p = 1`` is a no-op. Equal
  probabilities are ordered by id (stable sort), which only matters when a tie straddles the
  boundary; transformers' ``torch.sort`` breaks such ties in no documented order, so the random
  comparison skips those cases (and counts them).
* a zero-probability token is never given mass.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import TopKLogitsWarper, TopPLogitsWarper

from dragon_core.aggregate import transform
from dragon_core.messages import Sampling


def S(top_k: int = 0, top_p: float = 1.0, greedy: bool = False) -> Sampling:
    return Sampling(greedy=greedy, temperature=1.0, top_k=top_k, top_p=top_p)


def eq(got: np.ndarray, want) -> None:
    np.testing.assert_array_equal(got, np.asarray(want, dtype=np.float64))


# ====================================================================== by hand
def test_greedy_is_one_hot_argmax_lowest_id_on_ties():
    eq(transform(np.array([0.1, 0.5, 0.4]), S(greedy=True)), [0, 1, 0])
    eq(transform(np.array([0.25, 0.375, 0.375]), S(greedy=True)), [0, 1, 0])  # tie: lowest id
    # top-k / top-p are irrelevant under greedy
    eq(transform(np.array([0.125, 0.5, 0.375]), Sampling(greedy=True, top_k=2, top_p=0.1)), [0, 1, 0])


def test_top_k_keeps_every_tie_at_the_kth_value():
    p = np.array([0.0625, 0.25, 0.1875, 0.25, 0.25])
    # k = 2: the 2nd largest is 0.25, shared by ids 1, 3, 4 -> all three stay
    eq(transform(p, S(top_k=2)), [0, 1 / 3, 0, 1 / 3, 1 / 3])
    eq(transform(p, S(top_k=3)), [0, 1 / 3, 0, 1 / 3, 1 / 3])
    eq(transform(p, S(top_k=4)), np.array([0, 0.25, 0.1875, 0.25, 0.25]) / 0.9375)
    # a tie for the top value with k = 1 keeps both
    eq(transform(np.array([0.375, 0.25, 0.375]), S(top_k=1)), [0.5, 0, 0.5])
    # no tie: exactly k tokens
    eq(transform(np.array([0.125, 0.5, 0.25, 0.125]), S(top_k=2)), np.array([0, 0.5, 0.25, 0]) / 0.75)


def test_top_p_boundary_exact_mass_and_the_crossing_token():
    p = np.array([0.125, 0.5, 0.0625, 0.25, 0.0625])  # descending: id 1, 3, 0, 2|4
    # the prefix {1, 3} reaches 0.75 exactly: it stops there (id 0 is not needed)
    eq(transform(p, S(top_p=0.75)), [0, 2 / 3, 0, 1 / 3, 0])
    # id 1 alone reaches 0.5 exactly
    eq(transform(p, S(top_p=0.5)), [0, 1, 0, 0, 0])
    # 0.5 < 0.7 <= 0.75: id 3 crosses top_p and is kept
    eq(transform(p, S(top_p=0.7)), [0, 2 / 3, 0, 1 / 3, 0])
    # just above 0.75: id 0 is needed too (0.875)
    eq(transform(p, S(top_p=0.75 + 2 ** -20)), np.array([0.125, 0.5, 0, 0.25, 0]) / 0.875)
    # 0.9375 reached exactly by the first of the two tied 0.0625s: ties go by id, id 2 first
    eq(transform(p, S(top_p=0.9375)), np.array([0.125, 0.5, 0.0625, 0.25, 0]) / 0.9375)
    # anything above needs every token
    eq(transform(p, S(top_p=0.9375 + 2 ** -20)), p)
    # a tiny top_p keeps the top token only
    eq(transform(p, S(top_p=1e-9)), [0, 1, 0, 0, 0])


def test_top_k_then_top_p_on_the_renormalised_remainder():
    p = np.array([0.0625, 0.5, 0.0625, 0.25, 0.125])
    # top-k = 2 keeps ids 1, 3 (mass 0.75): renormalised 2/3, 1/3. top_p = 0.6 is reached by
    # id 1 alone (2/3 >= 0.6). Measured on the unrenormalised mass (0.5 < 0.6), or with top-p
    # applied before top-k ({1, 3} reach 0.75), id 3 would stay.
    eq(transform(p, S(top_k=2, top_p=0.6)), [0, 1, 0, 0, 0])
    eq(transform(p, S(top_k=2, top_p=0.7)), [0, 2 / 3, 0, 1 / 3, 0])
    eq(transform(p, S(top_k=3, top_p=0.9)), np.array([0, 0.5, 0, 0.25, 0.125]) / 0.875)
    # the exact boundary after renormalisation: top-4 keeps mass 0.5 (the 0.0625 tie is inside
    # the top 4), renormalised 0.5, 0.25, 0.125, 0.125; top_p = 0.75 is reached exactly by ids 0, 1
    p = np.array([0.25, 0.125, 0.0625, 0.0625] + [1 / 32] * 16)
    eq(transform(p, S(top_k=4, top_p=0.75)), [2 / 3, 1 / 3] + [0] * 18)
    eq(transform(p, S(top_k=4, top_p=0.75 + 2 ** -20)), [4 / 7, 2 / 7, 1 / 7] + [0] * 17)
    eq(transform(p, S(top_k=4)), [0.5, 0.25, 0.125, 0.125] + [0] * 16)


def test_no_ops_top_p_one_and_top_k_at_least_v():
    p = np.array([0.125, 0.5, 0.0625, 0.25, 0.0625])
    for s in [S(), S(top_p=1.0), S(top_k=5), S(top_k=6), S(top_k=1000), S(top_k=5, top_p=1.0)]:
        eq(transform(p, s), p)
    # an unnormalised input is renormalised, and scaling does not move the cut
    eq(transform(2 * p, S()), p)
    eq(transform(2 * p, S(top_p=0.75)), transform(p, S(top_p=0.75)))
    eq(transform(0.5 * p, S(top_k=2, top_p=0.7)), transform(p, S(top_k=2, top_p=0.7)))


def test_zero_probability_never_gains_mass():
    p = np.array([0.5, 0.0, 0.25, 0.25])
    eq(transform(p, S(top_k=3)), p)  # the k-th value is 0.25: the zero is cut (and stays 0)
    eq(transform(p, S(top_k=4)), p)
    eq(transform(np.array([0.5, 0.5, 0.0, 0.0]), S(top_k=3)), [0.5, 0.5, 0, 0])  # k-th value 0
    eq(transform(p, S(top_p=0.999)), p)
    eq(transform(p, S(top_p=0.6)), [2 / 3, 0, 1 / 3, 0])
    eq(transform(np.array([0.0, 1.0, 0.0]), S(top_k=1, top_p=0.5)), [0, 1, 0])
    eq(transform(np.array([0.0, 1.0, 0.0]), S(greedy=True)), [0, 1, 0])


def test_input_is_not_modified():
    p = np.array([0.125, 0.5, 0.0625, 0.25, 0.0625])
    before = p.copy()
    transform(p, S(top_k=2, top_p=0.6))
    eq(p, before)


# ====================================================================== against transformers
def hf_transform(p: np.ndarray, sampling: Sampling) -> np.ndarray:
    """transformers' warpers (the order generate() applies them: top-k, then top-p), on log p."""
    with np.errstate(divide="ignore"):
        scores = torch.from_numpy(np.log(p))[None]  # float64
    if sampling.top_k:
        scores = TopKLogitsWarper(top_k=sampling.top_k)(None, scores)
    if sampling.top_p < 1.0:
        scores = TopPLogitsWarper(top_p=sampling.top_p)(None, scores)
    return torch.softmax(scores, dim=-1)[0].numpy()


def top_p_is_ambiguous(p: np.ndarray, sampling: Sampling) -> bool:
    """True when the top-p boundary is a floating-point coin toss or a convention: the renormalised
    top-k remainder has a prefix mass within 1e-9 of top_p (transformers compares
    ``1 - cumsum(ascending) <= 1 - top_p``, we compare ``cumsum(descending) >= top_p``: the
    two roundings differ), or the token crossing top_p ties the first token cut (which of the
    tied ids is kept depends on the sort's tie order)."""
    if sampling.top_p >= 1.0:
        return False
    q = np.sort(p)[::-1]
    if sampling.top_k and sampling.top_k < q.size:
        q = q[q >= q[sampling.top_k - 1]]
    q = q / q.sum()
    cum = np.cumsum(q)
    if np.any(np.abs(cum - sampling.top_p) < 1e-9):
        return True
    cut = int(np.searchsorted(cum, sampling.top_p)) + 1
    return cut < q.size and q[cut - 1] == q[cut] and q[cut] > 0


def random_cases(seed: int, n: int) -> list[tuple[np.ndarray, Sampling]]:
    """Distributions of many shapes: flat to peaked, with exact zeros, with many exact ties
    (counts / total), small to full-vocabulary size; top_k and top_p over their whole ranges,
    alone and together."""
    rng = np.random.default_rng(seed)
    cases = []
    for i in range(n):
        v = 49152 if i % 100 == 0 else int(rng.integers(2, 400))
        kind = i % 4
        if kind == 0:
            p = rng.dirichlet(np.full(v, rng.choice([0.02, 0.1, 0.5, 1.0, 5.0])))
        elif kind == 1:
            z = rng.normal(0, rng.choice([0.5, 2.0, 5.0]), v)
            p = np.exp(z - z.max())
            p /= p.sum()
        elif kind == 2:  # exact zeros
            p = rng.dirichlet(np.ones(v))
            p[rng.random(v) < 0.3] = 0.0
            if p.sum() == 0:
                p[0] = 1.0
            p /= p.sum()
        else:  # many exact ties
            counts = rng.integers(0, int(rng.choice([4, 30])), v).astype(np.float64)
            counts[rng.integers(0, v)] += 1
            p = counts / counts.sum()
        top_k = int(rng.choice([0, 0, 1, 2, 3, 5, max(1, v // 3), v - 1 if v > 1 else 1, v, v + 7]))
        top_p = 1.0 if rng.random() < (0.5 if kind == 3 else 0.25) else float(rng.uniform(0.01, 0.999))
        cases.append((p, S(top_k=top_k, top_p=top_p)))
    return cases


CASES = random_cases(seed=9, n=2000)


@pytest.fixture(scope="module")
def reference() -> list[np.ndarray | None]:
    """transformers' result per case; None where the case is ambiguous (see above)."""
    return [None if top_p_is_ambiguous(p, s) else hf_transform(p, s) for p, s in CASES]


def compare(fn, reference) -> tuple[int, list[str]]:
    """(cases compared, failures) of ``fn`` against transformers' results."""
    compared, failures = 0, []
    for i, ((p, s), want) in enumerate(zip(CASES, reference)):
        if want is None:
            continue
        compared += 1
        got = fn(p, s)
        if not np.array_equal(got > 0, want > 0):
            failures.append(f"case {i} (V={p.size}, {s}): support {int((got > 0).sum())} vs {int((want > 0).sum())}")
        elif np.max(np.abs(got - want)) > 1e-12:
            failures.append(f"case {i} (V={p.size}, {s}): max |dp| {np.max(np.abs(got - want)):.2e}")
    return compared, failures


def test_matches_transformers_warpers(reference):
    compared, failures = compare(transform, reference)
    assert not failures, f"{len(failures)} of {compared} differ, e.g. {failures[:5]}"
    # the skip rule must not hollow the comparison out (the skipped cases are tie-heavy ones)
    assert compared >= 0.85 * len(CASES), f"only {compared} of {len(CASES)} cases compared"


# variants with the classic slips; the comparison must catch each of them
def _top_p_drops_crossing_token(p, s):
    q = transform(p, S(top_k=s.top_k))
    if s.top_p < 1.0:
        order = np.argsort(-q, kind="stable")
        cum = np.cumsum(q[order])
        cut = max(1, int(np.searchsorted(cum, s.top_p * cum[-1])))  # off by one: no "+ 1"
        q[order[cut:]] = 0.0
    return q / q.sum()


def _top_p_keeps_one_extra(p, s):
    q = transform(p, S(top_k=s.top_k))
    if s.top_p < 1.0:
        order = np.argsort(-q, kind="stable")
        cum = np.cumsum(q[order])
        q[order[int(np.searchsorted(cum, s.top_p * cum[-1])) + 2:]] = 0.0
    return q / q.sum()


def _top_p_on_unrenormalised_mass(p, s):
    q = p.copy()
    if s.top_k and s.top_k < q.size:
        q[q < np.partition(q, -s.top_k)[-s.top_k]] = 0.0
    if s.top_p < 1.0:
        order = np.argsort(-q, kind="stable")
        cum = np.cumsum(q[order])
        q[order[int(np.searchsorted(cum, s.top_p)) + 1:]] = 0.0  # compares with p's mass, not q's
    return q / q.sum()


def _top_k_drops_ties(p, s):
    q = p.copy()
    if s.top_k and s.top_k < q.size:
        q[np.argsort(-q, kind="stable")[s.top_k:]] = 0.0  # exactly k tokens, ties cut by id
    return transform(q / q.sum(), S(top_p=s.top_p))


@pytest.mark.parametrize("wrong", [_top_p_drops_crossing_token, _top_p_keeps_one_extra,
                                   _top_p_on_unrenormalised_mass, _top_k_drops_ties])
def test_comparison_catches_a_wrong_transform(reference, wrong):
    compared, failures = compare(wrong, reference)
    assert len(failures) >= 50, f"{wrong.__name__}: only {len(failures)} of {compared} caught"
