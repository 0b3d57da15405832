"""The CONCORD bytes benchmark (benchmarks/bench_concord_sim.py) on a tiny grid: its columns add
up, the frames it counts are the link's, and its rows order as the protocols do."""

from __future__ import annotations

import math

import pytest

from benchmarks import bench_concord_sim as bench


@pytest.fixture(scope="module")
def table():
    return bench.run([12], [100.0], runs=2, dev_ms=28.0, cloud_ms=8.0, disagreement=0.7, query_chars=48)["table"]


def test_the_columns_add_up(table):
    row = table["12 tokens, RTT 100"]
    for name, r in row.items():
        assert r["tokens_per_answer"] == 12
        assert math.isclose(sum(r["by_frame"].values()), r["per_step_bytes_per_token"], abs_tol=0.02 * len(r["by_frame"]))
        assert math.isclose(r["up_per_token"] + r["down_per_token"], r["per_step_bytes_per_token"])
        assert math.isclose(r["all_in_bytes_per_token"],
                            r["per_step_bytes_per_token"] + r["open_opened_per_answer"] / r["tokens_per_answer"])
        assert not any(k.endswith(("Ping", "Pong")) for k in r["by_frame"]), name


def test_the_rows_are_the_protocols(table):
    row = table["12 tokens, RTT 100"]
    concord, exact, top32, full = (row[k] for k in ("concord", "concord-exact", "dragon-top32", "dragon-full"))
    assert set(concord["by_frame"]) <= {"up Tokens", "up EvidenceRequest", "down Evidence", "down EvidenceRun"}
    assert {"down Draft", "up Target"} <= set(top32["by_frame"])
    assert exact["steps"]["local"] == 0 and exact["steps"]["certified"] + exact["steps"]["dense"] == pytest.approx(1.0)
    # a full vector is 4 bytes per id of a 49,152-id vocabulary; top-32 a few hundred bytes; CONCORD tens
    assert full["per_step_bytes_per_token"] > 4 * bench.VOCAB
    assert concord["per_step_bytes_per_token"] < top32["per_step_bytes_per_token"] / 5
    assert concord["bytes_vs_top32"] == pytest.approx(concord["all_in_bytes_per_token"] / top32["all_in_bytes_per_token"])
