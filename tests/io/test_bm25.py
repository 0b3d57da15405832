"""BM25, the sparse retriever of iterative retrieval (issue 16; dragon_vllm/corpus/bm25.py): its
top-k against a brute-force ranking, the canonical scores a RaLMSpec cache reproduces bitwise,
the hybrid (BM25 selects, dense R weighs) through PublicDocuments' speculation, and its edges.
Real bm25s, real MiniLM, real faiss; a synthetic corpus of a few hundred sentences."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from dragon_core import messages as m  # noqa: E402
from dragon_vllm import corpus as c  # noqa: E402
from dragon_vllm.corpus.bm25 import Bm25Error, Bm25Index, Bm25Searcher, tokenize  # noqa: E402
from dragon_vllm.corpus.index import canonical_order  # noqa: E402
from dragon_vllm.public_documents import PublicDocuments  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
TOPICS = [
    "lobster claws shell ocean crab", "volcano lava eruption ash crater", "chess opening bishop knight gambit",
    "bread yeast flour dough oven", "telescope galaxy orbit mirror nebula", "river delta bridge valley flood",
    "piano keys hammer string melody", "glacier ice snow mountain winter",
]
FILLER = "the of and a to in is was with for on by".split()  # mostly bm25s's English stopwords
WORDS = sorted({w for t in TOPICS for w in t.split()})


def sentences(n: int = 300, seed: int = 0) -> list[str]:
    """Topical sentences with stopwords and stray words; the last 40 repeat earlier ones (exact
    BM25 ties, broken by passage id)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        topic = TOPICS[rng.integers(len(TOPICS))].split()
        words = list(rng.choice(topic, rng.integers(2, 7))) + list(rng.choice(FILLER, rng.integers(1, 6)))
        words += list(rng.choice(WORDS, rng.integers(0, 3)))
        rng.shuffle(words)
        out.append(" ".join(words).capitalize() + ".")
    return out + out[5:45]


def queries(n: int = 60, seed: int = 1) -> list[str]:
    rng = np.random.default_rng(seed)
    vocab = WORDS + FILLER + ["unseenword"]
    return [" ".join(rng.choice(vocab, rng.integers(1, 9))) for _ in range(n)]


@pytest.fixture(scope="module")
def texts() -> list[str]:
    return sentences()


@pytest.fixture(scope="module")
def searcher(texts) -> tuple[Bm25Searcher, np.ndarray]:
    """Passage ids that are not row numbers (shuffled, with gaps): ranking is by id, not row."""
    ids = np.random.default_rng(2).permutation(10 * len(texts))[: len(texts)]
    return Bm25Searcher(ids.tolist(), texts), ids


@pytest.fixture(scope="module")
def dense(tmp_path_factory, texts) -> c.PublicIndex:
    from dragon_host.embedder import default_embedder

    d = tmp_path_factory.mktemp("bm25")
    src = d / "sentences.jsonl"
    src.write_text("".join(json.dumps({"title": f"s{i}", "text": t}) + "\n" for i, t in enumerate(texts)))
    index = c.PublicIndex.build([src], d / "flat", kind="flat", embedder=default_embedder(), progress=False)
    assert len(index) == len(texts)  # one passage a sentence (distinct titles: no dedup)
    return index


@pytest.fixture(scope="module")
def hybrid(dense) -> Bm25Index:
    return Bm25Index.over(dense)


def brute_force(s: Bm25Searcher, ids: np.ndarray, query: str, n: int) -> tuple[np.ndarray, np.ndarray]:
    scores = s.score_ids(query, ids)
    order = canonical_order(ids, scores)[:n]
    return ids[order], scores[order]


def bits(x: np.ndarray) -> list[int]:
    return np.asarray(x, dtype=np.float32).view(np.uint32).tolist()


# ------------------------------------------------------------------ tokenizer
def test_tokenize_lowercases_drops_stopwords_and_short_words():
    assert tokenize("The Lobster, the LOBSTER and a 2 x-ray of Etna!") == ["lobster", "lobster", "ray", "etna"]
    assert tokenize("") == [] and tokenize("the of and a to") == []


def test_tokenization_and_scores_are_the_same_in_another_process(searcher, texts):
    """Nothing depends on the process (hash seed, dict order): another interpreter with another
    PYTHONHASHSEED tokenizes and ranks the same, bit for bit."""
    s, ids = searcher
    qs = queries(10)
    here = [[tokenize(q), s.top(q, 7).ids.tolist(), bits(s.top(q, 7).scores)] for q in qs]
    code = ("import json, sys, numpy as np\n"
            "from dragon_vllm.corpus.bm25 import Bm25Searcher, tokenize\n"
            "ids, texts, qs = json.load(sys.stdin)\n"
            "s = Bm25Searcher(ids, texts)\n"
            "print(json.dumps([[tokenize(q), s.top(q, 7).ids.tolist(),"
            " s.top(q, 7).scores.view(np.uint32).tolist()] for q in qs]))\n")
    out = subprocess.run([sys.executable, "-c", code], input=json.dumps([ids.tolist(), texts, qs]), text=True,
                         capture_output=True, cwd=REPO, timeout=120,
                         env={**os.environ, "PYTHONHASHSEED": "12345", "PYTHONPATH": str(REPO)})
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == here


