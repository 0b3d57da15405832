"""The quality benchmarks' ``--quick`` runs (issue 13): real engines on a handful of windows and
questions, to keep the scripts working. Not timed, and the numbers are not checked, only that
every mode produced them. The QA run uses the shared cloud (its demo index, not the benchmark's
cloud half: the questions whose gold passage would be in the cloud cannot be answered there)."""

from __future__ import annotations

import math

import numpy as np

import pytest
from e2e_world import TOKEN, run

from benchmarks import bench_quality_lm, bench_quality_qa
from benchmarks.shared_data import data_dir

pytestmark = [pytest.mark.slow, pytest.mark.llamacpp]

try:  # the evaluation data is never committed: a machine without it cannot run these
    data_dir()
except FileNotFoundError as missing:
    pytest.skip(str(missing), allow_module_level=True)


def test_lm_quick_scores_every_mode(e2e_loop, runtime, tmp_path):
    args = bench_quality_lm.parse(["--quick", "--quiet", "--out", str(tmp_path / "lm.json")])
    result = run(e2e_loop, bench_quality_lm.run(args, tokenizer=runtime.tokenizer))
    assert [r["documents"] for r in result["table"]] == [2, 4]
    for row in result["table"]:
        assert all(math.isfinite(row[m]) and row[m] > 1 for m in ("device", "cloud", "dragon", "concat"))
    assert result["setup"]["windows"] == 1 and result["environment"]["cpu_count"] >= 1
    # CONCORD: without waiting, the debt never stops consulting: dense DRAGON's perplexity exactly;
    # at 10.7 local steps per wait it commits some steps locally (the device's own distribution)
    concord = {r["wait_steps"]: r for r in result["concord"]}
    assert concord[0.0]["consulted"] == 1.0 and concord[0.0]["over_dragon"] == 1.0
    assert 0.0 < concord[10.7]["consulted"] < 1.0
    bench_quality_lm.plot(result, tmp_path / "lm.png")


def test_concord_row_scores_consulted_steps_under_dragon_and_the_rest_under_the_device():
    """The debt as the device runs it: waiting 5 local steps per consulted step with a debt bound
    of 4 consults, stops, then consults again once the evidence keeps changing tokens."""
    n = 40
    ws = bench_quality_lm.WindowScores(
        logp={"device/0": np.full(n, -1.0), "cloud/0": np.full(n, -9.0)}, retrieved={
            "device": ([0], [0.0]), "cloud": ([1], [0.0])}, concat_tokens={}, concat_docs_kept={},
        argmax={"device/1": np.zeros(n, dtype=np.int64), "dragon/2": np.arange(n) % 2})  # every other step changed
    lp, consulted = bench_quality_lm.concord_logp(ws, 1, wait_steps=5.0, d_max=4.0)
    sides, dragon = bench_quality_lm.sides_and_dragon(ws, 1)
    device = sides["device"]
    assert np.array_equal(lp, np.where(consulted, dragon, device)) and not np.array_equal(device, dragon)
    assert consulted[0] and 0 < consulted.mean() < 1  # first step consults; the debt stops some later
    assert bench_quality_lm.concord_logp(ws, 1, wait_steps=0.0, d_max=4.0)[1].all()  # free waits: always
    assert not bench_quality_lm.concord_logp(ws, 1, wait_steps=0.0, d_max=-np.inf)[1].any()  # device-only


def test_qa_quick_answers_in_every_mode(e2e_loop, runtime, world, cloud, tmp_path):
    args = bench_quality_qa.parse(["--quick", "--quiet", "--cloud-url", cloud.url, "--cloud-index",
                                   str(world[0] / "index"), "--token", TOKEN, "--out", str(tmp_path / "qa.json")])
    result = run(e2e_loop, bench_quality_qa.run(args, base_runtime=runtime))
    answers = result["answers"]
    assert len(answers) == 2 and set(answers[0]) >= {*bench_quality_qa.PAPER_MODES, "line", "gold_side"}
    for a in answers:
        for mode in bench_quality_qa.PAPER_MODES:
            if mode in a:
                assert a[mode]["tokens"] > 0 and not a[mode]["degraded"], (mode, a[mode])
    assert set(result["scores"]) == set(bench_quality_qa.PAPER_MODES)  # the default: issue 13's table
    assert result["vdrag_equals_dragon"]["n"] == 1
    bench_quality_qa.plot(result, tmp_path / "qa.png")
