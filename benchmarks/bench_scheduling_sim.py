"""Greedy Scheduling in the deterministic simulator (the setting of DRAGON's scheduling study:
100 tokens over a 400 ms RTT link, decode latencies that drift on both sides).

Compares, on identical inputs (same fake engines, same link seeds): DRAGON with live greedy
scheduling, DRAGON pinned to the device, pinned to the cloud, VDRAG and DRDG/SW. All runs are
checked token for token against centralized aggregation. Writes JSON + a PNG under
benchmarks/results/.

    python -m benchmarks.bench_scheduling_sim [--rtt-ms 400] [--tokens 100] [--runs 5]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from dragon_core import session as s
from dragon_core.dist import Dist
from dragon_core.testing.netsim import LinkSpec, SideSpec, SimulatedPair
from dragon_core.testing.reference import centralized_decode
from dragon_core.scheduler import SchedulerConfig

RESULTS = Path(__file__).parent / "results"
VOCAB = 64


def fake_side(side_id: int, world: int, disagreement: float):
    def dist_fn(prefix):
        z = np.random.default_rng([world, 7, *prefix]).normal(0, 2.5, VOCAB)
        z += np.random.default_rng([world, side_id, *prefix]).normal(0, disagreement, VOCAB)
        return Dist.full(z)

    return dist_fn


def device_ms(now: float, step: int) -> float:
    """A CPU laptop: decoding slows as the context grows, then a background task steals it."""
    base = 150.0 + 2.0 * step
    return base * (3.0 if 55 <= step < 80 else 1.0)


def cloud_ms(now: float, step: int) -> float:
    """A shared GPU server: fast, except under a burst of other users' load."""
    return 600.0 if 20 <= step < 45 else 60.0


CASES = {
    "DRAGON (greedy scheduling)": dict(mode="dragon", aggregator="device", scheduling=True),
    "DRAGON (always device)": dict(mode="dragon", aggregator="device", scheduling=False),
    "DRAGON (always cloud)": dict(mode="dragon", aggregator="cloud", scheduling=False),
    "VDRAG (token-wise sync)": dict(mode="vdrag", aggregator="device", scheduling=False),
    "DRDG/SW (sequence-wise)": dict(mode="sw", aggregator="device", scheduling=False),
}


def run(rtt_ms: float, tokens: int, runs: int, disagreement: float) -> dict:
    out: dict = {"rtt_ms": rtt_ms, "tokens": tokens, "runs": runs, "disagreement": disagreement, "cases": {}}
    traces = {}
    for name, kw in CASES.items():
        totals, exact = [], True
        for world in range(runs):
            config = s.SessionConfig(request_id=1, max_tokens=tokens, seed=world, eos_ids=frozenset(),
                                     max_depth=8, scheduler=SchedulerConfig(min_dwell_steps=3), **kw)
            dev = SideSpec(0.5, fake_side(1, world, disagreement), device_ms)
            cloud = SideSpec(0.5, fake_side(2, world, disagreement), cloud_ms)
            up = LinkSpec(rtt_ms / 2, rtt_ms / 10, seed=world)
            down = LinkSpec(rtt_ms / 2, rtt_ms / 10, seed=world + 100)
            pair = SimulatedPair(config, dev, cloud, up, down).run()
            exact &= pair.device.record.tokens == centralized_decode(config, dev, cloud)
            totals.append(pair.device.record.finish_ms / 1000)
            if world == 0:
                traces[name] = {"commit_s": [t / 1000 for t, _ in pair.device.record.commits],
                                "aggregator": pair.device.session.stats.aggregator_by_step}
        out["cases"][name] = {"total_s_mean": float(np.mean(totals)), "total_s": totals, "exact": bool(exact)}
    base = out["cases"]["VDRAG (token-wise sync)"]["total_s_mean"]
    for case in out["cases"].values():
        case["speedup_vs_vdrag"] = base / case["total_s_mean"]
    out["traces"] = traces
    return out


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    names = list(result["cases"])
    ax1.barh(names, [result["cases"][n]["total_s_mean"] for n in names], color="#4c72b0")
    ax1.set_xlabel(f"seconds for {result['tokens']} tokens (mean of {result['runs']} runs)")
    ax1.invert_yaxis()
    ax1.set_title(f"RTT {result['rtt_ms']:.0f} ms, drifting decode latencies")
    for name, tr in result["traces"].items():
        ax2.plot(tr["commit_s"], range(1, len(tr["commit_s"]) + 1), label=name)
    tr = result["traces"]["DRAGON (greedy scheduling)"]
    on_cloud = [t for t, a in zip(tr["commit_s"], tr["aggregator"]) if a == "cloud"]
    ax2.scatter(on_cloud, [tr["commit_s"].index(t) + 1 for t in on_cloud], s=6, c="k", label="aggregated on cloud")
    ax2.set_xlabel("time (s)")
    ax2.set_ylabel("tokens committed")
    ax2.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rtt-ms", type=float, default=400.0)
    ap.add_argument("--tokens", type=int, default=100)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--disagreement", type=float, default=1.5, help="std of each side's own logit noise")
    args = ap.parse_args(argv)
    t0 = time.time()
    result = run(args.rtt_ms, args.tokens, args.runs, args.disagreement)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "scheduling_sim.json").write_text(json.dumps(result, indent=1))
    plot(result, RESULTS / "scheduling_sim.png")
    print(f"{'case':32s} {'seconds':>8s} {'vs VDRAG':>9s} exact")
    for name, c in result["cases"].items():
        print(f"{name:32s} {c['total_s_mean']:8.2f} {c['speedup_vs_vdrag']:8.2f}x {c['exact']}")
    print(f"(simulated in {time.time() - t0:.1f} s; results in {RESULTS})")
    return result


if __name__ == "__main__":
    main()
