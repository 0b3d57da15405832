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
        q = await self._query(prefix)
        passages = await asyncio.to_thread(self.index.search_vector, q, self.cache_size)
        if self.speculates:
            fresh = [p for p in passages if p.id not in self._cache]
            if fresh:
                vectors = await asyncio.to_thread(self.index.vectors, [p.id for p in fresh])
                self._cache.update({p.id: (p, v) for p, v in zip(fresh, vectors)})
        return _documents(passages[: self.req.k])

    async def speculate(self, prefix: Sequence[int]) -> Documents | None:
        if not self.speculates or len(self._cache) < self.req.k:
            return None
        q = await self._query(prefix)
        ids = list(self._cache)
        scores = self.index.score_vectors(q, np.stack([self._cache[i][1] for i in ids]))
        order = canonical_order(np.asarray(ids, dtype=np.int64), scores)[: self.req.k]
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
