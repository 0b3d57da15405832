"""The cloud's public corpus: input readers, build/load/search, score contract, IVF, validation, CLI."""

from __future__ import annotations

import gzip
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from dragon_core import retrieval as r  # noqa: E402
from dragon_host import embedder as emb  # noqa: E402
from dragon_vllm import corpus as c  # noqa: E402

REPO = Path(__file__).resolve().parents[2]

# Distinct topics, so a topical query has exactly one right answer.
LOBSTER = ("Homarus gammarus , known as the European lobster , is a species of clawed lobster from the eastern "
           "Atlantic Ocean , Mediterranean Sea and parts of the Black Sea . It may grow to a length of 60 cm ( 24 in ) "
           "and a mass of 6 kilograms , and bears a conspicuous pair of claws . ")
VOLCANO = ("Mount Etna is an active stratovolcano on the east coast of Sicily . It is one of the most active volcanoes "
           "in the world and is in an almost constant state of activity , with lava flows and eruptions of ash . ")
CHESS = ("The Sicilian Defence is a chess opening that begins with the moves 1. e4 c5 . It is the most popular "
         "response to White's first move 1. e4 and gives Black an asymmetrical , fighting position . ")
BREAD = ("Sourdough bread is made by the fermentation of dough using naturally occurring lactobacilli and yeast . "
         "The starter culture gives the bread a mildly sour taste and better keeping qualities than yeasted bread . ")
SATELLITE = ("The Hubble Space Telescope is a space telescope launched into low Earth orbit in 1990 . Its mirror of "
             "2.4 metres lets it take extremely high-resolution images of distant galaxies and nebulae . ")
RIVER = ("The Danube is the second-longest river in Europe . It flows through Central and Southeastern Europe from "
         "the Black Forest into the Black Sea , passing through ten countries including Austria and Hungary . ")
PIANO = "The piano is a keyboard instrument in which felt hammers strike steel strings when the keys are pressed . "

QUERIES = {  # query -> title of the only relevant document
    "European lobster claws and size": "Homarus gammarus",
    "active volcano in Sicily with lava eruptions": "Mount Etna",
    "chess opening 1. e4 c5": "Sicilian Defence",
    "bread fermented with a sour starter": "Sourdough",
    "telescope in orbit photographing galaxies": "Hubble Space Telescope",
    "long river flowing into the Black Sea through Hungary": "Danube",
}


def write_inputs(d: Path) -> list[Path]:
    """One file of each input type; every topic long enough for several 64-word passages."""
    d.mkdir(parents=True, exist_ok=True)
    wiki = d / "wiki.valid.raw"
    wiki.write_text(f" \n = Homarus gammarus = \n \n {LOBSTER * 3}\n \n = = Description = = \n \n {LOBSTER * 2}\n"
                    f" \n = Mount Etna = \n \n {VOLCANO * 4}\n")
    text = d / "Sicilian Defence.txt"
    text.write_text(CHESS * 5)
    recs = [
        {"title": "Sourdough", "text": BREAD * 3},
        {"id": "7", "contents": f'"Hubble Space Telescope"\n{SATELLITE * 3}'},
        {"title": "Danube", "passage": RIVER * 2},
        {"question": "what strikes the strings of a piano", "ctxs": [{"title": "Piano", "text": PIANO * 2},
                                                                       {"title": "Piano", "text": PIANO * 2}]},
        {"title": "no text field", "body": "ignored"},
    ]
    jl = d / "passages.jsonl.gz"
    with gzip.open(jl, "wt", encoding="utf-8") as f:
        f.write("\n".join(json.dumps(x) for x in recs) + "\n\n")
    return [wiki, text, jl]


@pytest.fixture(scope="module")
def embedder() -> emb.Embedder:
    return emb.default_embedder()


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> list[Path]:
    return write_inputs(tmp_path_factory.mktemp("inputs"))


@pytest.fixture(scope="module")
def built(tmp_path_factory, inputs, embedder) -> c.PublicIndex:
    return c.PublicIndex.build(inputs, tmp_path_factory.mktemp("idx") / "flat", embedder=embedder, progress=False)


# ------------------------------------------------------------------ readers (no embedding)
def test_wikitext_reader_splits_articles_and_drops_sections(inputs):
    docs = list(c.read_documents(inputs[0]))
    assert [d.title for d in docs] == ["Homarus gammarus", "Mount Etna"]
    assert "Description" not in docs[0].text and "= =" not in docs[0].text
    assert r.chunk_words(docs[0].text) == r.chunk_words(LOBSTER * 5)
    assert c.detect_format(inputs[0]) == "wikitext"


