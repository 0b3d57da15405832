"""BM25, the sparse retriever of iterative retrieval (issue 16), over the public passages.

BM25 *selects* the passages; their mixture weights stay ``R(d)`` of the shared dense score
function, so the device can still mix them with its own (``dragon_core.retrieval``):

* :class:`Bm25Searcher`: the ``bm25s`` index of the passages' text (the library's lucene BM25,
  its tokenizer pattern and its English stopword list; nothing downloaded), its top-n, and
  :meth:`Bm25Searcher.score_ids`, the one canonical BM25 score both a real retrieval and a
  RaLMSpec speculation rank by;
* :class:`Bm25Index`: the interface ``PublicDocuments`` uses (``embed_query``,
  ``search_vector``, ``vectors``, ``score_vectors``) over a dense index, plus ``rank_scores``:
  a retrieval's top-k are the k best passages by BM25 (ties: smaller id first), scored with the
  dense index's ``R`` and kept in BM25's order.

Why a canonical score: a speculation ranks the request's cached passages by BM25 and must find
bitwise the scores the real retrieval found for them, or it could order them differently. The
library's own sums are not promised to be reproducible from a subset of passages, so every
BM25 score that orders anything is :meth:`Bm25Searcher.score_ids`: for each passage, the sum of
the library's precomputed per-(term, passage) contributions over the query's terms, in the
query's order, in float32. The library's own scores only pick the candidates, with a margin that
covers the two sums' rounding difference (:func:`_candidate_floor`).
"""

from __future__ import annotations

import functools
import logging
import time
from dataclasses import dataclass
from typing import NamedTuple, Protocol, Sequence

import numpy as np

from dragon_core.passage import Passage
from dragon_vllm.corpus.errors import CorpusError
from dragon_vllm.corpus.index import RetrievalCounters, canonical_order

TOKEN_PATTERN = r"(?u)\b\w\w+\b"  # bm25s's default (scikit-learn's): words of 2+ characters
STOPWORDS = "en"  # bm25s's own English list, shipped in the package
K1, B, METHOD = 1.5, 0.75, "lucene"  # bm25s's defaults; lucene's contributions are all > 0


class Bm25Error(CorpusError, ValueError):
    """A BM25 index that cannot be built or asked (no text, duplicate or unknown passage ids,
    a query object of another index)."""

    code = "bm25_error"


class Hits(NamedTuple):
    """A BM25 retrieval in canonical order (score descending, id ascending)."""

    ids: np.ndarray  # int64 passage ids
    scores: np.ndarray  # float32, :meth:`Bm25Searcher.score_ids` of those ids


@functools.cache
def _bm25s():
    import bm25s

    # bm25s sets its logger to DEBUG at import; an application's root handler would print it.
    logging.getLogger("bm25s").setLevel(logging.WARNING)
    return bm25s


def tokenize(text: str) -> list[str]:
    """The terms BM25 sees in ``text``: lowercased words of 2+ characters, stopwords dropped
    (bm25s's tokenizer; a pure function of the text)."""
    return _bm25s().tokenize([text], lower=True, token_pattern=TOKEN_PATTERN, stopwords=STOPWORDS,
                             return_ids=False, show_progress=False)[0]


