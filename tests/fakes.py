"""In-memory stand-ins for engines, for unit tests of the protocol machinery around them
(drivers, links), and random distributions. The real engines have their own tests."""

from __future__ import annotations

import asyncio
from typing import Sequence

import numpy as np

from dragon_core.aggregate import side_mixture
from dragon_core.dist import Dist
from dragon_core.testing.netsim import SideSpec

VOCAB, EOS = 30, 0


class ListStreams:
    """k fake document streams: each stream's distribution is a pure function of (doc, prefix).
    It really keeps the appended tokens, so a driver that appends or rolls back wrongly is caught."""

    def __init__(self, docs: Sequence[int], world: int, delay_s: float) -> None:
        self.docs, self.world, self.delay_s = list(docs), world, delay_s
        self.tokens: list[int] = []
        self.closed = False

    @property
    def num_streams(self) -> int:
        return len(self.docs)

    @property
    def length(self) -> int:
        return len(self.tokens)

    async def next_dists(self) -> list[Dist]:
        await asyncio.sleep(self.delay_s)
        return [doc_dist(d, self.world, tuple(self.tokens)) for d in self.docs]

    async def append(self, tokens: Sequence[int]) -> None:
        self.tokens.extend(tokens)

    async def rollback(self, length: int) -> None:
        assert 0 <= length <= len(self.tokens)
        del self.tokens[length:]

    async def close(self) -> None:
        self.closed = True


def doc_dist(doc: int, world: int, prefix: tuple[int, ...]) -> Dist:
    z = np.random.default_rng([world, 99, *prefix]).normal(0, 2.0, VOCAB)
    z += np.random.default_rng([world, doc, *prefix]).normal(0, 2.0, VOCAB)
    z[EOS] -= 4.0 if len(prefix) < 10 else -2.0
    return Dist.full(z)


def side_spec(docs: Sequence[int], scores: Sequence[float], world: int) -> SideSpec:
    def dist_fn(prefix):
        rows = np.log(np.stack([doc_dist(d, world, prefix).probs() for d in docs]))
        return Dist.full(side_mixture(rows, scores)[0])

    return SideSpec(side_mixture(np.zeros((len(docs), 1)), scores)[1], dist_fn)


def random_logprobs(rng: np.random.Generator, v: int, sharpness: float = 2.0) -> np.ndarray:
    """A random normalised log-prob vector of ``v`` ids (larger ``sharpness``: more peaked)."""
    z = rng.normal(0, sharpness, v)
    return z - np.log(np.exp(z).sum())


def retrieved_docs(pool: Sequence[int], query: tuple[int, ...], world: int, k: int = 2) -> tuple[list[int], list[float]]:
    """A fake retriever: the top-k of ``pool`` for a token-id query (scores a pure function of it)."""
    r = np.random.default_rng([world, 7, *pool, 10**6, *query]).normal(2.0, 1.0, len(pool))
    top = np.argsort(-r)[:k]
    return [pool[i] for i in top], [float(r[i]) for i in top]


def iterative_side_spec(pool: Sequence[int], world: int, every: int) -> SideSpec:
    """The reference side of a driver that re-retrieves from ``pool`` at each boundary."""
    from dragon_core import iterative

    def docs(prefix):
        return retrieved_docs(pool, tuple(prefix[: iterative.boundary(len(prefix), every)]), world)

    def dist_fn(prefix):
        d, sc = docs(prefix)
        return side_spec(d, sc, world).dist_fn(prefix)

    d0, s0 = docs(())
    return SideSpec(side_spec(d0, s0, world).log_h, dist_fn,
                    log_h_fn=lambda prefix: side_spec(*docs(prefix), world).log_h)
