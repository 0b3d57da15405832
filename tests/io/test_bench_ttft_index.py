"""The machine-independent parts of ``benchmarks/bench_ttft_index.py`` and its padded index
(``benchmarks/synthetic_index.py``): the folder loads as a public index (lookahead too), its
real passages come back under their shifted ids, a second build is a reuse; the summary's
passage comparison and ratios."""

from __future__ import annotations

import argparse
import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

faiss = pytest.importorskip("faiss")
faiss.omp_set_num_threads(1)

from benchmarks import bench_ttft_index as b  # noqa: E402
from benchmarks.synthetic_index import PLACEHOLDER_TITLE, ensure_padded_index  # noqa: E402


def test_configs_parse_and_refuse_what_cannot_run():
    assert b.Config.parse("small") == b.Config("small", "small", "off")
    assert b.Config.parse("big:gpu") == b.Config("big:gpu", "big", "gpu")
    assert b.Config.parse("big") == b.Config("big", "big", "off")
    for bad in ("small:gpu", "big:tpu", "huge"):
        with pytest.raises(argparse.ArgumentTypeError):
            b.Config.parse(bad)
    args = b.parse(["--quick"])
    assert (args.big, args.lookahead, [c.name for c in args.configs]) == (200_000, "cpu", ["small", "big:cpu"])


def test_summary_compares_passages_under_the_big_index_ids_and_gives_ratios():
    rows = [dict(config="small", question=0, repeat=0, ttft_ms=100.0, degraded=False, cloud_sources=["a#1", "b#2"]),
            dict(config="big:gpu", question=0, repeat=0, ttft_ms=108.0, degraded=False,
                 cloud_sources=["a#1001", "b#1002"]),
            dict(config="small", question=1, repeat=0, ttft_ms=200.0, degraded=False, cloud_sources=["c#3", "d#4"]),
            dict(config="big:gpu", question=1, repeat=0, ttft_ms=250.0, degraded=False,
                 cloud_sources=["c#1003", "SYNTHETIC#17"])]
    table = b.summarize(rows, {"big:gpu": {"ms_per_search": 3.0}}, {"big:gpu": 1000})
    assert table["small"]["same_cloud_passages_as_small"] == 1.0
    assert table["big:gpu"]["same_cloud_passages_as_small"] == 0.5  # the synthetic row in question 1
    assert table["big:gpu"]["retrieval"] == {"ms_per_search": 3.0}
    r = b.ratios(rows, table)["big:gpu"]
    assert r["paired_median_ratio"] == pytest.approx((1.08 + 1.25) / 2) and r["goal"] == b.GOAL_RATIO
    assert r["met"] == (r["p50_ratio"] <= 1.10)
    assert b.retrieval_delta({"dragon_retrieval_searches_total": 1, "dragon_retrieval_seconds_total": 0.5},
                             {"dragon_retrieval_searches_total": 3, "dragon_retrieval_seconds_total": 0.7})[
        "ms_per_search"] == pytest.approx(100.0)


def test_padded_index_loads_serves_its_real_passages_and_is_reused(tmp_path):
    from benchmarks import synthetic_corpus as synth
    from dragon_vllm import corpus as c
    from tests.io.test_corpus import QUERIES, write_inputs

    real = c.PublicIndex.build(write_inputs(tmp_path / "inputs"), tmp_path / "real", progress=False)
    synth.generate(tmp_path / "synth", 3000, clusters=16, passages=False, queries=4)
    n = 3000
    manifest = ensure_padded_index(real.path, tmp_path / "synth", tmp_path / "big", n=n, nlist=8, nprobe=8)
    assert manifest["passages"] == n + len(real) and manifest["index"]["kind"] == "ivf-flat"
    big = c.PublicIndex.load(tmp_path / "big", embedder=real.embedder, lookahead=True)
    assert len(big) == n + len(real) and big.passage(0)[0] == PLACEHOLDER_TITLE
    assert len(big.passage(1)[1].split()) == 64  # a placeholder is as long as a passage
    for q in QUERIES:  # every list probed: the real passages win, under ids shifted by n
        want = [(p.id + n, p.text) for p in real.search(q, 2)]
        assert [(p.id, p.text) for p in big.search(q, 2)] == want
    stamp = (tmp_path / "big" / "index.faiss").stat().st_mtime_ns
    assert ensure_padded_index(real.path, tmp_path / "synth", tmp_path / "big", n=n, nlist=8, nprobe=8) == manifest
    assert (tmp_path / "big" / "index.faiss").stat().st_mtime_ns == stamp  # reused, not rebuilt
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "keep.txt").write_text("not a corpus")
    with pytest.raises(FileExistsError):
        ensure_padded_index(real.path, tmp_path / "other", tmp_path / "big2", n=100, nlist=4, nprobe=4)
    for x in (real, big):
        x.close()