def test_wikitext_reader_text_before_first_heading_and_escapes(tmp_path):
    p = tmp_path / "excerpt.txt"
    p.write_text(" = = History = = \n the 1 @,@ 000 @-@ year old tree is 3 @.@ 5 m tall \n = Oak = \n acorns \n")
    assert c.detect_format(p) == "wikitext"  # sniffed from the heading, not the suffix
    docs = list(c.read_documents(p))
    assert [(d.title, d.text.split()) for d in docs] == [
        ("excerpt", "the 1,000-year old tree is 3.5 m tall".split()), ("Oak", ["acorns"])]


def test_jsonl_reader_fields_ctxs_and_gzip(inputs):
    docs = list(c.read_documents(inputs[2]))
    assert [d.title for d in docs] == ["Sourdough", "Hubble Space Telescope", "Danube", "Piano", "Piano"]
    assert docs[1].text == SATELLITE * 3  # FlashRAG title line split off
    assert c.detect_format(inputs[2]) == "jsonl"
    assert [d.title for d in c.read_documents(inputs[1])] == ["Sicilian Defence"]


def test_reader_errors_are_typed(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"title": "a", "text": "b"}\n{not json\n')
    with pytest.raises(c.CorpusInputError, match="bad.jsonl:2"):
        list(c.read_documents(bad))
    binary = tmp_path / "blob.txt"
    binary.write_bytes(b"\xff\xfe\x00\x81" * 100)
    with pytest.raises(c.CorpusInputError):
        list(c.read_documents(binary))
    with pytest.raises(c.CorpusInputError, match="no such file"):
        list(c.read_documents(tmp_path / "missing.txt"))
    with pytest.raises(c.CorpusInputError, match="unknown input format"):
        list(c.read_documents(bad, "csv"))


# ------------------------------------------------------------------ build + search
def test_build_persists_passages_and_manifest(built, inputs, embedder):
    m = built.manifest
    expected = []  # every document's chunks, in order; the duplicate Piano record once
    for path in inputs:
        seen = []
        for d in c.read_documents(path):
            if (d.title, d.text) not in seen:
                seen.append((d.title, d.text))
                expected += [(d.title, t) for t in r.chunk_words(d.text, 64)]
    assert [built.passage(i) for i in range(len(built))] == expected
    assert m["passages"] == len(built) == len(expected) and m["index"]["type"] == "flat"
    assert m["retriever_fingerprint"] == embedder.fingerprint == emb.retriever_fingerprint()
    assert m["score_function"] == r.score_function_id()
    assert [s["documents"] for s in m["sources"]] == [2, 1, 4] and m["sources"][2]["duplicates"] == 1
    assert m["sources"][2]["skipped"] == 1
    texts = [t for _, t in expected]
    assert len(set(texts)) == len(texts)  # no two equal passages: rankings below have no ties
    assert sorted(p.name for p in built.path.iterdir()) == sorted([c.MANIFEST, c.INDEX_FILE, c.PASSAGES_FILE])
    assert not list(built.path.parent.glob(".*tmp*"))  # the build dir was renamed into place


def test_search_finds_the_right_passage(built):
    for query, title in QUERIES.items():
        hits = built.search(query, k=3)
        assert len(hits) == 3 and hits[0].title == title, (query, hits[0])
        assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)


def test_scores_are_the_shared_score_function(built, embedder):
    """R(d) from the index == the score function of dragon_core.retrieval on the same texts."""
    query = "volcanic eruptions on Sicily"
    hits = built.search(query, k=len(built))
    assert sorted(h.id for h in hits) == list(range(len(built)))  # every passage ranked once
    all_texts = [built.passage(i)[1] for i in range(len(built))]
    brute = r.DEFAULT_SCORE.scores(embedder.embed_query(query), embedder.embed(all_texts))
    np.testing.assert_allclose([h.score for h in hits], brute[[h.id for h in hits]], rtol=0, atol=1e-5)
    assert all(a.score >= b.score for a, b in zip(hits, hits[1:]))
    top = hits[:3]
    np.testing.assert_allclose(embedder.scores(query, [h.text for h in top]), [h.score for h in top], atol=1e-5)


def test_scores_match_the_device_store(built, inputs, embedder, tmp_path):
    """The device's private store and the cloud index give the same R(d) for the same file."""
    store_mod = pytest.importorskip("dragon_edge.store")
    store = store_mod.DocumentStore(tmp_path / "device", embedder)
    try:
        store.add_file(inputs[1])
        query = "which chess opening answers 1. e4"
        device = store.search(query, k=3)
    finally:
        store.close()
    cloud = [h for h in built.search(query, k=len(built)) if h.title == "Sicilian Defence"][:3]
    assert [p.text for p in device] == [h.text for h in cloud]
    np.testing.assert_allclose([p.score for p in device], [h.score for h in cloud], rtol=0, atol=1e-5)


