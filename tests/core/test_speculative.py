"""Exactness of aggregation and of Speculative Aggregation (docs/ALGORITHMS.md §2–3). Sampling's
goodness of fit (1e5 draws per case) is tests/sim/test_speculative_sampling.py."""

from __future__ import annotations

import numpy as np
import pytest

from dragon_core.aggregate import canonical_side_dist, cross_side_weights, side_mixture, stack_logprobs, target_probs
from dragon_core.dist import Dist
from dragon_core.messages import Sampling
from dragon_core.speculative import draft, verify
from fakes import random_logprobs

GREEDY = Sampling(greedy=True)


# ------------------------------------------------------------------ aggregation
def test_side_mixture_matches_direct_weighted_sum():
    rng = np.random.default_rng(0)
    rows = np.stack([random_logprobs(rng, 30) for _ in range(4)])
    scores = rng.normal(0, 3, 4)
    mixed, log_h = side_mixture(rows, scores)
    w = np.exp(scores) / np.exp(scores).sum()
    np.testing.assert_allclose(np.exp(mixed), (w[:, None] * np.exp(rows)).sum(0), rtol=1e-12)
    assert log_h == pytest.approx(np.log(np.exp(scores).sum()), rel=1e-12)


def test_distributed_equals_centralized_mixture_over_all_documents():
    """η-weighted side mixtures == one softmax-weighted mixture over the union (§2)."""
    rng = np.random.default_rng(1)
    dev_rows, cloud_rows = (np.stack([random_logprobs(rng, 40) for _ in range(k)]) for k in (3, 5))
    dev_r, cloud_r = rng.normal(0, 2, 3), rng.normal(0, 2, 5)
    p_dev, h_dev = side_mixture(dev_rows, dev_r)
    p_cloud, h_cloud = side_mixture(cloud_rows, cloud_r)
    _, eta_cloud = cross_side_weights(h_dev, h_cloud)
    distributed = target_probs(Dist.full(p_dev), Dist.full(p_cloud), eta_cloud)
    central, _ = side_mixture(np.vstack([dev_rows, cloud_rows]), np.concatenate([dev_r, cloud_r]))
    np.testing.assert_allclose(distributed, np.exp(central), rtol=1e-5, atol=1e-9)


def test_top_k_dist_follows_the_unseen_id_rule():
    rng = np.random.default_rng(2)
    lp = random_logprobs(rng, 100)
    d = Dist.top_k(lp, 10)
    p = d.probs()
    assert p.sum() == pytest.approx(1.0, abs=1e-12)
    unseen = np.setdiff1d(np.arange(100), d.ids)
    assert np.allclose(p[unseen], d.tail_mass / 90)  # tail spread uniformly over unseen ids
    assert set(d.ids.tolist()) == set(np.argsort(-lp)[:10].tolist())
    assert d.argmax() == int(np.argmax(lp))


# ------------------------------------------------------------------ greedy: 100% argmax
def test_greedy_counterexample_argmax_is_neither_sides_top_token():
    p_l = Dist.full(np.log([0.50, 0.45, 0.05]))
    p_r = Dist.full(np.log([0.05, 0.45, 0.50]))
    x_l, x_r = draft(p_l, GREEDY, None), draft(p_r, GREEDY, None)
    assert (x_l, x_r) == (0, 2)
    v = verify(x_l, p_l, x_r, p_r, 0.5, GREEDY, np.random.default_rng(0))
    assert v.token == 1 and not v.accept_local and not v.accept_remote


@pytest.mark.parametrize("top_k", [0, 16])
def test_greedy_equals_argmax_of_centralized_mixture_always(top_k):
    rng = np.random.default_rng(3)
    neither = 0
    for case in range(3000):
        v = int(rng.integers(3, 200))
        make = (lambda lp: Dist.top_k(lp, top_k)) if top_k else Dist.full
        p_l, p_r = make(random_logprobs(rng, v, 1.0)), make(random_logprobs(rng, v, 1.0))
        eta_r = float(rng.uniform(0.05, 0.95))
        mixture = (1 - eta_r) * p_l.probs() + eta_r * p_r.probs()
        want = int(np.argmax(mixture))
        got = verify(p_l.argmax(), p_l, p_r.argmax(), p_r, eta_r, GREEDY, np.random.default_rng(case)).token
        assert got == want, f"case {case}"
        neither += want not in (p_l.argmax(), p_r.argmax())
    assert neither > 20  # the hard case (argmax is neither side's top) was exercised


def _dense_canonical(dists, scores, top_k):
    return Dist.top_k(side_mixture(stack_logprobs(dists), scores)[0], top_k)


@pytest.mark.parametrize("case", range(300))
def test_sparse_mixture_of_top_k_documents_equals_the_dense_one(case):
    """vLLM gives each document a top-20 distribution; the side mixes them on the union of the
    listed ids only. Same ids, same fp16 log-probs and tail as mixing dense 49k-wide rows —
    including flat documents whose unlisted ids beat listed ones, ties at the cut, and
    overlapping lists."""
    rng = np.random.default_rng(case)
    vocab = int(rng.choice([30, 64, 49152]))
    k_docs, listed, top_k = int(rng.integers(1, 5)), int(rng.integers(1, 21)), int(rng.choice([1, 8, 32]))
    dists = []
    for _ in range(k_docs):
        logits = rng.normal(size=vocab) * float(rng.choice([0.01, 1.0, 4.0]))
        if case % 7 == 0:
            logits = np.round(logits)  # ties
        lp = logits - np.log(np.exp(logits - logits.max()).sum()) - logits.max()
        ids = rng.choice(vocab, size=min(listed, vocab), replace=False)
        dists.append(Dist.from_top_k(vocab, ids, lp[ids]))
    scores = rng.normal(size=k_docs) * 3
    sparse, dense = canonical_side_dist(dists, scores, top_k), _dense_canonical(dists, scores, top_k)
    if k_docs == 1 and dists[0].ids.size <= top_k:
        # the rule for one canonical top-K list (a vLLM gang's mixture): it is its own form, as
        # is (the dense rule would also list tail ids at re-rounded shares); both sides apply
        # this same rule, which is what exactness needs
        assert sparse is dists[0]
        return
    assert np.array_equal(sparse.ids, dense.ids), case
    np.testing.assert_array_equal(sparse.logprobs, dense.logprobs)
    assert abs(sparse.tail_mass - dense.tail_mass) < 1e-12


@pytest.mark.parametrize("case", range(200))
def test_top_k_argmax_without_the_dense_vector_equals_the_dense_argmax(case):
    rng = np.random.default_rng(1000 + case)
    vocab = int(rng.choice([5, 40, 49152]))
    n = int(rng.integers(1, min(vocab, 20) + 1))
    ids = rng.choice(vocab, size=n, replace=False) if case % 3 else np.arange(n)  # some lists start at id 0
    with np.errstate(divide="ignore"):  # a Dirichlet draw can hold exact zeros: impossible ids
        lp = np.log(rng.dirichlet(np.full(n, float(rng.choice([0.05, 1.0, 50.0])))) * float(rng.choice([0.01, 0.5, 1.0])))
    if case % 5 == 0:
        lp[:] = lp[0]  # ties among listed ids
    d = Dist.from_top_k(vocab, ids, lp)
    dense = int(np.argmax(Dist(d.vocab_size, d.logprobs, d.ids, d.tail_mass).probs()))
    assert d.argmax() == dense
