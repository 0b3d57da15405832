"""Live Greedy Scheduling end to end: real cloud process (vLLM), real device (llama.cpp), netem
proxy between them. Two scenarios — an emulated slow device, then an emulated slow cloud — each
run with the aggregator pinned to the device, pinned to the cloud, and scheduled live (started on
the side the rule should leave). Reports per-token latency side by side and where the
aggregator ended. JSON + PNG under benchmarks/results/.

    python -m benchmarks.bench_e2e [--rtt-ms 100] [--slow-ms 250] [--tokens 32] [--repeats 2]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
QUESTION = "Where does my sister Lena live, and what is that city famous for?"
TOKEN = "bench-token"


def build_world(root: Path):
    from dragon_edge.demo import PRIVATE_NOTES, PUBLIC_CORPUS
    from dragon_edge.store import DocumentStore
    from dragon_vllm.corpus import PublicIndex

    for folder, files in (("public", PUBLIC_CORPUS), ("notes", PRIVATE_NOTES)):
        (root / folder).mkdir(parents=True, exist_ok=True)
        for name, text in files.items():
            (root / folder / name).write_text(text + "\n")
    PublicIndex.build(sorted((root / "public").glob("*.txt")), root / "index", progress=False, overwrite=True)
    store = DocumentStore(root / "store")
    store.ingest(root / "notes", progress=False)
    return store


async def answer(runtime, url: str, **opts) -> dict:
    from dragon_edge.link import CloudLink
    from dragon_edge.runtime import AnswerOptions

    runtime.link = CloudLink(url, runtime.identity, TOKEN)
    stats = None
    try:
        async for piece in runtime.answer(QUESTION, AnswerOptions(**opts)):
            stats = piece.finished or stats
    finally:
        await runtime.link.close()
    lat = stats.per_token_latency_ms[1:] or [0.0]  # the first entry is the TTFT
    return dict(tokens=stats.tokens, per_token_ms=statistics.mean(lat), ttft_s=stats.ttft_s,
                final_aggregator=stats.final_aggregator, aggregator_steps=stats.aggregator_steps,
                acceptance_device=stats.acceptance_device, acceptance_cloud=stats.acceptance_cloud,
                handovers=stats.handovers, degraded=stats.degraded)


CONFIGS = {
    "pinned device": dict(aggregator="device", scheduling=False),
    "pinned cloud": dict(aggregator="cloud", scheduling=False),
}


async def scenario(runtime, url: str, slow: str, slow_ms: float, tokens: int, repeats: int) -> dict:
    """``slow``: which side is emulated slow. The scheduled run starts on the *fast* side, so the
    rule (aggregate on the side slower by more than an RTT) has to move it."""
    start = "cloud" if slow == "device" else "device"
    configs = dict(CONFIGS, scheduled=dict(aggregator=start, scheduling=True))
    device_ms = slow_ms if slow == "device" else 0.0
    out = {}
    for name, cfg in configs.items():
        runs = [await answer(runtime, url, max_tokens=tokens, dist_top_k=32, emulate_decode_ms=device_ms, **cfg)
                for _ in range(repeats)]
        out[name] = dict(per_token_ms=statistics.mean(r["per_token_ms"] for r in runs), runs=runs)
    return out


def run(rtt_ms: float, slow_ms: float, tokens: int, repeats: int) -> dict:
    from benchmarks.netem import Shape, spawn_proxy, stop_proxy
    from dragon_edge.demo import free_port, start_cloud, stop, wait_healthy
    from dragon_edge.loader import load_runtime

    result: dict = dict(rtt_ms=rtt_ms, slow_ms=slow_ms, tokens=tokens, repeats=repeats, scenarios={})
    with tempfile.TemporaryDirectory(prefix="dragon-bench-") as tmp:
        root = Path(tmp)
        store = build_world(root)
        runtime = load_runtime("smollm2-135m", "llamacpp", store=store)
        for slow in ("device", "cloud"):
            port = free_port()
            extra = ("--emulate-decode-ms", str(slow_ms)) if slow == "cloud" else ()
            cloud = start_cloud(root / "index", port, TOKEN, root / f"cloud-{slow}.log", extra)
            proxy = None
            try:
                wait_healthy(f"http://127.0.0.1:{port}", cloud, 300)
                one_way = Shape(latency_ms=rtt_ms / 2, jitter_ms=rtt_ms / 10)
                proxy, pport = spawn_proxy(("127.0.0.1", port), up=one_way, down=one_way, seed=1)
                loop = asyncio.new_event_loop()
                try:
                    result["scenarios"][f"slow {slow}"] = loop.run_until_complete(
                        scenario(runtime, f"http://127.0.0.1:{pport}", slow, slow_ms, tokens, repeats))
                finally:
                    loop.close()
            finally:
                if proxy is not None:
                    stop_proxy(proxy)
                stop(cloud)
    return result


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scen = list(result["scenarios"])
    names = list(next(iter(result["scenarios"].values())))
    fig, ax = plt.subplots(figsize=(8, 4))
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        ax.bar([j + i * width for j in range(len(scen))],
               [result["scenarios"][sc][name]["per_token_ms"] for sc in scen], width, label=name)
    ax.set_xticks([j + width for j in range(len(scen))], scen)
    ax.set_ylabel("mean per-token latency (ms)")
    ax.set_title(f"live scheduling, RTT {result['rtt_ms']:.0f} ms, slow side +{result['slow_ms']:.0f} ms/draft (CPU)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rtt-ms", type=float, default=100.0)
    ap.add_argument("--slow-ms", type=float, default=250.0)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args(argv)
    t0 = time.time()
    result = run(args.rtt_ms, args.slow_ms, args.tokens, args.repeats)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "e2e_scheduling.json").write_text(json.dumps(result, indent=1))
    plot(result, RESULTS / "e2e_scheduling.png")
    for sc, rows in result["scenarios"].items():
        print(sc)
        for name, row in rows.items():
            ends = {r["final_aggregator"] for r in row["runs"]}
            print(f"  {name:14s} {row['per_token_ms']:7.1f} ms/token   aggregator ends on {','.join(sorted(ends))}")
    print(f"({time.time() - t0:.0f} s; results in {RESULTS})")
    return result


if __name__ == "__main__":
    main()
