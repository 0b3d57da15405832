"""IVF indexes at scale (issue 15): kinds and their metadata, the lookahead cluster cache and
its equality with plain faiss IVF search (ties included), the GPU hook's typed error, the CLIs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

faiss = pytest.importorskip("faiss")
faiss.omp_set_num_threads(1)  # 2 OpenMP threads on a shared 2-core box spin: PQ training ~7x slower

from benchmarks import synthetic_corpus as synth  # noqa: E402
from dragon_vllm import corpus as c  # noqa: E402
from dragon_vllm.corpus.cluster_cache import ClusterCache  # noqa: E402
from dragon_vllm.corpus.gpu_store import GpuClusterStore, gpu_available  # noqa: E402
from dragon_vllm.corpus.ivf import build_faiss_index, check_index_info  # noqa: E402
from dragon_vllm.corpus.lookahead import LookaheadSearcher  # noqa: E402
from dragon_vllm.corpus.merge import replay  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
D = 32


def tied_vectors(n: int = 2400, seed: int = 0) -> np.ndarray:
    """Unit-ish vectors rounded to quarters, a third of them duplicated: many exactly equal scores."""
    x = np.random.default_rng(seed).standard_normal((n, D)).astype(np.float32)
    x = np.concatenate([x, x[: n // 3]])
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return (np.round(x * 4) / 4).astype(np.float32)


def tied_queries(n: int = 120, seed: int = 1) -> np.ndarray:
    return (np.round(np.random.default_rng(seed).standard_normal((n, D)) * 2) / 2).astype(np.float32)


@pytest.fixture(scope="module", params=["ivf-flat", "ivf-pq"])
def ivf_index(request):
    index, info = build_faiss_index(tied_vectors(), c.IndexSpec(kind=request.param, nlist=32, nprobe=6, pq_m=8,
                                                                    pq_nbits=4))  # 4 bits: seconds to train
    return index, info


# ------------------------------------------------------------------ kinds and metadata
def test_ivf_build_and_faiss_round_trip(ivf_index, tmp_path):
    index, info = ivf_index
    assert info["nlist"] == 32 and info["nprobe"] == 6 and info["kind"] in ("ivf-flat", "ivf-pq")
    assert info["factory"] == ("IVF32,Flat" if info["kind"] == "ivf-flat" else f"IVF32,PQ8x{info['pq_nbits']}")
    # the lists are faiss's flat host-memory layout, which the cluster store copies from
    assert isinstance(faiss.downcast_InvertedLists(faiss.extract_index_ivf(index).invlists), faiss.ArrayInvertedLists)
    faiss.write_index(index, str(tmp_path / "i.faiss"))
    back = faiss.read_index(str(tmp_path / "i.faiss"))
    assert faiss.extract_index_ivf(back).nprobe == 6
    q = tied_queries(20)
    assert (back.search(q, 10)[1] == index.search(q, 10)[1]).all()


def test_spec_and_manifest_errors_are_typed():
    with pytest.raises(c.CorpusInputError, match="unknown index kind"):
        c.IndexSpec(kind="hnsw")
    with pytest.raises(c.CorpusInputError, match="--pq-nbits"):
        c.IndexSpec(kind="ivf-pq", pq_nbits=7)
    with pytest.raises(c.CorpusInputError, match="--nlist"):
        c.IndexSpec(kind="ivf-flat", nlist=0)
    with pytest.raises(c.CorpusInputError, match="divide"):
        build_faiss_index(tied_vectors(300), c.IndexSpec(kind="ivf-pq", nlist=4, pq_m=5))
    assert check_index_info({"type": "ivf", "nlist": 4, "nprobe": 2}, "x")["kind"] == "ivf-flat"  # old manifests
    assert check_index_info({"type": "flat"}, "x")["kind"] == "flat"
    for bad in ({"type": "hnsw"}, {"type": "ivf", "kind": "ivf-sq", "nlist": 4, "nprobe": 2},
                {"type": "flat", "kind": "ivf-pq"}, {"type": "ivf", "kind": "ivf-pq", "nlist": 4, "nprobe": 0},
                {"type": "ivf", "nlist": "4", "nprobe": 2}, None):
        with pytest.raises(c.CorpusCorrupt):
            check_index_info(bad, "x")


def test_auto_kind_keeps_the_historical_default():
    assert c.IndexSpec().resolve(10) == "flat" and c.IndexSpec().resolve(50_000) == "ivf-flat"
    assert c.IndexSpec(kind="flat").resolve(10**7) == "flat"
    assert c.IndexSpec(kind="ivf-pq").resolve(10) == "ivf-pq"


# ------------------------------------------------------------------ lookahead == plain IVF
@pytest.mark.parametrize("budget", [0, 20_000, None, 10**9], ids=["no-cache", "tight", "15pct", "all"])
def test_lookahead_equals_plain_ivf_id_for_id(ivf_index, budget):
    index, _ = ivf_index
    q = tied_queries()
    want_d, want_i = index.search(q, 10)
    s = LookaheadSearcher(index, budget_bytes=budget)
    try:
        for batch in (q, q[:1], q[7:40]):  # repeats: warm caches, evictions, single queries
            got_d, got_i = s.search_now(batch, 10)
            ref_d, ref_i = index.search(batch, 10)
            assert (got_i == ref_i).all() and (got_d == ref_d).all()
        got_d, got_i = s.search_now(q, 10)
        assert (got_i == want_i).all() and (got_d == want_d).all()
        assert (np.diff(got_d, axis=1) == 0).any(axis=1).mean() > 0.3  # the data really is tie-heavy
        wider = index.search(q, 11)[0]
        assert (wider[:, 9] == wider[:, 10]).any()  # ... at the k-th score too
        if budget in (20_000, None):  # lists split between cache and host: the exact replay ran
            assert s.stats.tie_rows > 0
    finally:
        s.close()


def test_lookahead_nprobe_other_than_the_index_default(ivf_index):
    index, _ = ivf_index
    ivf = faiss.extract_index_ivf(index)
    q = tied_queries(40)
    s = LookaheadSearcher(index, budget_bytes=10**9, nprobe=11)
    got = s.search_now(q, 10)[1]
    s.close()
    ivf.nprobe = 11
    try:
        assert (got == index.search(q, 10)[1]).all()
    finally:
        ivf.nprobe = 6


def test_lookahead_pads_like_faiss_when_the_probed_lists_are_short():
    x = tied_vectors(400)
    index, _ = build_faiss_index(x, c.IndexSpec(kind="ivf-flat", nlist=50, nprobe=1))
    q = tied_queries(30)
    ref_d, ref_i = index.search(q, 40)
    assert (ref_i == -1).any()  # one list of ~10 vectors cannot fill 40 results
    s = LookaheadSearcher(index, budget_bytes=10**9)
    got_d, got_i = s.search_now(q, 40)
    s.close()
    assert (got_i == ref_i).all() and (got_d[ref_i >= 0] == ref_d[ref_i >= 0]).all()


def test_open_then_search_overlaps_the_copy(ivf_index):
    index, _ = ivf_index
    s = LookaheadSearcher(index, budget_bytes=10**9)
    la = s.open(tied_queries(4))
    la.copied.result(timeout=10)  # the copy runs in the background after open()
    assert s.cache.snapshot()["resident_clusters"] > 0 and s.cache.pins.sum() > 0
    assert (s.search(la, 5)[1] == index.search(tied_queries(4), 5)[1]).all()
    assert s.cache.pins.sum() == 0  # search releases the request's pins
    snap = s.snapshot()
    assert snap["retrieval_searches"] == 1 and snap["retrieval_queries"] == 4 and snap["hit_rate"] == 1.0
    s.close()


# ------------------------------------------------------------------ the merge rule
def test_replay_follows_faiss_heap_rules():
    # equal scores at the boundary: the first scanned is in (admission needs a strictly better score)
    s, i = replay(np.array([1, 1, 1], np.float32), np.array([5, 9, 2]), np.array([0, 1, 2]), 2)
    assert i.tolist() == [9, 5]  # ...and equal scores come out by id descending
    # an eviction among equal worst scores drops the smaller id
    s, i = replay(np.array([1, 1, 2], np.float32), np.array([5, 9, 3]), np.array([0, 1, 2]), 2)
    assert i.tolist() == [3, 9]
    s, i = replay(np.array([0.5], np.float32), np.array([4]), np.array([0]), 3)
    assert i.tolist() == [4, -1, -1] and s[1] == -np.inf


# ------------------------------------------------------------------ the cache
def test_cache_hit_miss_and_budget():
    cache = ClusterCache(np.full(8, 100), budget_bytes=300, decay=0.5)
    copy, drop = cache.plan(np.array([[0, 1, 2, 3]]))
    assert copy == [0, 1, 2] and drop == [] and cache.stats.rejected == 1  # nearest first, budget of 3
    mask = cache.split(np.array([[0, 1, 2, 3]]))
    assert mask.tolist() == [[True, True, True, False]] and (cache.stats.hits, cache.stats.misses) == (3, 1)
    cache.release(np.array([[0, 1, 2, 3]]))
    assert cache.stats.hit_rate() == 0.75 and cache.used_bytes == 300


def test_cache_decay_evicts_the_coldest_only_for_a_hotter_newcomer():
    cache = ClusterCache(np.full(6, 100), budget_bytes=200, decay=0.5)
    for probes in ([0, 1], [0, 1], [0]):  # 0 stays hottest, 1 cools
        cache.release(np.array(probes)) if cache.plan(np.array(probes)) else None
    assert cache.hotness[0] > cache.hotness[1] > 0
    copy, drop = cache.plan(np.array([2]))  # a one-off: not hotter than 1 (1.25 -> 0.625 vs 1): evicts 1
    cache.release(np.array([2]))
    assert (copy, drop) == ([2], [1]) and cache.resident[[0, 2]].all()
    cache2 = ClusterCache(np.full(4, 100), budget_bytes=100, decay=1.0)  # no decay: 0 has 3 probes
    for _ in range(3):
        cache2.plan(np.array([0]))
        cache2.release(np.array([0]))
    assert cache2.plan(np.array([1])) == ([], []) and cache2.stats.rejected == 1  # colder newcomer rejected


def test_cache_never_evicts_pinned_clusters():
    cache = ClusterCache(np.full(4, 100), budget_bytes=100, decay=0.5)
    cache.plan(np.array([0]))  # request A in flight, cluster 0 pinned
    for _ in range(3):
        copy, drop = cache.plan(np.array([1]))  # B is hotter each time but 0 is pinned
        cache.release(np.array([1]))
        assert 0 not in drop
    assert cache.resident[0]
    with pytest.raises(ValueError):
        ClusterCache(np.full(2, 1), 10, decay=0.0)


# ------------------------------------------------------------------ the GPU store (torch; its CPU device here)
def test_gpu_store_raises_typed_errors(ivf_index):
    index, info = ivf_index
    if info["kind"] == "ivf-pq":
        with pytest.raises(c.GpuUnavailable, match="IVF-Flat"):
            GpuClusterStore(index, budget_bytes=1 << 20, device="cpu")
    if gpu_available() is not None:  # no CUDA here: the default device is refused, typed
        with pytest.raises(c.GpuUnavailable, match="GPU cluster store unavailable"):
            GpuClusterStore(index, budget_bytes=1 << 20)
    assert issubclass(c.GpuUnavailable, c.CorpusError)


@pytest.mark.parametrize("kind", ["ivf-flat", "ivf-pq"])
def test_torch_build_fills_every_vector_into_its_nearest_list(kind):
    """The torch build (the GPU machine's, here on torch's CPU device): every id once, each in a
    list whose centroid is its nearest (up to float32 rounding), and a working index."""
    x = synth.draw(np.random.default_rng(3), *synth.centres(16, D, 0), 3000, 1.0)[0]
    index, info = build_faiss_index(x, c.IndexSpec(kind=kind, nlist=16, nprobe=4, pq_m=8, pq_nbits=4), device="cpu")
    ivf = faiss.extract_index_ivf(index)
    assert info["build_device"] == "cpu" and index.ntotal == len(x) and ivf.quantizer.ntotal == 16
    where = np.empty(len(x), dtype=np.int64)
    for lst in range(16):
        ids = faiss.rev_swig_ptr(ivf.invlists.get_ids(lst), ivf.invlists.list_size(lst)).copy()
        where[ids] = lst
        assert len(ids) < len(x) // 2  # really clustered, not one list
    assert sorted(np.bincount(where, minlength=16).tolist()) == sorted(
        ivf.invlists.list_size(i) for i in range(16)) and sum(np.bincount(where)) == len(x)
    cents = ivf.quantizer.reconstruct_n(0, 16)
    scores = x @ cents.T
    assert (scores[np.arange(len(x)), where] >= scores.max(1) - 1e-5).all()
    found = index.search(x[:50], 1)[1][:, 0]
    if kind == "ivf-flat":
        assert (found == np.arange(50)).all()  # each vector finds itself


@pytest.fixture(scope="module")
def flat_ivf():
    return build_faiss_index(tied_vectors(), c.IndexSpec(kind="ivf-flat", nlist=32, nprobe=6))[0]


@pytest.mark.parametrize("budget", [20_000, None, 10**9], ids=["tight", "15pct", "all"])
def test_gpu_store_lookahead_equals_plain_ivf_id_for_id_and_score_for_score(flat_ivf, budget):
    """The torch store selects on its own float32 scores and re-scores with faiss's kernel: the
    result is faiss's, ties at the k-th included, whether the lists are all resident or split."""
    q = tied_queries()
    store = GpuClusterStore(flat_ivf, budget_bytes=10**9 if budget is None else budget, device="cpu")
    s = LookaheadSearcher(flat_ivf, budget_bytes=budget, store=store)
    try:
        for batch in (q, q[:1], q[7:40], q):
            got_d, got_i = s.search_now(batch, 10)
            ref_d, ref_i = flat_ivf.search(batch, 10)
            assert (got_i == ref_i).all() and (got_d == ref_d).all()
        assert s.cache.snapshot()["hits"] > 0
        if budget == 10**9:  # everything resident: the store alone answered, no replay across parts
            assert s.cache.snapshot()["misses"] == 0
    finally:
        s.close()