# ------------------------------------------------------------------ ranking
def test_top_n_equals_a_brute_force_ranking_of_every_passage(searcher):
    s, ids = searcher
    tied_at_cut = 0
    for q in queries():
        for n in (1, 2, 5, 20, 57, len(ids)):
            got = s.top(q, n)
            want_ids, want_scores = brute_force(s, ids, q, n)
            assert got.ids.tolist() == want_ids.tolist(), (q, n)
            assert bits(got.scores) == bits(want_scores)
            assert s.search(q, n) == want_ids.tolist()
            scores = np.sort(s.score_ids(q, ids))[::-1]
            tied_at_cut += n < len(ids) and scores[n - 1] == scores[n] > 0
    assert tied_at_cut >= 10  # the cut really falls inside ties (the library's own top-n is arbitrary there)


def test_canonical_scores_are_the_librarys_bm25(searcher, texts):
    """score_ids is bm25s's BM25 (its contributions, summed): equal to the library's own scores up
    to float rounding, 0 exactly for a passage without a query term, and topical."""
    s, ids = searcher
    for q in queries(20):
        mine = s.score_ids(q, ids)  # the library's scores are by row: the order ids were given in
        terms = s.terms(q)
        lib = s.model.get_scores(terms.tolist()) if len(terms) else np.zeros(len(ids), np.float32)
        np.testing.assert_allclose(mine, lib, rtol=1e-6, atol=0)
        has = np.array([bool(set(tokenize(q)) & set(tokenize(t))) for t in texts])
        assert ((mine > 0) == has).all()
    best = s.top("volcano lava crater", 10)
    assert all({"volcano", "lava", "crater"} & set(tokenize(texts[int(np.flatnonzero(ids == i)[0])]))
               for i in best.ids)


def test_a_cache_scores_bitwise_as_the_real_retrieval(searcher):
    """The scores of the passages a retrieval found, scored again in another batch (a RaLMSpec
    cache: shuffled, mixed with other passages), are the same bits."""
    s, ids = searcher
    rng = np.random.default_rng(3)
    for q in queries(30):
        real = s.top(q, 20)
        cache = np.concatenate([real.ids, rng.choice(ids, 15, replace=False)])
        perm = rng.permutation(len(cache))
        again = s.score_ids(q, cache[perm])
        assert bits(again[np.argsort(perm)][: len(real.ids)]) == bits(real.scores)
        assert bits(s.score_ids(q, real.ids[:1])) == bits(real.scores[:1])  # alone, too


# ------------------------------------------------------------------ the hybrid over the dense index
def test_bm25_selects_and_dense_r_weighs(hybrid, dense):
    differs_from_dense = 0
    for text in queries(15):
        q = hybrid.embed_query(text)
        got = hybrid.search_vector(q, 5)
        found = [p.id for p in got]
        assert found == hybrid.bm25.search(text, 5)  # BM25 order
        r = dense.score_vectors(q.dense, dense.vectors(found))
        assert bits([p.score for p in got]) == bits(r)  # weights: bitwise the dense R
        assert [(p.title, p.text) for p in got] == [dense.passage(i) for i in found]
        assert bits(hybrid.rank_scores(q, found)) == bits(hybrid.bm25.score_ids(text, found))
        differs_from_dense += found != [p.id for p in dense.search_vector(q.dense, 5)]
    assert differs_from_dense >= 5  # BM25 really picks other passages than the dense search


class _Backend:
    """What PublicDocuments needs of the cloud here: the index and a tokenizer whose token i is
    the i-th word of the vocabulary (the answer so far becomes part of the query)."""

    def __init__(self, index) -> None:
        self.index = index

    class tokenizer:
        @staticmethod
        def decode(ids, skip_special_tokens=True) -> str:
            return " ".join(WORDS[i % len(WORDS)] for i in ids)


def test_speculation_is_exact_when_the_top_k_is_cached_and_caught_when_not(hybrid):
    """PublicDocuments over the hybrid: a cache holding the real top-k speculates it exactly (the
    same ids in BM25 order, bitwise the same R); a cache of each retrieval's top 3 misses some
    boundaries, which the check sees. Ranking the cache by R instead would be wrong: the hook
    (rank_scores) is what makes it exact."""
    question = "which volcano erupts lava"
    prefixes = [tuple(range(3, 3 + j)) for j in range(1, 12)] + [(7 * j % 40, 11 * j % 40) for j in range(12)]
    right = wrong = by_r_wrong = 0
    for cache_size in (len(hybrid), 3):
        docs = PublicDocuments(_Backend(hybrid), m.Open(1, question, 2, 8, 0, retrieve_every=2), cache_size=cache_size)

        async def go() -> None:
            nonlocal right, wrong, by_r_wrong
            await docs.retrieve(())
            for prefix in prefixes:
                spec = await docs.speculate(prefix)
                real = await docs.retrieve(prefix)
                text = f"{question} {_Backend.tokenizer.decode(prefix)}"
                assert real.ids == tuple(p.id for p in hybrid.search(text, 2))  # the real path is plain search
                if cache_size == len(hybrid):
                    assert spec.same(real), (prefix, spec, real)
                    right += 1
                    ids = list(docs._cache)  # everything: ranked by R, the picks would differ
                    q = await docs._query(prefix)
                    r = hybrid.score_vectors(q, np.stack([docs._cache[i][1] for i in ids]))
                    by_r_wrong += tuple(ids[j] for j in canonical_order(np.asarray(ids), r)[:2]) != real.ids
                else:
                    wrong += not spec.same(real)

        asyncio.run(go())
    assert right == len(prefixes) and wrong >= 1 and by_r_wrong >= 1, (right, wrong, by_r_wrong)


