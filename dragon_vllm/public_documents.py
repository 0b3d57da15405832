"""The cloud's documents at a retrieval boundary (issue 16), with RaLMSpec's per-request cache.

A ``DocumentSource`` (``dragon_host.documents``) for one request on the public index:

* ``retrieve``: the real retrieval, the question and the answer so far embedded
  (``PublicIndex.embed_query``) and searched for the cache's depth (``cache_size``, RaLMSpec's
  top-20), its hits scored with the index's canonical kernel (``search_vector``); the request's
  top-k are its first k. Every passage it returns enters the cache with its stored vector.
* ``speculate``: RaLMSpec's speculative retrieval, the same query scored against the cached
  vectors with the index's own kernel (``PublicIndex.score_vectors``: bitwise the index's scores),
  top-k by score. Right exactly when the real top-k is in the cache, which is what makes it cheap:
  no index search on the critical path. The query embedding is shared with the verification.
  An index that ranks by another score than ``R`` (BM25, ``dragon_vllm.corpus.bm25.Bm25Index``)
  says so with ``rank_scores(q, ids)``: the cache is ranked by it and weighed by ``R``.
* ``open``: the streams over the documents, laid out as at the request's open.
"""

from __future__ import annotations

import asyncio
from typing import Sequence

import numpy as np

from dragon_core import iterative
from dragon_core import messages as m
from dragon_core.prompt import passage_prompts
from dragon_core.request import RequestSpec
from dragon_vllm.corpus.index import canonical_order
from dragon_host.documents import Documents
from dragon_host.slow_group import slowed

CACHE_SIZE = 20  # RaLMSpec: passages of each real retrieval kept for speculation


class PublicDocuments:
    def __init__(self, backend, req: m.Open, *, speculate: bool = True, cache_size: int = CACHE_SIZE) -> None:
        self.backend, self.req = backend, req
        self.index = backend.index
        self.speculates, self.cache_size = speculate, max(cache_size, req.k)
        self._queries: dict[tuple[int, ...], np.ndarray] = {}  # boundary prefix -> its query embedding
        self._cache: dict[int, tuple[object, np.ndarray]] = {}  # passage id -> (passage, stored vector)

    async def retrieve(self, prefix: Sequence[int]) -> Documents:
        return (await self.retrieve_many([prefix]))[0]

    async def retrieve_many(self, prefixes: Sequence[Sequence[int]]) -> list[Documents]:
        """The real retrievals of several boundaries, in one search where the index can
        (``search_vectors``: RaLMSpec's batched verification); their passages enter the cache."""
        qs = [await self._query(prefix) for prefix in prefixes]  # a speculation embedded them already
        many = getattr(self.index, "search_vectors", None)
        if many is not None:
            found = await asyncio.to_thread(many, np.vstack(qs), self.cache_size)
        else:
            found = await asyncio.to_thread(lambda: [self.index.search_vector(q, self.cache_size) for q in qs])
        if self.speculates:
            await self._remember([p for passages in found for p in passages])
        return [_documents(passages[: self.req.k]) for passages in found]

    async def _remember(self, passages) -> None:
        fresh = list({p.id: p for p in passages if p.id not in self._cache}.values())
        if fresh:
            vectors = await asyncio.to_thread(self.index.vectors, [p.id for p in fresh])
            self._cache.update({p.id: (p, v) for p, v in zip(fresh, vectors)})

    async def speculate(self, prefix: Sequence[int]) -> Documents | None:
        if not self.speculates or len(self._cache) < self.req.k:
            return None
        q = await self._query(prefix)
        ids = list(self._cache)
        scores = self.index.score_vectors(q, np.stack([self._cache[i][1] for i in ids]))
        order = canonical_order(np.asarray(ids, dtype=np.int64), self._rank_keys(q, ids, scores))[: self.req.k]
        picked = [self._cache[ids[j]][0] for j in order]
        return Documents(tuple(p.id for p in picked), tuple(float(scores[j]) for j in order),
                         [_rescored(p, float(scores[j])) for p, j in zip(picked, order)])

    async def open(self, docs: Documents):
        backend, req = self.backend, self.req
        prompts, scores = passage_prompts(backend.tokenizer, req.query, [p.text for p in docs.payload],
                                          list(docs.scores))
        backend._check_length(prompts, req.max_tokens)
        group = await backend.engine.open_group(prompts, RequestSpec.from_open(req).engine_temperature, scores,
                                                req.max_tokens)
        return slowed(group, backend.emulate_decode_ms)

    def _rank_keys(self, q, ids: list[int], scores: np.ndarray) -> np.ndarray:
        """What the cache is ranked by: ``R`` itself, or the index's own ranking score where it
        ranks by another one than it weighs by (``rank_scores``: BM25 selects, ``R`` weighs,
        ``dragon_vllm.corpus.bm25``), bitwise as its ``search_vector`` ranks."""
        rank = getattr(self.index, "rank_scores", None)
        return scores if rank is None else rank(q, ids)

    async def _query(self, prefix: Sequence[int]) -> np.ndarray:
        key = tuple(prefix)
        if key not in self._queries:
            answer = self.backend.tokenizer.decode(list(prefix), skip_special_tokens=True)
            self._queries[key] = await asyncio.to_thread(self.index.embed_query, iterative.query(self.req.query, answer))
        return self._queries[key]


def _documents(passages) -> Documents:
    return Documents(tuple(p.id for p in passages), tuple(float(p.score) for p in passages), list(passages))


def _rescored(passage, score: float):
    from dataclasses import replace

    return replace(passage, score=score)