def test_gpu_store_scan_keeps_every_candidate_at_or_above_the_kth(flat_ivf):
    """``scan``'s contract, checked against faiss's own widened scan of the same lists."""
    from dragon_vllm.corpus.cluster_store import HostLists

    store = GpuClusterStore(flat_ivf, budget_bytes=10**9, device="cpu")
    ivf = faiss.extract_index_ivf(flat_ivf)
    store.copy_in(list(range(ivf.nlist)))
    q = tied_queries(60)
    coarse, probes = ivf.quantizer.search(q, 6)
    probes[::3, 2] = -1  # skipped lists stay skipped
    for k in (1, 10, 40):
        got, wide = store.scan(q, probes, coarse, k), HostLists(flat_ivf).scan(q, probes, coarse, 4000)
        for (gs, gl), (ws, wl) in zip(got, wide):  # faiss's whole scan of the same lists, cut at the k-th
            kth = np.sort(ws)[::-1][min(k, len(ws)) - 1]
            want = sorted((label, score) for label, score in zip(wl.tolist(), ws.tolist()) if score >= kth)
            assert sorted(zip(gl.tolist(), gs.tolist())) == want


def test_gpu_store_pages_are_reused_and_drops_hide_lists(flat_ivf):
    from dragon_vllm.corpus import gpu_store as g

    ivf = faiss.extract_index_ivf(flat_ivf)
    sizes = [ivf.invlists.list_size(i) for i in range(ivf.nlist)]
    page_bytes = g.PAGE_ROWS * (ivf.d * 4 + g.ROW_TABLE_BYTES)
    store = GpuClusterStore(flat_ivf, budget_bytes=2 * -(-max(sizes) // g.PAGE_ROWS) * page_bytes + page_bytes - 1,
                            device="cpu")
    assert store.capacity_bytes == 2 * -(-max(sizes) // g.PAGE_ROWS) * page_bytes  # the carve never exceeds the budget
    assert (store.list_cost_bytes() == [-(-n // g.PAGE_ROWS) * page_bytes for n in sizes]).all()
    free0 = len(store._free)
    q = tied_queries(8)
    coarse, probes = ivf.quantizer.search(q, 1)
    for round_ in range(3):  # in and out, again and again: no page leaks, no stale rows
        lists = sorted({int(p) for p in probes[:, 0]})[:2]
        store.copy_in(lists)
        assert store.resident() == set(lists)
        assert store.used_bytes() == sum(store.list_cost_bytes()[c] for c in lists)
        store.drop(lists)
        assert store.resident() == set() and len(store._free) == free0
        assert all(len(scores) == 0 for scores, _ in store.scan(q, probes, coarse, 5))  # dropped: not scanned
    with pytest.raises(RuntimeError, match="store full"):  # more than the carve: refused, typed, nothing moved
        store.copy_in(list(range(ivf.nlist)))
    assert store.resident() == set() and len(store._free) == free0


# ------------------------------------------------------------------ synthetic corpus
def test_synthetic_corpus_streams_labelled_unit_vectors(tmp_path):
    meta = synth.generate(tmp_path, 1000, dim=16, clusters=8, queries=10, chunk=300)
    vecs, xq, back = synth.load(tmp_path)
    assert meta == back and meta["synthetic"] and "SYNTHETIC" in meta["label"]
    assert vecs.shape == (1000, 16) and xq.shape == (10, 16)
    assert np.allclose(np.linalg.norm(vecs, axis=1), 1, atol=1e-5)
    assert set(np.load(tmp_path / "clusters.npy")) <= set(range(8))
    import gzip

    with gzip.open(tmp_path / "passages.jsonl.gz", "rt") as f:
        lines = [json.loads(line) for line in f]
    assert len(lines) == 1000 and all("SYNTHETIC" in r["text"] and "SYNTHETIC" in r["title"] for r in lines)
    par = synth.generate(tmp_path / "par", 1000, dim=16, clusters=8, queries=10, chunk=300, passages=False, workers=2)
    assert np.array_equal(synth.load(tmp_path / "par")[0], vecs) and par["n"] == 1000  # the same bytes in parallel


# ------------------------------------------------------------------ CLIs
@pytest.mark.parametrize("argv,flags", [
    (["-m", "dragon_vllm.corpus_cli", "build", "--help"], ["--kind", "ivf-pq", "--nlist", "--nprobe", "--pq-m"]),
    (["-m", "dragon_vllm.corpus_cli", "search", "--help"], ["--lookahead"]),
    (["-c", "import sys; from dragon_vllm.cli import main; sys.argv = ['dragon-cloud', 'index', 'build', '--help']; main()"],
     ["--kind", "--nlist"]),  # through dragon-cloud: the corpus CLI's help, not typer's
    (["-m", "benchmarks.synthetic_corpus", "--help"], ["--n", "--clusters", "--chunk", "SYNTHETIC"]),
    (["-m", "benchmarks.bench_retrieval", "--help"], ["--nprobe", "--rtt-ms", "--store", "--gpu-whole-index"]),
])
def test_cli_help(argv, flags):
    r = subprocess.run([sys.executable, *argv], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert all(f in r.stdout for f in flags)


# ------------------------------------------------------------------ PublicIndex (real text, the embedder)
@pytest.fixture(scope="module")
def text_inputs(tmp_path_factory):
    from tests.io.test_corpus import write_inputs

    return write_inputs(tmp_path_factory.mktemp("inputs"))


@pytest.fixture(scope="module")
def embedder():
    from dragon_host import embedder as emb

    return emb.default_embedder()


@pytest.mark.parametrize("kind", ["ivf-flat", "ivf-pq"])
def test_public_index_ivf_round_trip_and_lookahead(kind, text_inputs, embedder, tmp_path):
    from tests.io.test_corpus import QUERIES

    built = c.PublicIndex.build(text_inputs, tmp_path / kind, kind=kind, nlist=4, nprobe=2, pq_m=8,
                                embedder=embedder, progress=False)
    info = built.manifest["index"]
    assert (info["kind"], info["nlist"], info["nprobe"]) == (kind, 4, 2) and built.kind == kind
    assert json.loads((built.path / c.MANIFEST).read_text())["index"]["kind"] == kind  # stored in the folder
    plain = c.PublicIndex.load(built.path, embedder=embedder)
    assert plain.nprobe == 2 and not any(k.startswith("cache_") for k in plain.retrieval_stats())
    cached = c.PublicIndex.load(built.path, embedder=embedder, lookahead=True, budget_bytes=1 << 20)
    queries = list(QUERIES)
    a, b = plain.search_many(queries, 4), cached.search_many(queries, 4)
    assert [[(p.id, p.score) for p in hits] for hits in a] == [[(p.id, p.score) for p in hits] for hits in b]
    stats = cached.retrieval_stats()
    assert stats["retrieval_queries"] == len(queries) == plain.retrieval_stats()["retrieval_queries"]
    assert stats["retrieval_searches"] == 1 and stats["retrieval_seconds"] > 0
    assert stats["cache_hits"] + stats["cache_misses"] == 2 * len(queries) and 0 <= stats["cache_hit_rate"] <= 1
    assert c.PublicIndex.load(built.path, embedder=embedder, nprobe=4).nprobe == 4  # override
    for x in (built, plain, cached):
        x.close()


def test_public_index_bad_kind_in_manifest_is_corrupt(text_inputs, embedder, tmp_path):
    built = c.PublicIndex.build(text_inputs, tmp_path / "f", kind="flat", embedder=embedder, progress=False)
    assert built.kind == "flat" and built.nprobe is None
    with pytest.raises(c.CorpusError, match="needs an IVF index"):
        c.PublicIndex.load(built.path, embedder=embedder, lookahead=True)
    m = json.loads((built.path / c.MANIFEST).read_text())
    m["index"]["kind"] = "ivf-sq"
    (built.path / c.MANIFEST).write_text(json.dumps(m))
    with pytest.raises(c.CorpusCorrupt, match="unknown index kind"):
        c.PublicIndex.load(built.path, embedder=embedder)


def test_retrieval_counters_are_exported_in_metrics():
    from prometheus_client import generate_latest

    from dragon_vllm.metrics import CloudMetrics

    stats = {"retrieval_searches": 3, "retrieval_queries": 5, "retrieval_seconds": 0.5, "cache_hits": 7,
             "cache_misses": 1, "cache_hit_rate": 0.875, "cache_used_bytes": 10, "cache_budget_bytes": 100}
    text = generate_latest(CloudMetrics(None, lambda: stats).registry).decode()
    for line in ("dragon_retrieval_seconds_total 0.5", "dragon_retrieval_queries_total 5.0",
                 "dragon_retrieval_cache_hits_total 7.0", "dragon_retrieval_cache_misses_total 1.0",
                 "dragon_retrieval_cache_hit_rate 0.875"):
        assert line in text
    assert "dragon_retrieval" not in generate_latest(CloudMetrics(None, lambda: {}).registry).decode()


@pytest.mark.parametrize("argv,message", [
    (["--lookahead", "tpu", "--index", "."], "off, cpu or gpu"),
    (["--lookahead", "gpu"], "needs a public index"),
    (["--lookahead", "cpu", "--index", ".", "--lookahead-fraction", "1.5"], "lookahead-fraction"),
])
def test_serve_refuses_a_bad_lookahead_before_loading_anything(argv, message):
    from typer.testing import CliRunner

    from dragon_vllm.cli import app

    result = CliRunner().invoke(app, ["serve", "--port", "0", *argv])
    assert result.exit_code == 2 and message in result.output.replace("\n", " "), result.output


@pytest.mark.parametrize("kind", ["flat", "ivf-flat"])
def test_ralmspec_cache_scores_bitwise_as_the_index_and_is_right_only_when_it_holds_the_top_k(
        kind, text_inputs, embedder, tmp_path):
    """The cloud's speculative retrieval (dragon_vllm.public_documents): the cached passages'
    scores are the index's own, so a cache holding the real top-k speculates them exactly
    (``Documents.same``), and one missing them speculates something else (the check catches it)."""
    import asyncio

    from tests.io.test_corpus import QUERIES as Q
    QUERIES = list(Q)
    from dragon_core import messages as m
    from dragon_vllm.public_documents import PublicDocuments

    index = c.PublicIndex.build(text_inputs, tmp_path / kind, kind=kind, nlist=4, nprobe=4,
                                embedder=embedder, progress=False)

    class Backend:
        class tokenizer:
            @staticmethod
            def decode(ids, skip_special_tokens=True):
                return " ".join(QUERIES[i % len(QUERIES)] for i in ids)

    Backend.index = index
    hits = misses = 0
    for cache_size in (len(index), 3):  # everything cached; only each retrieval's top 3
        docs = PublicDocuments(Backend(), m.Open(1, QUERIES[0], 2, 8, 0, retrieve_every=2), cache_size=cache_size)

        async def go():
            nonlocal hits, misses
            await docs.retrieve(())  # the first retrieval fills the cache
            for i in range(1, len(QUERIES)):
                spec = await docs.speculate((i,))
                real = await docs.retrieve((i,))
                assert real.ids == tuple(p.id for p in index.search(
                    f"{QUERIES[0]} {QUERIES[i % len(QUERIES)]}", 2))  # the real path is plain search
                if cache_size == len(index):
                    assert spec.same(real), (spec, real)  # bitwise the index's scores
                    hits += 1
                else:
                    misses += not spec.same(real)

        asyncio.run(go())
    assert hits >= 3 and misses >= 1, (hits, misses)
