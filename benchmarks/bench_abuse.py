"""Abuse benchmark: a real ``dragon-cloud serve`` (vLLM, SmolLM2, the demo's public index, an
API key) flooded with 1,000 abusive requests from 16 connections (in another process; 4 such floods) (bad values and
types, bad JSON, wrong keys, oversized and slow bodies, half-open headers, clients leaving
mid-answer: ``abuse_kit.abuses``) while a good client asks its question one request at a time.

Measured: the good client's latency idle and under the flood (p50/p99), each abuse's verdict
(4xx or cut, never a 5xx or a hang), hypothesis fuzzing of the OpenAI JSON (``openai_fuzz``:
inputs tried, 5xx, hangs, silent acceptances), and the server's streams, KV blocks, file
descriptors and processes before and after. JSON (with the environment) to
``benchmarks/results/abuse_cpu.json``, a latency plot next to it.

    python -m benchmarks.bench_abuse [--requests 1000] [--rounds 4] [--connections 16] [--good 40] [--fuzz 300]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import tempfile
import time
from pathlib import Path

from benchmarks import abuse_kit as kit
from benchmarks import openai_fuzz

RESULTS = Path(__file__).parent / "results"
KEY = "bench-abuse-key"


def start_server(root: Path, args) -> tuple:
    from dragon_demo import build_demo_world, start_cloud

    build_demo_world(root)
    proc, port = start_cloud(root / "index", "bench-link-token", root / "cloud.log", timeout_s=300, extra_args=(
        "--api-key", KEY, "--header-timeout-s", str(args.header_timeout_s),
        "--body-timeout-s", str(args.body_timeout_s)))
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        try:
            kit.resources(url, proc.pid, KEY)
            return proc, port, url
        except OSError:
            if proc.poll() is not None:
                raise RuntimeError((root / "cloud.log").read_text()[-3000:])
            time.sleep(0.5)
    raise TimeoutError("the cloud did not start")


async def measure(port: int, args) -> dict:
    """Idle latencies, then ``rounds`` floods of ``requests`` each (from another process), the
    good client asking again and again while each runs."""
    await kit.good_latencies(port, KEY, n=3)  # warm: first answers pay for lazy initialisation
    idle = await kit.good_latencies(port, KEY, n=args.good)
    loaded, floods = [], []
    for r in range(args.rounds):
        proc = await kit.flood_in_a_process(port, KEY, args.requests, args.connections, seed=r)
        latencies, flood = await kit.good_during(port, KEY, proc)
        loaded += latencies
        floods.append(flood)
    verdicts: dict = {}
    for f in floods:
        for k, n in f["verdicts"].items():
            verdicts[k] = verdicts.get(k, 0) + n
    return dict(idle=idle, flood_latencies=loaded,
                flood=dict(rounds=args.rounds, requests_per_round=args.requests, connections=args.connections,
                           requests=sum(f["requests"] for f in floods), verdicts=verdicts,
                           seconds=[f["seconds"] for f in floods], failures=sum((f["failures"] for f in floods), []),
                           by_kind=floods[0]["by_kind"]))


def run(args) -> dict:
    from benchmarks.bench_cloud_load import environment
    from dragon_demo import stop

    with tempfile.TemporaryDirectory() as tmp:
        proc, port, url = start_server(Path(tmp), args)
        try:
            baseline = kit.quiet(url, proc.pid, KEY)
            m = asyncio.run(measure(port, args))
            after_flood = kit.settled(url, proc.pid, baseline, KEY)
            fuzz, violations = openai_fuzz.fuzz_server(port, KEY, args.fuzz)
            after_fuzz = kit.settled(url, proc.pid, baseline, KEY)
        finally:
            stop(proc)
    idle, loaded = kit.latency_summary(m["idle"]), kit.latency_summary(m["flood_latencies"])
    return dict(
        benchmark="abuse", env=environment(args), flags=vars(args),
        good_client=dict(idle=idle, flood=loaded, p99_ratio=round(loaded["p99"] / idle["p99"], 3),
                         idle_s=[round(x, 4) for x in m["idle"]],
                         flood_s=[round(x, 4) for x in m["flood_latencies"]]),
        flood=m["flood"],
        fuzz=dict(counts=dict(fuzz), violations=[list(v) for v in violations]),
        resources=dict(baseline=kit.as_dict(baseline), after_flood=kit.as_dict(after_flood),
                       after_fuzz=kit.as_dict(after_fuzz),
                       back_to_baseline=kit.back_to(baseline, after_flood) and kit.back_to(baseline, after_fuzz)),
    )


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    g = result["good_client"]
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    for label, xs in (("idle", g["idle_s"]), (f"under floods of {result['flood']['requests_per_round']} abusive requests",
                                                g["flood_s"])):
        xs = sorted(xs)
        ax.step(xs, [(i + 1) / len(xs) for i in range(len(xs))], where="post", label=label)
    ax.axvline(3 * g["idle"]["p99"], color="grey", linestyle=":", label="3 x idle p99")
    ax.set_xlabel("good client's answer latency (s)")
    ax.set_ylabel("fraction of answers")
    ax.set_title(f"Good client under abuse: p99 {g['idle']['p99']:.2f} s idle, {g['flood']['p99']:.2f} s flooded")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=1000, help="abusive requests per flood")
    ap.add_argument("--rounds", type=int, default=4, help="floods, one after the other")
    ap.add_argument("--connections", type=int, default=16)
    ap.add_argument("--good", type=int, default=40, help="good requests, idle and under the flood")
    ap.add_argument("--fuzz", type=int, default=300, help="fuzzed OpenAI bodies")
    ap.add_argument("--header-timeout-s", type=float, default=5.0)
    ap.add_argument("--body-timeout-s", type=float, default=5.0)
    ap.add_argument("--out", type=Path, default=RESULTS / "abuse_cpu.json")
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    result = run(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1, default=str) + "\n")
    plot(result, args.out.with_suffix(".png"))
    g = result["good_client"]
    print(f"good client p99: {g['idle']['p99']:.3f} s idle, {g['flood']['p99']:.3f} s under the flood "
          f"({g['p99_ratio']:.2f}x); flood {result['flood']['verdicts']}; fuzz {result['fuzz']['counts']}; "
          f"back to baseline: {result['resources']['back_to_baseline']}")
    return result


if __name__ == "__main__":
    main()