class Bm25Searcher:
    """BM25 over passages given as (ids, texts). Read-only once built, so thread-safe."""

    def __init__(self, ids: Sequence[int], texts: Sequence[str]) -> None:
        self._ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        if len(self._ids) != len(texts):
            raise Bm25Error(f"{len(self._ids)} passage ids for {len(texts)} texts")
        self._by_id = np.argsort(self._ids, kind="stable")  # rows in passage id order
        if len(self._ids) and (np.diff(self._ids[self._by_id]) == 0).any():
            raise Bm25Error("duplicate passage ids")
        self.model = _build_model(texts)
        s = self.model.scores
        self._data, self._rows, self._ptr = s["data"], s["indices"].astype(np.int64), s["indptr"]
        _check_layout(self._data, self._rows, self._ptr, len(self._ids))

    def __len__(self) -> int:
        return len(self._ids)

    # ---------------------------------------------------------- queries
    def terms(self, query: str | Sequence[str]) -> np.ndarray:
        """The query's term columns, in its order, repeats kept (as the library scores them);
        terms no passage has are dropped (they add nothing)."""
        tokens = tokenize(query) if isinstance(query, str) else list(query)
        vocab = self.model.vocab_dict
        return np.asarray([vocab[t] for t in tokens if t in vocab], dtype=np.int64)

    def search(self, query: str | Sequence[str], n: int) -> list[int]:
        """The ids of the ``n`` best passages, best first (see :meth:`top`)."""
        return self.top(query, n).ids.tolist()

    def top(self, query: str | Sequence[str], n: int) -> Hits:
        """The ``n`` best passages by :meth:`score_ids`, ties by smaller id: exactly the first
        ``n`` of all passages in canonical order (a query without known terms scores every
        passage 0, so it gets the smallest ids)."""
        if n < 0:
            raise Bm25Error(f"n must be >= 0, not {n}")
        terms, n = self.terms(query), min(n, len(self))
        rows = self._candidates(terms, n) if n else np.zeros(0, dtype=np.int64)
        scores = self._score_rows(terms, rows)
        ids = self._ids[rows]
        order = canonical_order(ids, scores)[:n]
        return Hits(ids[order], scores[order])

    def score_ids(self, query: str | Sequence[str], ids: Sequence[int]) -> np.ndarray:
        """The canonical BM25 score (float32) of each passage id for the query: the same bits
        whichever other passages are scored with it."""
        return self._score_rows(self.terms(query), self._rows_of(ids))

    # ---------------------------------------------------------- internals
    def _score_rows(self, terms: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """Sum, per row, the library's contribution of each query term, in the query's order:
        a float32 add per (term, row) whatever the batch, which is what makes it canonical."""
        out = np.zeros(len(rows), dtype=np.float32)
        for t in terms.tolist():
            lo, hi = int(self._ptr[t]), int(self._ptr[t + 1])
            col = self._rows[lo:hi]  # the rows holding term t, ascending (checked at build)
            pos = np.minimum(np.searchsorted(col, rows), hi - lo - 1)
            has = col[pos] == rows
            out[has] += self._data[lo + pos[has]]
        return out

    def _candidates(self, terms: np.ndarray, n: int) -> np.ndarray:
        """Rows that hold the canonical top-n: the library's top-n, widened to every row within
        the rounding margin of its n-th score (ties at the cut included), or, when fewer than n
        rows share a term with the query, those plus the smallest-id others (all exactly 0)."""
        bm25s = _bm25s()
        lib = self.model.get_scores(terms.tolist()) if len(terms) else np.zeros(len(self), np.float32)
        _, top = bm25s.selection.topk(lib, n, backend="numpy", sorted=False)
        cut = float(lib[top].min())
        if cut > 0:
            return np.flatnonzero(lib >= _candidate_floor(cut, len(terms)))
        some = np.flatnonzero(lib > 0)
        none = self._by_id[lib[self._by_id] == 0][: n - len(some)]
        return np.concatenate([some, none])

    def _rows_of(self, ids: Sequence[int]) -> np.ndarray:
        want = np.asarray(ids, dtype=np.int64).reshape(-1)
        if not len(want):
            return want
        sorted_ids = self._ids[self._by_id]  # not empty: a built index has a word, so a passage
        pos = np.minimum(np.searchsorted(sorted_ids, want), len(sorted_ids) - 1)
        if (sorted_ids[pos] != want).any():
            unknown = sorted(set(want.tolist()) - set(self._ids.tolist()))
            raise Bm25Error(f"passages {unknown[:5]} are not in the BM25 index")
        return self._by_id[pos]


def _build_model(texts: Sequence[str]):
    bm25s = _bm25s()
    corpus = bm25s.tokenize(list(texts), lower=True, token_pattern=TOKEN_PATTERN, stopwords=STOPWORDS,
                            return_ids=True, show_progress=False)
    if not corpus.vocab:
        raise Bm25Error(f"no indexable word in {len(texts)} passages (BM25 needs text)")
    model = bm25s.BM25(k1=K1, b=B, method=METHOD, backend="numpy", csc_backend="numpy")
    model.index(corpus, create_empty_token=False, show_progress=False)  # no "" term: nothing matches it
    return model


def _check_layout(data: np.ndarray, rows: np.ndarray, ptr: np.ndarray, n: int) -> None:
    """What :meth:`Bm25Searcher._score_rows` and :func:`_candidate_floor` rely on in the
    library's matrix (term columns of passage rows): float32, no empty column, rows ascending
    within a column, every contribution > 0. A library change that breaks it fails here, not in
    a ranking."""
    counts = np.diff(ptr)
    cols = np.repeat(np.arange(len(counts), dtype=np.int64), counts)
    key = cols * max(n, 1) + rows
    if data.dtype != np.float32 or (counts <= 0).any() or (np.diff(key) <= 0).any() or (data <= 0).any() or \
            (rows < 0).any() or (rows >= n).any():
        raise Bm25Error("bm25s's score matrix is not laid out as expected (float32 columns of ascending "
                        "rows, positive contributions); pin the bm25s version this was written for")


def _candidate_floor(cut: float, n_terms: int) -> float:
    """The lowest library score a passage of the canonical top-n can have, given the library's
    n-th score ``cut``. Both scores are float32 sums of the same <= ``n_terms`` positive
    contributions, each within a relative ``(n_terms - 1) * u`` of the exact sum (u = 2**-24);
    a passage below ``cut * (1 - 4 * n_terms * u)`` is canonically below ``n`` others. Twice
    that margin here (eps = 2u)."""
    return cut * (1.0 - 4.0 * (n_terms + 1) * float(np.finfo(np.float32).eps))


# ------------------------------------------------------------------ the index PublicDocuments uses
class DenseIndex(Protocol):
    """What :class:`Bm25Index` needs of a dense index (``PublicIndex`` has it)."""

    def __len__(self) -> int: ...
    def embed_query(self, query: str) -> np.ndarray: ...
    def vectors(self, ids: Sequence[int]) -> np.ndarray: ...
    def score_vectors(self, q: np.ndarray, vectors: np.ndarray) -> np.ndarray: ...
    def passage(self, pid: int) -> tuple[str, str]: ...


@dataclass(frozen=True, eq=False)
class Bm25Query:
    """A query as :class:`Bm25Index` searches it: its BM25 terms and its dense embedding."""

    text: str
    tokens: tuple[str, ...]
    dense: np.ndarray  # 1 x d, the dense index's embed_query


class Bm25Index:
    """BM25 selects, the dense ``R`` weighs (module docstring). The passages' per-passage
    representation (``vectors``) is the dense vector: BM25 needs only the passage's id, which
    the caller keys its cache by and passes to :meth:`rank_scores`."""

    def __init__(self, dense: DenseIndex, searcher: Bm25Searcher) -> None:
        self.dense, self.bm25 = dense, searcher
        self._timing = RetrievalCounters()

    @classmethod
    def over(cls, dense: DenseIndex, ids: Sequence[int] | None = None) -> "Bm25Index":
        """BM25 over the dense index's passages (all, or ``ids``), their text read from it."""
        ids = list(range(len(dense))) if ids is None else list(ids)
        return cls(dense, Bm25Searcher(ids, [dense.passage(i)[1] for i in ids]))

    def __len__(self) -> int:
        return len(self.bm25)

    def embed_query(self, query: str) -> Bm25Query:
        return Bm25Query(query, tuple(tokenize(query)), self.dense.embed_query(query))

    def search(self, query: str, k: int = 4) -> list[Passage]:
        return self.search_vector(self.embed_query(query), k)

    def search_vector(self, q: Bm25Query, k: int) -> list[Passage]:
        """The ``k`` best passages by BM25 (canonical order), each scored with its dense ``R``."""
        ids = self.bm25.top(_checked(q).tokens, k).ids.tolist()
        r = self.score_vectors(q, self.vectors(ids)) if ids else np.zeros(0, dtype=np.float32)
        return [self._passage(i, float(s)) for i, s in zip(ids, r.tolist())]

    def vectors(self, ids: Sequence[int]) -> np.ndarray:
        return self.dense.vectors(ids)

    def score_vectors(self, q: Bm25Query, vectors: np.ndarray) -> np.ndarray:
        """``R`` of the passages' dense vectors: the mixture weights, bitwise the dense index's."""
        return self.dense.score_vectors(_checked(q).dense, vectors)

    def rank_scores(self, q: Bm25Query, ids: Sequence[int]) -> np.ndarray:
        """What passages are ranked by: BM25, bitwise as :meth:`search_vector` ranked them."""
        return self.bm25.score_ids(_checked(q).tokens, ids)

    # ---------------------------------------------------------- serving: dragon-cloud serve --retriever bm25
    def search_many(self, queries: Sequence[str], k: int = 4) -> list[list[Passage]]:
        """The cloud's retrieval at a request's Open (``QueryBatcher`` calls it from a worker
        thread): each query's top-``k`` by BM25, weighed by ``R``, as :meth:`search` gives it."""
        start = time.perf_counter()
        found = [self.search(q, k) for q in queries]
        self._timing.count(len(queries), time.perf_counter() - start)
        return found

    def retrieval_stats(self) -> dict:
        """The same counters as ``PublicIndex.retrieval_stats`` (``/metrics``), for BM25's searches."""
        return self._timing.snapshot()

    @property
    def fingerprint(self) -> str:
        """The dense retriever's: the handshake compares ``R``, which is still the dense one."""
        return self.dense.fingerprint

    def close(self) -> None:
        close = getattr(self.dense, "close", None)
        if close is not None:
            close()

    def _passage(self, pid: int, score: float) -> Passage:
        title, text = self.dense.passage(pid)
        return Passage(pid, text, score, title=title)


def _checked(q: object) -> Bm25Query:
    if not isinstance(q, Bm25Query):
        raise Bm25Error(f"a Bm25Index query comes from its embed_query, not {type(q).__name__}")
    return q
