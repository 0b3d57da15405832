"""DRAGON_PROFILE: the event-loop profile is written when the block ends, and the summary finds
the function that took the time in the right package; without the variable nothing is written."""

from __future__ import annotations

import json
import time

from benchmarks import profile_summary
from dragon_vllm.profiling import ENV, profiled_if_asked


def _busy_in_json(seconds: float) -> None:
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        json.dumps({"k": list(range(200))})


def test_profile_written_and_summarised(tmp_path, monkeypatch):
    path = tmp_path / "loop.prof"
    monkeypatch.setenv(ENV, str(path))
    with profiled_if_asked():
        _busy_in_json(0.3)
    summary = profile_summary.summarise(path, top=10)
    assert summary["total_own_s"] > 0.2
    assert any("_busy_in_json" in r["function"] for r in summary["top_cumulative"])
    assert summary["own_share_by_group"].get("json", 0) > 0.05  # json's encoder is where the time went
    profile_summary.main([str(path), "--out", str(tmp_path / "s.json")])
    assert json.loads((tmp_path / "s.json").read_text())["profile"] == str(path)


def test_nothing_written_without_the_variable(tmp_path, monkeypatch):
    monkeypatch.delenv(ENV, raising=False)
    monkeypatch.chdir(tmp_path)
    with profiled_if_asked():
        _busy_in_json(0.01)
    assert list(tmp_path.iterdir()) == []
