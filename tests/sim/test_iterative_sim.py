"""Iterative retrieval over the simulator (issue 16): each side re-retrieves every n tokens, its
documents (so its mixture and its retrieval mass log h) a function of the committed prefix at the
boundary (dragon_core.iterative). Every mode must equal centralized aggregation with the per-step
masses, token for token, whatever the link, the aggregator and the rollbacks."""

from __future__ import annotations

import numpy as np
import pytest

from dragon_core import iterative
from dragon_core import messages as m
from dragon_core.aggregate import log_mass
from dragon_core.dist import Dist
from dragon_core.testing.netsim import SideSpec, SimulatedPair, Speculation
from dragon_core.testing.reference import centralized_decode
from test_session_sim import CASES, EOS, links, make_config

POOL, K, VOCAB = 12, 3, 40  # documents per side, retrieved per step, vocabulary


def iterative_side(side_id: int, world: int, every: int, log_h_bias: float, decode_ms: float) -> SideSpec:
    """A side whose k documents are re-retrieved from its pool at each boundary, with the
    prefix up to it as the query; its mixture weighs them by softmax(R), as side_mixture does."""

    def retrieve(prefix: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
        query = prefix[: iterative.boundary(len(prefix), every)]
        r = np.random.default_rng([world, side_id, 99, *query]).normal(log_h_bias, 1.5, POOL)
        top = np.argsort(-r)[:K]
        return top, r[top]

    def dist_fn(prefix: tuple[int, ...]) -> Dist:
        docs, r = retrieve(prefix)
        w = np.exp(r - r.max())
        w /= w.sum()
        p = np.zeros(VOCAB)
        for doc, wd in zip(docs, w):
            z = np.random.default_rng([world, side_id, int(doc), *prefix]).normal(0, 2.5, VOCAB)
            z[EOS] -= 3.0 if len(prefix) < 12 else -1.0
            p += wd * np.exp(z - z.max()) / np.exp(z - z.max()).sum()
        return Dist.full(np.log(p))

    return SideSpec(log_h_bias, dist_fn, lambda now, step: decode_ms, log_h_fn=lambda prefix: log_mass(retrieve(prefix)[1]))


def sides(world: int, every: int, c_dev: float = 30.0, c_cloud: float = 10.0) -> tuple[SideSpec, SideSpec]:
    return iterative_side(1, world, every, 0.3, c_dev), iterative_side(2, world, every, 1.1, c_cloud)


def test_the_boundary_rule():
    assert [iterative.boundary(t, 4) for t in range(10)] == [0, 0, 0, 0, 4, 4, 4, 4, 8, 8]
    assert [iterative.boundary(t, 0) for t in (0, 5, 500)] == [0, 0, 0]  # once
    assert [t for t in range(10) if iterative.retrieves_at(t, 3)] == [0, 3, 6, 9]
    assert iterative.epoch_of(7, 3) == 2 and iterative.epoch_of(7, 0) == 0
    with pytest.raises(ValueError):
        iterative.boundary(-1, 2)


@pytest.mark.parametrize("rtt", [0.0, 50.0, 300.0])
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("every", [1, 3, 8])
def test_iterative_retrieval_equals_centralized_with_per_step_masses(case, rtt, every):
    for world in range(3):
        config = make_config(**CASES[case], retrieve_every=every)
        dev, cloud = sides(world, every)
        pair = SimulatedPair(config, dev, cloud, *links(rtt, seed=world * 10)).run()
        want = centralized_decode(config, dev, cloud)
        assert pair.device.record.tokens == want == pair.cloud.record.tokens, f"world {world}"
        assert not pair.device.record.finish.degraded


def test_the_drafts_carry_each_steps_mass_and_rollbacks_cross_boundaries():
    """The cloud's drafts name the mass of the documents of their own step (it changes at the
    boundaries); the cloud ran ahead across boundaries, was rejected and rolled back, and the
    answer is still the reference's."""
    config = make_config(mode="dragon", aggregator="device", scheduling=False, max_depth=6, retrieve_every=2)
    for world in range(6):
        dev, cloud = sides(world, 2, c_dev=40.0, c_cloud=5.0)
        pair = SimulatedPair(config, dev, cloud, *links(120, seed=world))
        sent: list[m.Draft] = []
        send = pair.send
        pair.send = lambda side, msg: (sent.append(msg) if isinstance(msg, m.Draft) else None, send(side, msg))[1]
        pair.run()
        assert pair.device.record.tokens == centralized_decode(config, dev, cloud)
        assert len({d.log_h for d in sent}) > 1  # the mass moves with the documents
        committed = pair.device.record.tokens
        for d in sent:  # each draft's mass is its own prefix's: the committed tokens before the
            # first draft of its epoch, then that epoch's own drafted tokens
            chain = sorted((e.step, e.token) for e in sent if e.epoch == d.epoch and e.step < d.step)
            first = min([step for step, _ in chain] + [d.step])
            assert d.log_h == cloud.log_h_at(tuple(committed[:first]) + tuple(t for _, t in chain))
        if pair.cloud.session.stats.rollbacks:
            return
    pytest.fail("no world rolled the cloud back")


def test_iterative_retrieval_changes_answers():
    """Power: with documents re-retrieved, the answer is not the one-retrieval answer (else the
    tests above could not tell a session that ignored the boundaries)."""
    differ = 0
    for world in range(8):
        config = make_config(mode="dragon", scheduling=False, retrieve_every=2)
        once = centralized_decode(config, *sides(world, 0))
        again = centralized_decode(config, *sides(world, 2))
        differ += once != again
    assert differ >= 4, differ


# ---------------------------------------------------------------------------- RaLMSpec
def speculating_side(side_id: int, world: int, every: int, log_h_bias: float, decode_ms: float,
                     hit_rate: float, retrieve_ms: float) -> SideSpec:
    """``iterative_side`` whose boundaries (past the first) decode at once over its cache's
    documents, right with probability ``hit_rate`` (per boundary prefix, deterministic), and
    check them against the real retrieval ``retrieve_ms`` later; without speculation the step
    waits ``retrieve_ms`` for the real retrieval."""
    real = iterative_side(side_id, world, every, log_h_bias, decode_ms)
    stale = iterative_side(side_id + 50, world, every, log_h_bias, decode_ms)  # other documents

    def right(key: tuple[int, ...]) -> bool:
        return np.random.default_rng([world, side_id, 555, *key]).random() < hit_rate

    real.speculation = Speculation(right, stale.dist_fn, stale.log_h_at, verify_ms=retrieve_ms)
    real.retrieve_ms = retrieve_ms
    return real


def speculating_sides(world, every, hit_rate, retrieve_ms=40.0, speculate=True, c_dev=30.0, c_cloud=10.0):
    sides_ = (speculating_side(1, world, every, 0.3, c_dev, hit_rate, retrieve_ms),
              speculating_side(2, world, every, 1.1, c_cloud, hit_rate, retrieve_ms))
    if not speculate:
        for side in sides_:
            side.speculation = None
    return sides_


@pytest.mark.parametrize("rtt", [0.0, 80.0, 300.0])
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("hit_rate", [0.0, 0.6, 1.0])
def test_speculative_retrieval_equals_the_non_speculative_answer(case, rtt, hit_rate):
    """Drafts over speculated documents are held until checked, dropped and recomputed when the
    cache was wrong: the answer is plain iterative retrieval's, token for token."""
    for world in range(3):
        config = make_config(**CASES[case], retrieve_every=3)
        dev, cloud = speculating_sides(world, 3, hit_rate)
        pair = SimulatedPair(config, dev, cloud, *links(rtt, seed=world * 10)).run()
        want = centralized_decode(config, dev, cloud)
        assert pair.device.record.tokens == want == pair.cloud.record.tokens, f"world {world}"
        assert not pair.device.record.finish.degraded
        wrong = sum(p.session.stats.retrieval_rollbacks for p in (pair.device, pair.cloud))
        if hit_rate == 1.0:
            assert wrong == 0


def test_a_wrong_speculation_is_rolled_back_and_a_right_one_saves_the_retrieval_time():
    """Power and speed: with a wrong cache some drafts were recomputed (and the answer is still
    exact); with a right one the answer ends sooner than waiting for every real retrieval."""
    config = make_config(mode="dragon", aggregator="device", scheduling=False, retrieve_every=2, max_tokens=24,
                         eos_ids=frozenset())
    rolled, faster = 0, 0
    for world in range(6):
        pairs = {}
        for name, (hit, speculate) in {"wrong": (0.3, True), "right": (1.0, True), "wait": (1.0, False)}.items():
            dev, cloud = speculating_sides(world, 2, hit, retrieve_ms=60.0, speculate=speculate)
            pairs[name] = SimulatedPair(config, dev, cloud, *links(40.0, seed=world)).run()
            assert pairs[name].device.record.tokens == centralized_decode(config, dev, cloud)
        rolled += sum(p.session.stats.retrieval_rollbacks for p in (pairs["wrong"].device, pairs["wrong"].cloud)) > 0
        faster += pairs["right"].device.record.finish_ms < 0.8 * pairs["wait"].device.record.finish_ms
    assert rolled >= 4 and faster >= 5, (rolled, faster)
