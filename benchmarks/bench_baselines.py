"""Every baseline of one request, end to end: real cloud process (vLLM), real device (llama.cpp),
netem proxy between them, at RTT 0 and 100 ms. Modes: device-only, cloud-only, DRCG/Text (the
cloud sends its passages' text, the device prefills and decodes everything), VDRAG (token-wise
synchronous), DRDG/SW (sequence-wise) and DRAGON (speculative aggregation, Greedy Scheduling).

Per mode: TTFT, per-token latency (mean gap between tokens after the first), end-to-end time
per token, and link bytes per token (both directions, handshake excluded). Modes alternate
within each repeat so that drift in the machine's load hits all of them alike; medians over the
repeats. JSON + PNG under benchmarks/results/.

    python -m benchmarks.bench_baselines [--rtts 0 100] [--tokens 32] [--repeats 3]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
QUESTION = "Where does my sister Lena live, and what is that city famous for?"
TOKEN = "bench-token"
# the baselines run as defined (aggregator fixed on the device); DRAGON as shipped (scheduled)
MODES: dict[str, dict] = {
    "device": dict(mode="device"),
    "cloud": dict(mode="cloud"),
    "text": dict(mode="text"),
    "vdrag": dict(mode="vdrag", aggregator="device", scheduling=False),
    "sw": dict(mode="sw", aggregator="device", scheduling=False),
    "dragon": dict(mode="dragon"),
}


async def answer(runtime, url: str, **opts) -> dict:
    from dragon_edge.link import CloudLink
    from dragon_edge.runtime import AnswerOptions

    runtime.link = CloudLink(url, runtime.identity, TOKEN)
    await runtime.link.connect()  # the handshake is per connection, not per answer: keep it out
    stats = None
    t0 = time.monotonic()
    try:
        async for piece in runtime.answer(QUESTION, AnswerOptions(**opts)):
            stats = piece.finished or stats
    finally:
        await runtime.link.close()
    total_s = time.monotonic() - t0
    gaps = stats.per_token_latency_ms[1:] or [0.0]  # the first entry is the TTFT
    return dict(tokens=stats.tokens, ttft_ms=(stats.ttft_s or 0.0) * 1000, per_token_ms=statistics.mean(gaps),
                e2e_ms_per_token=total_s * 1000 / max(1, stats.tokens), bytes_per_token=stats.bytes_per_token,
                bytes_sent=stats.bytes_sent, bytes_received=stats.bytes_received, degraded=stats.degraded,
                device_only=stats.device_only, aggregator_steps=stats.aggregator_steps)


async def one_rtt(runtime, url: str, tokens: int, repeats: int) -> dict:
    common = dict(max_tokens=tokens, dist_top_k=32)
    await answer(runtime, url, **common)  # warm-up (caches, connection), discarded
    runs: dict[str, list[dict]] = {name: [] for name in MODES}
    for _ in range(repeats):
        for name, cfg in MODES.items():
            runs[name].append(await answer(runtime, url, **cfg, **common))
    keys = ("ttft_ms", "per_token_ms", "e2e_ms_per_token", "bytes_per_token")
    return {name: {**{k: statistics.median(r[k] for r in rs) for k in keys},
                   "tokens": statistics.median(r["tokens"] for r in rs), "runs": rs}
            for name, rs in runs.items()}


def run(rtts: list[float], tokens: int, repeats: int) -> dict:
    from benchmarks.netem import Shape, spawn_proxy, stop_proxy
    from dragon_demo import build_demo_world, start_cloud, stop, wait_healthy
    from dragon_edge.loader import load_runtime

    result: dict = dict(tokens=tokens, repeats=repeats, question=QUESTION, modes=MODES, rtt={},
                        load_before=os.getloadavg())
    with tempfile.TemporaryDirectory(prefix="dragon-bench-") as tmp:
        root = Path(tmp)
        runtime = load_runtime("smollm2-135m", "llamacpp", store=build_demo_world(root)[1])
        cloud, port = start_cloud(root / "index", TOKEN, root / "cloud.log")
        try:
            try:
                wait_healthy(f"http://127.0.0.1:{port}", cloud, 300)
            except RuntimeError:
                print((root / "cloud.log").read_text()[-3000:])
                raise
            for rtt in rtts:
                one_way = Shape(latency_ms=rtt / 2, jitter_ms=rtt / 10)
                proxy, pport = spawn_proxy(("127.0.0.1", port), up=one_way, down=one_way, seed=1)
                loop = asyncio.new_event_loop()
                try:
                    result["rtt"][f"{rtt:g}"] = loop.run_until_complete(
                        one_rtt(runtime, f"http://127.0.0.1:{pport}", tokens, repeats))
                finally:
                    loop.close()
                    stop_proxy(proxy)
        finally:
            stop(cloud)
    result["load_after"] = os.getloadavg()
    return result


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rtts = list(result["rtt"])
    names = list(MODES)
    metrics = (("per_token_ms", "per-token latency (ms, median)"), ("ttft_ms", "TTFT (ms, median)"),
               ("bytes_per_token", "link bytes per token"))
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    width = 0.8 / len(rtts)
    for ax, (metric, label) in zip(axes, metrics):
        for i, rtt in enumerate(rtts):
            ax.bar([j + i * width for j in range(len(names))], [result["rtt"][rtt][n][metric] for n in names],
                   width, label=f"RTT {rtt} ms")
        ax.set_xticks([j + width * (len(rtts) - 1) / 2 for j in range(len(names))], names)
        ax.set_ylabel(label)
        if metric == "bytes_per_token":
            ax.set_yscale("symlog", linthresh=10)
    axes[0].legend()
    fig.suptitle(f"baselines end to end: answers of at most {result['tokens']} tokens, {result['repeats']} repeats, "
                 "medians (2-core CPU)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rtts", type=float, nargs="+", default=[0.0, 100.0])
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)
    t0 = time.time()
    result = run(args.rtts, args.tokens, args.repeats)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "baselines.json").write_text(json.dumps(result, indent=1))
    plot(result, RESULTS / "baselines.png")
    for rtt, rows in result["rtt"].items():
        print(f"RTT {rtt} ms")
        for name, row in rows.items():
            flags = {"degraded" for r in row["runs"] if r["degraded"]}
            print(f"  {name:7s} TTFT {row['ttft_ms']:7.0f} ms  {row['per_token_ms']:7.1f} ms/token  "
                  f"{row['e2e_ms_per_token']:7.1f} ms/token end to end  {row['bytes_per_token']:9.0f} B/token  "
                  f"{row['tokens']:.0f} tokens {' '.join(flags)}")
    print(f"({time.time() - t0:.0f} s; results in {RESULTS})")
    return result


if __name__ == "__main__":
    main()
