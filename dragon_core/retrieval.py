"""The retriever contract both sides share: embedding model name, score function, chunking.

The cloud's public index and the device's private store must produce *comparable* scores
``R(d)``: the aggregation mixes documents of both sides in one softmax over ``R``
(docs/ALGORITHMS.md §2), so the handshake compares the retriever fingerprint
(model files + score function) and refuses on mismatch. This module is the pure contract;
loading the model and hashing its files is host I/O (``dragon_host.embedder``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

MODEL_NAME = "all-MiniLM-L6-v2"
EMBED_DIM = 384
DEFAULT_SCALE = 10.0
DEFAULT_PASSAGE_WORDS = 64  # DRAGON's passage length (docs/ALGORITHMS.md §5)


@dataclass(frozen=True)
class ScoreFunction:
    """``R(d) = scale * cos(q, d)`` over L2-normalised ``dim``-d embeddings of ``model``.

    Why a scale: ``R`` is a softmax *logit* over documents (weights ``exp R(d) / Σ exp R``).
    Cosine similarities of one query's top-k lie in a narrow band (e.g. 0.45..0.60 for
    MiniLM), so ``exp(cos)`` weights would be nearly uniform and retrieval quality would not
    matter; ``scale = 10`` turns a 0.15 cosine gap into a 4.5x weight ratio. The scale is part
    of the contract: both sides must use the same one or the cross-side masses ``h`` differ.
    """

    model: str = MODEL_NAME
    dim: int = EMBED_DIM
    scale: float = DEFAULT_SCALE

    def id(self) -> str:
        return f"cosine*{self.scale:g}/l2norm/{self.model}/dim{self.dim}"

    def scores(self, query: np.ndarray, docs: np.ndarray) -> np.ndarray:
        """``R`` for each row of ``docs`` (both L2-normalised): ``scale * docs @ query``."""
        q = np.asarray(query, dtype=np.float32).reshape(-1)
        d = np.asarray(docs, dtype=np.float32).reshape(-1, self.dim)
        return (self.scale * (d @ q)).astype(np.float32)

    def from_inner_product(self, ip: np.ndarray) -> np.ndarray:
        """``R`` from inner products an index already computed (faiss ``IndexFlatIP``)."""
        return (self.scale * np.asarray(ip, dtype=np.float32)).astype(np.float32)


DEFAULT_SCORE = ScoreFunction()


def score_function_id(score: ScoreFunction = DEFAULT_SCORE) -> str:
    return score.id()


# ------------------------------------------------------------------ chunking
_WS = re.compile(r"\s+")


def chunk_words(text: str, words: int = DEFAULT_PASSAGE_WORDS) -> list[str]:
    """Split ``text`` into consecutive passages of ``words`` whitespace-separated words
    (the last one may be shorter). Whitespace is normalised to single spaces."""
    if words < 1:
        raise ValueError(f"words must be >= 1, got {words}")
    tokens = _WS.split(text.strip())
    if tokens == [""]:
        return []
    return [" ".join(tokens[i : i + words]) for i in range(0, len(tokens), words)]