def test_search_many_equals_search(built):
    queries = list(QUERIES)
    batched = built.search_many(queries, k=4)
    for q, hits in zip(queries, batched):
        single = built.search(q, k=4)
        assert [h.id for h in hits] == [h.id for h in single]
        np.testing.assert_allclose([h.score for h in hits], [h.score for h in single], atol=1e-5)
    assert built.search("anything", k=0) == [] and built.search_many([], k=3) == []
    assert len(built.search("lobster", k=10_000)) == len(built)


def test_search_from_many_threads(built):
    """The cloud calls search via asyncio.to_thread: concurrent calls must give the sequential answers."""
    from concurrent.futures import ThreadPoolExecutor

    queries = list(QUERIES) * 2
    want = [[h.id for h in built.search(q, k=3)] for q in queries]
    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(lambda q: [h.id for h in built.search(q, k=3)], queries))
    assert got == want


def test_concurrent_queries_are_searched_in_batches_with_each_callers_answer(built):
    """The cloud's ``QueryBatcher``: 40 queries at once (two values of k) take a few batched
    searches, not 40, and each caller gets exactly what ``search`` alone gives it; a caller that
    gives up does not break the others; the retriever's error reaches every caller of its batch."""
    import asyncio

    from dragon_vllm.query_batcher import QueryBatcher

    queries = [f"{word} {i}" for i, word in enumerate(["Eiffel tower", "Lyon", "silk", "bridge"] * 10)]
    ks = [2 if i % 3 else 5 for i in range(len(queries))]

    async def main():
        batcher = QueryBatcher(built, max_batch=16)
        doomed = asyncio.ensure_future(batcher.search("cancelled on the way", 3))
        tasks = [asyncio.ensure_future(batcher.search(q, k)) for q, k in zip(queries, ks)]
        doomed.cancel()
        got = await asyncio.gather(*tasks)
        assert batcher.queries == len(queries) and batcher.batches < len(queries) // 4
        for q, k, passages in zip(queries, ks, got):  # a batch embeds with padding: scores to 1e-5
            alone = built.search(q, k)
            assert [p.id for p in passages] == [p.id for p in alone]
            np.testing.assert_allclose([p.score for p in passages], [p.score for p in alone], atol=1e-5)

        class Broken:
            def search_many(self, queries, k):
                raise RuntimeError("index gone")

        broken = QueryBatcher(Broken())
        results = await asyncio.gather(*(broken.search(q, 2) for q in queries[:3]), return_exceptions=True)
        assert all(isinstance(e, RuntimeError) and "index gone" in str(e) for e in results)

    asyncio.run(main())


def test_ivf_agrees_with_flat_when_probing_every_list(built, inputs, embedder, tmp_path):
    ivf = c.PublicIndex.build(inputs, tmp_path / "ivf", ivf_threshold=1, embedder=embedder, progress=False)
    info = ivf.manifest["index"]
    n = len(built)
    assert info["type"] == "ivf" and info["nlist"] == c.ivf_nlist(n) > 1 and info["factory"] == f"IVF{info['nlist']},Flat"
    assert info["nprobe"] == ivf.nprobe == c.default_nprobe(info["nlist"])
    exact = c.PublicIndex.load(ivf.path, embedder=embedder, nprobe=info["nlist"])
    assert exact.nprobe == info["nlist"] and built.nprobe is None
    queries = [*QUERIES, "what strikes the strings of a piano"]
    for a, b in zip(built.search_many(queries, k=5), exact.search_many(queries, k=5)):
        assert [h.id for h in a] == [h.id for h in b]
        np.testing.assert_allclose([h.score for h in a], [h.score for h in b], atol=1e-5)
    one = c.PublicIndex.load(ivf.path, embedder=embedder, nprobe=1)
    assert all(len(h) <= 5 for h in one.search_many(queries, k=5))  # approximate: may return fewer


# ------------------------------------------------------------------ validation
def _copy(built, tmp_path) -> Path:
    dst = tmp_path / "copy"
    shutil.copytree(built.path, dst)
    return dst


def _edit_manifest(path: Path, **changes) -> None:
    m = json.loads((path / c.MANIFEST).read_text())
    m.update(changes)
    (path / c.MANIFEST).write_text(json.dumps(m))


