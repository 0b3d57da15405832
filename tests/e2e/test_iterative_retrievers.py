"""RaLMSpec is exact for every retriever (issue 16): with speculation on, an answer equals plain
iterative retrieval's token for token, over an exact dense (flat), an approximate dense (IVF-Flat)
and a sparse (BM25 selects, dense R weighs) index, at two retrieval strides, with RaLMSpec's
cache (top-20) and with a cache of only the top-2, which speculates wrong and rolls back.

Real everything: SmolLM2-135M on llama.cpp decoding solo sessions through the host driver
(``benchmarks.bench_iterative.answer``, the benchmark's own path), the cloud's ``PublicDocuments``,
MiniLM embeddings, faiss, bm25s; a corpus of 60 short passages written here."""

from __future__ import annotations

import asyncio
import json
from types import SimpleNamespace

import pytest

from benchmarks.bench_iterative import answer, build_retriever

CITIES = ["Lyon", "Porto", "Kyoto", "Quebec", "Bergen", "Seville", "Krakow", "Valparaiso", "Hoi An", "Tbilisi"]
FACETS = [
    "{c} is famous for its food: markets, street stalls and old family restaurants serve local dishes.",
    "{c} has a river or harbour that shaped its trade, with bridges, quays and ships in its history.",
    "{c} holds a festival every year with music, lights and parades that fill the old town.",
    "The old town of {c} is a heritage site with narrow streets, churches, temples and museums.",
    "{c} is known for a craft: silk, ceramics, wine, lanterns or wooden boats made by hand.",
    "Winters in {c} are cold or wet, and summers bring visitors who walk its hills and parks.",
]
QUESTIONS = ["What is Lyon famous for?", "What happens at the festival in Kyoto?"]
TOKENS = 16


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    from dragon_vllm.corpus import PublicIndex

    root = tmp_path_factory.mktemp("retrievers")
    with open(root / "public.jsonl", "w", encoding="utf-8") as f:
        for city in CITIES:
            for facet in FACETS:
                f.write(json.dumps({"title": city, "text": facet.format(c=city)}) + "\n")
    return PublicIndex.build([root / "public.jsonl"], root / "index", progress=False, overwrite=True, kind="flat")


@pytest.fixture(scope="module")
def engine(smollm2):
    from dragon_edge.engines.llamacpp import LlamaCppEngine
    from dragon_edge.loader import load_tokenizer
    from dragon_core.prompt import eos_token_ids

    eng = LlamaCppEngine.from_name("smollm2-135m", n_ctx=1024, n_threads=2)
    tokenizer = load_tokenizer("smollm2-135m")
    yield eng, tokenizer, eos_token_ids(tokenizer)
    asyncio.run(eng.close())


@pytest.mark.parametrize("retriever", ["flat", "ivf", "bm25"])
def test_speculative_answers_equal_plain_iterative_retrieval_for_every_retriever(corpus, engine, retriever):
    eng, tokenizer, eos = engine
    index, _ = build_retriever(corpus, SimpleNamespace(retriever=retriever, pad=0, seed=0, nprobe=2))

    def run(question: str, every: int, speculate: bool, cache_size: int = 20) -> dict:
        return asyncio.run(answer(eng, tokenizer, eos, index, question, 2, TOKENS, every, speculate,
                                  max_depth=8, cache_size=cache_size))

    wrong = 0
    for question in QUESTIONS:
        for every in (2, 4):
            plain = run(question, every, False)
            assert len(plain["tokens"]) > every, plain  # the answer crosses boundaries
            for cache_size in (20, 2):
                spec = run(question, every, True, cache_size)
                assert spec["tokens"] == plain["tokens"], (retriever, question, every, cache_size)
                assert spec["speculated"] >= 1 and spec["right"] + spec["wrong"] <= spec["speculated"]
                wrong += spec["wrong"]
    assert wrong >= 1, f"{retriever}: no speculation was ever wrong, the rollback went untested"