# ------------------------------------------------------------------ edges and errors
def test_queries_without_known_terms_get_the_smallest_ids(searcher, hybrid, dense):
    s, ids = searcher
    smallest = sorted(ids.tolist())
    for q in ("", "the of and", "unseenword zzz", "!!", ["the"], []):
        got = s.top(q, 3)
        assert got.ids.tolist() == smallest[:3] and bits(got.scores) == bits([0, 0, 0])
        assert bits(s.score_ids(q, ids[:4])) == bits([0, 0, 0, 0])
    assert s.top("lobster", 0).ids.tolist() == [] and len(s.top("lobster", 10**6).ids) == len(ids)
    got = hybrid.search("the of and", 2)  # a stopword-only question still gets k passages, with R
    assert [p.id for p in got] == [0, 1]
    q = hybrid.embed_query("the of and")
    assert bits([p.score for p in got]) == bits(dense.score_vectors(q.dense, dense.vectors([0, 1])))


def test_typed_errors(searcher):
    s, ids = searcher
    with pytest.raises(Bm25Error, match="no indexable word"):
        Bm25Searcher([0, 1], ["the of", ""])
    with pytest.raises(Bm25Error, match="no indexable word"):
        Bm25Searcher([], [])
    with pytest.raises(Bm25Error, match="duplicate"):
        Bm25Searcher([3, 3], ["lobster", "crab"])
    with pytest.raises(Bm25Error, match="2 passage ids for 1 texts"):
        Bm25Searcher([0, 1], ["lobster"])
    missing = int(ids.max()) + 1
    with pytest.raises(Bm25Error, match=f"{missing}"):
        s.score_ids("lobster", [int(ids[0]), missing])
    with pytest.raises(Bm25Error, match=">= 0"):
        s.top("lobster", -1)
    assert isinstance(Bm25Error("x"), c.CorpusError)


def test_the_hybrid_refuses_a_dense_query(hybrid, dense):
    with pytest.raises(Bm25Error, match="embed_query"):
        hybrid.search_vector(dense.embed_query("lobster"), 2)


# ------------------------------------------------------------------ serving: dragon-cloud serve --retriever bm25
def test_the_clouds_open_retrieval_through_bm25_is_bm25s_and_is_counted(hybrid):
    """``QueryBatcher`` (the cloud's retrieval at Open) over the hybrid gives what ``search``
    gives, query by query, and ``/metrics``' counters see the searches."""
    from dragon_vllm.query_batcher import QueryBatcher

    qs = queries(12, seed=7)
    before = hybrid.retrieval_stats()

    async def all_at_once():
        batcher = QueryBatcher(hybrid)
        return await asyncio.gather(*(batcher.search(q, 3) for q in qs)), batcher.batches

    got, batches = asyncio.run(all_at_once())
    assert [[p.id for p in ps] for ps in got] == [[p.id for p in hybrid.search(q, 3)] for q in qs]
    assert [[p.score for p in ps] for ps in got] == [[p.score for p in hybrid.search(q, 3)] for q in qs]
    after = hybrid.retrieval_stats()
    assert after["retrieval_queries"] - before["retrieval_queries"] == len(qs)
    assert after["retrieval_searches"] - before["retrieval_searches"] == batches >= 1
    assert after["retrieval_seconds"] > before["retrieval_seconds"]
    assert hybrid.fingerprint == hybrid.dense.fingerprint  # R is still the dense retriever's


@pytest.mark.parametrize("argv,message", [
    (["--retriever", "sparse", "--index", "."], "dense or bm25"),
    (["--retriever", "bm25"], "needs a public index"),
    (["--retriever", "bm25", "--index", ".", "--lookahead", "cpu"], "no --lookahead"),
])
def test_serve_refuses_a_bad_retriever_before_loading_anything(argv, message):
    from typer.testing import CliRunner

    from dragon_vllm.cli import app

    result = CliRunner().invoke(app, ["serve", "--port", "0", *argv])
    words = " ".join(result.output.replace("│", " ").split())  # the error box wraps long lines
    assert result.exit_code == 2 and message in words, result.output
