"""The references a distributed answer must equal (tests and benchmarks only).

* ``centralized_generate``: on real engines (``StreamGroup``s), one token per step;
* ``centralized_decode``: on the simulator's fake sides (``netsim.SideSpec``);
* ``solo_decode``: one side deciding alone (cloud-only, device-only, a degraded finish);
* ``greedy_generate``: a plain greedy decode on one engine (a baseline's answer, a benchmark's).

Pure like the rest of ``dragon_core``: it awaits the engines' ``StreamGroup`` methods but owns no
event loop, clock or socket; the caller runs it under whatever loop it has.
"""

from __future__ import annotations

from typing import AbstractSet, Callable, Sequence

from dragon_core import messages as m
from dragon_core import session as s
from dragon_core.aggregate import cross_side_weights, log_mass
from dragon_core.dist import Dist
from dragon_core.engine import Engine, StreamGroup, side_dist
from dragon_core.speculative import DRAFT_CLOUD, DRAFT_DEVICE, VERIFY, draft, step_rng, synchronous_target
from dragon_core.testing.netsim import SideSpec


async def centralized_generate(config: s.SessionConfig, groups: Sequence[tuple[StreamGroup, Sequence[float]]],
                               ) -> list[int]:
    """The reference DRAGON must equal: centralized output aggregation over the documents of
    all sides, each side's streams on its own engine, mixed with the same canonical ``Dist``s
    and η weights the protocol uses. One token per step, no speculation, no network."""
    if len(groups) != 2:
        raise ValueError("centralized_generate mixes exactly two sides (device, cloud)")
    tokens: list[int] = []
    for step in range(config.max_tokens):
        token = await _centralized_step(config, step, groups)
        tokens.append(token)
        if token in config.eos_ids:
            break
        for group, _ in groups:
            await group.append([token])
    return tokens


async def _centralized_step(config: s.SessionConfig, step: int,
                            sides: Sequence[tuple[StreamGroup, Sequence[float]]]) -> int:
    """One step of centralized aggregation: both sides' canonical distributions, weighed by
    their retrieval masses, and the target token drawn from the mixture."""
    (g_dev, r_dev), (g_cloud, r_cloud) = sides
    _, eta_cloud = cross_side_weights(log_mass(r_dev), log_mass(r_cloud))
    p_dev = await side_dist(g_dev, r_dev, config.dist_top_k)
    p_cloud = await side_dist(g_cloud, r_cloud, config.dist_top_k)
    return synchronous_target(p_dev, p_cloud, eta_cloud, config.sampling, step_rng(config.seed, VERIFY, step))


async def iterative_generate(config: s.SessionConfig, sources: Sequence, every: int) -> list[int]:
    """``centralized_generate`` with iterative retrieval: each side's ``source`` (duck-typed like
    ``dragon_host.documents.DocumentSource``: ``retrieve(prefix) -> documents`` with ``ids`` and
    ``scores``, ``open(documents) -> group``) gives its documents at every boundary
    (``dragon_core.iterative``); a side keeps its group with the new scores where
    ``engine.keeps_streams`` says, else opens one and appends the answer so far. One token per
    step, no speculation, no network: what the sessions must equal."""
    from dragon_core import iterative
    from dragon_core.engine import keeps_streams

    if len(sources) != 2:
        raise ValueError("iterative_generate mixes exactly two sides (device, cloud)")
    docs = [await src.retrieve(()) for src in sources]
    groups = [await src.open(d) for src, d in zip(sources, docs)]
    key: tuple[int, ...] = ()
    tokens: list[int] = []
    try:
        for step in range(config.max_tokens):
            if key != (want := tuple(tokens[: iterative.boundary(step, every)])):
                for i, src in enumerate(sources):
                    new = await src.retrieve(want)
                    if not keeps_streams(groups[i], docs[i].ids, new.ids):
                        await groups[i].close()
                        groups[i] = await src.open(new)
                        await groups[i].append(tokens)
                    docs[i] = new
                key = want
            token = await _centralized_step(config, step, [(g, d.scores) for g, d in zip(groups, docs)])
            tokens.append(token)
            if token in config.eos_ids:
                break
            for group in groups:
                await group.append([token])
    finally:
        for g in groups:
            await g.close()
    return tokens


def centralized_decode(config: s.SessionConfig, device: SideSpec, cloud: SideSpec) -> list[int]:
    """Centralized output aggregation over both sides' documents (what DRAGON must equal)."""
    tokens: list[int] = []
    for step in range(config.max_tokens):
        prefix = tuple(tokens)
        _, eta_cloud = cross_side_weights(device.log_h_at(prefix), cloud.log_h_at(prefix))  # per step: iterative
        token = synchronous_target(device.dist_fn(prefix), cloud.dist_fn(prefix), eta_cloud, config.sampling,
                                   step_rng(config.seed, VERIFY, step))
        tokens.append(token)
        if token in config.eos_ids:
            break
    return tokens


def solo_decode(config: s.SessionConfig, spec: SideSpec, side: m.Side, prefix: tuple[int, ...] = ()) -> list[int]:
    """One side decoding alone from ``prefix`` (cloud-only, device-only, a degraded finish): the
    tokens a session that decides alone commits — its own draft rule and draft randomness."""
    purpose = DRAFT_DEVICE if side == "device" else DRAFT_CLOUD
    tokens = list(prefix)
    while len(tokens) < config.max_tokens and not (tokens and tokens[-1] in config.eos_ids):
        step = len(tokens)
        tokens.append(draft(spec.dist_fn(tuple(tokens)), config.sampling, step_rng(config.seed, purpose, step)))
    return tokens


async def greedy_generate(engine: Engine, prompts: Sequence[Sequence[int]], choose: Callable[[list[Dist]], int],
                          eos: AbstractSet[int], max_tokens: int) -> list[int]:
    """A plain decode on one engine at temperature 1: ``choose`` picks each token from the
    streams' distributions (one stream's argmax, or the argmax of their mixture); stops after
    an ``eos`` token or ``max_tokens``. The group is closed whatever happens."""
    group = await engine.open_group(prompts, 1.0)
    out: list[int] = []
    try:
        while len(out) < max_tokens:
            token = choose(await group.next_dists())
            out.append(token)
            if token in eos:
                break
            await group.append([token])
    finally:
        await group.close()
    return out