def test_load_rejects_missing_or_corrupt_files(built, embedder, tmp_path):
    with pytest.raises(c.CorpusNotFound):
        c.PublicIndex.load(tmp_path / "nowhere", embedder=embedder)
    d = _copy(built, tmp_path)
    (d / c.PASSAGES_FILE).unlink()
    with pytest.raises(c.CorpusCorrupt, match="missing"):
        c.PublicIndex.load(d, embedder=embedder)
    shutil.rmtree(d)

    d = _copy(built, tmp_path)
    blob = (d / c.INDEX_FILE).read_bytes()
    (d / c.INDEX_FILE).write_bytes(blob[: len(blob) // 2])
    with pytest.raises(c.CorpusCorrupt, match="bytes"):
        c.PublicIndex.load(d, embedder=embedder)
    files = json.loads((d / c.MANIFEST).read_text())["files"]
    files[c.INDEX_FILE]["bytes"] = len(blob) // 2  # a manifest that agrees: faiss itself must refuse
    _edit_manifest(d, files=files)
    with pytest.raises(c.CorpusCorrupt, match="faiss"):
        c.PublicIndex.load(d, embedder=embedder)
    shutil.rmtree(d)

    d = _copy(built, tmp_path)
    db = bytearray((d / c.PASSAGES_FILE).read_bytes())
    db[-100] ^= 0xFF  # same size, different content: only the checksum notices
    (d / c.PASSAGES_FILE).write_bytes(bytes(db))
    c.PublicIndex.load(d, embedder=embedder).close()
    with pytest.raises(c.CorpusCorrupt, match="checksum"):
        c.PublicIndex.load(d, embedder=embedder, verify=True)
    (d / c.MANIFEST).write_text("{not json")
    with pytest.raises(c.CorpusCorrupt, match="JSON"):
        c.PublicIndex.load(d, embedder=embedder)
    (d / c.MANIFEST).unlink()
    with pytest.raises(c.CorpusCorrupt, match="manifest.json is missing"):
        c.PublicIndex.load(d, embedder=embedder)


def test_load_rejects_another_retriever(built, embedder, tmp_path):
    d = _copy(built, tmp_path)
    _edit_manifest(d, retriever_fingerprint="retr-" + "0" * 32)
    with pytest.raises(c.CorpusRetrieverMismatch, match="rebuild"):
        c.PublicIndex.load(d, embedder=embedder)
    # The real index, opened by an embedder with another score function (scale 5 vs 10).
    other = emb.Embedder(embedder.model_dir, score=r.ScoreFunction(scale=5.0))
    with pytest.raises(c.CorpusRetrieverMismatch, match="score function"):
        c.PublicIndex.load(built.path, embedder=other)


def test_build_errors_and_overwrite(built, inputs, embedder, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text('{"title": "x"}\n')
    with pytest.raises(c.EmptyCorpus):
        c.PublicIndex.build([empty], tmp_path / "e", embedder=embedder, progress=False)
    with pytest.raises(c.CorpusError, match="already holds an index"):
        c.PublicIndex.build(inputs, built.path, embedder=embedder, progress=False)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "keep.txt").write_text("not an index")
    with pytest.raises(c.CorpusError, match="not a public index"):
        c.PublicIndex.build(inputs, tmp_path / "other", embedder=embedder, progress=False, overwrite=True)
    small = c.PublicIndex.build(inputs[1:2], tmp_path / "small", embedder=embedder, progress=False)
    again = c.PublicIndex.build(inputs[2:], small.path, embedder=embedder, progress=False, overwrite=True, limit=3)
    assert len(again) == 3 and again.manifest["build"]["limit"] == 3
    assert again.passage(0)[0] == "Sourdough"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty.jsonl", "other", "small"]


# ------------------------------------------------------------------ CLI
def _cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "dragon_vllm.corpus_cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=REPO)


def test_cli_help():
    top = _cli("--help")
    assert top.returncode == 0 and "build" in top.stdout and "search" in top.stdout and "wikitext" in top.stdout
    b = _cli("build", "--help")
    assert b.returncode == 0 and "--passage-words" in b.stdout and "--ivf-threshold" in b.stdout and "--limit" in b.stdout
    assert _cli("frobnicate").returncode == 2


def test_cli_build_and_search(inputs, tmp_path):
    out = tmp_path / "cli_idx"
    b = _cli("build", str(out), *map(str, inputs), "--limit", "12", "-q")
    assert b.returncode == 0, b.stderr
    assert "12 passages" in b.stdout and json.loads((out / c.MANIFEST).read_text())["passages"] == 12
    s = _cli("search", str(out), "European lobster claws and size", "chess opening 1. e4 c5", "-k", "2", "--json")
    assert s.returncode == 0, s.stderr
    rows = [json.loads(line) for line in s.stdout.splitlines()]
    assert [row["passages"][0]["title"] for row in rows] == ["Homarus gammarus", "Sicilian Defence"]
    assert all(len(row["passages"]) == 2 for row in rows)
    missing = _cli("search", str(tmp_path / "nope"), "q")
    assert missing.returncode == 2 and "corpus_not_found" in missing.stderr
