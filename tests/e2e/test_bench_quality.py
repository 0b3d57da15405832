"""The quality benchmarks' ``--quick`` runs (issue 13): real engines on a handful of windows and
questions, to keep the scripts working. Not timed, and the numbers are not checked, only that
every mode produced them. The QA run uses the shared cloud (its demo index, not the benchmark's
cloud half: the questions whose gold passage would be in the cloud cannot be answered there)."""

from __future__ import annotations

import math

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
    bench_quality_lm.plot(result, tmp_path / "lm.png")


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
