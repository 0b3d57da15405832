"""bench_latency_rtt's ``--quick`` run (issue 13): a real device process (llama.cpp) reaching the
shared test cloud through a real netem proxy, every mode once per question. Not timed: it keeps
the script working and checks what each answer must record, not how fast it was."""

from __future__ import annotations

import json

import pytest

from benchmarks import bench_latency_rtt as bench
from benchmarks.shared_data import data_dir

pytestmark = [pytest.mark.slow, pytest.mark.llamacpp]

try:  # the evaluation data is never committed: a machine without it cannot run this
    data_dir()
except FileNotFoundError as missing:
    pytest.skip(str(missing), allow_module_level=True)


def test_quick_run_answers_in_every_mode_and_records_the_link(cloud, tmp_path):
    out = tmp_path / "latency.json"
    result = bench.main(["--quick", "--conditions", "rtt100", "--cloud-url", cloud.url, "--out", str(out)])
    rows = result["answers"]
    assert {r["mode"] for r in rows} == set(bench.MODES) and len(rows) == len(bench.MODES)
    for r in rows:
        assert r["tokens"] >= 1 and len(r["gaps_ms"]) == r["tokens"] - 1 and r["ttft_ms"] > 0, r
        assert not r["degraded"] and r["cloud_error"] is None, r
        on_wire = r["mode"] != "device"
        assert (r["bytes_up_per_token"] > 0) == on_wire and (r["bytes_down_per_token"] > 0) == on_wire, r
    # the proxy's 100 ms round trip shows where it must: VDRAG waits for the cloud at every token
    vdrag = result["table"]["rtt100"]["vdrag"]
    assert vdrag["per_token_p50_ms"] >= 100 * 0.9, vdrag
    assert set(result["ratios"]["rtt100"]) >= {"per_token_vs_device", "ttft_vs_device", "per_token_vs_vdrag"}
    assert out.with_suffix(".png").stat().st_size > 0
    merged = bench.merge([out, out])  # two calls' answers pool into one table
    assert merged["table"]["rtt100"]["dragon"]["answers"] == 2 * result["table"]["rtt100"]["dragon"]["answers"]
    assert json.loads(out.read_text())["setup"]["questions"] == 1
