"""What the local OpenAI server costs: ``dragon-edge serve`` vs the SDK, on the same questions.

The goal of ``dragon-edge serve`` (issue 18) is that an app reaching DRAGON over HTTP pays
little for it. Both paths answer the same questions over the same private store (the demo's
notes), greedy, streamed, side by side in one run:

* **SDK**: ``AsyncDragonClient`` in this process (the device runtime loaded here);
* **HTTP**: a ``dragon-edge serve`` process (its own runtime, same weights), asked through the
  unmodified ``openai`` package over loopback: JSON parsing, validation, server-sent events.

Per answer: time to the first text and to the last, tokens. Pairs (same question, same repeat)
alternate which path goes first, so drift in the shared machine's load falls on both; the
overhead is the median of the paired differences. The answers must be equal (greedy). Without
``--cloud`` the answers are device-only (the cloud's vLLM costs minutes to start on 2 cores);
with ``--cloud URL`` both paths use that cloud.

    python -m benchmarks.bench_edge_serve [--repeats 5] [--max-tokens 32] [--cloud URL]

Writes ``benchmarks/results/edge_serve.json`` and ``edge_serve.png`` (``--out``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.environment import describe

RESULTS = Path(__file__).resolve().parent / "results"
QUESTIONS = [
    "What is the home wifi password?",
    "When is my dentist appointment?",
    "Where does my sister Lena live?",
    "Where is the router?",
]
MODEL = "smollm2-135m"


def start_server(store: Path, root: Path, cloud: str | None) -> tuple[subprocess.Popen, str]:
    port_file = root / "serve.port"
    cmd = [sys.executable, "-m", "dragon_edge.cli", "serve", "--store", str(store), "--port", "0",
           "--port-file", str(port_file), "--quiet", *(["--cloud", cloud] if cloud else [])]
    proc = subprocess.Popen(cmd, stdout=(root / "serve.log").open("w"), stderr=subprocess.STDOUT,
                            env=dict(os.environ, HF_HUB_OFFLINE="1"), start_new_session=True)
    deadline = time.monotonic() + 180
    while not port_file.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError("dragon-edge serve did not start:\n" + (root / "serve.log").read_text()[-3000:])
        time.sleep(0.1)
    return proc, f"http://127.0.0.1:{int(port_file.read_text())}"


async def timed(chunks) -> dict:
    """Time to the first text and to the end of one streamed answer (the clock starts before
    the request: ``chunks`` is the coroutine that sends it)."""
    t0 = time.perf_counter()
    stream = await chunks
    first, text, stats = None, [], None
    async for chunk in stream:
        delta = chunk.choices[0].delta.content or ""
        if delta and first is None:
            first = time.perf_counter() - t0
        text.append(delta)
        stats = (chunk.model_extra or {}).get("dragon", stats)
    total = time.perf_counter() - t0
    return dict(ttft_ms=1000 * (first or total), total_ms=1000 * total, tokens=stats["tokens"], text="".join(text),
                degraded=stats["degraded"], device_only=stats["device_only"])


async def measure(args, store: Path, url: str) -> list[dict]:
    import openai

    from dragon_edge.sdk import AsyncDragonClient

    sdk = AsyncDragonClient(cloud_url=args.cloud, store=store)
    http = openai.AsyncOpenAI(base_url=url + "/v1", api_key="local", max_retries=0, timeout=300)
    opts = dict(max_tokens=args.max_tokens, temperature=0, stream=True)

    def ask(path: str, question: str):
        messages = [{"role": "user", "content": question}]
        if path == "sdk":
            return timed(sdk.chat.completions.create(messages=messages, **opts))
        return timed(http.chat.completions.create(model=MODEL, messages=messages, **opts))

    try:
        for q in QUESTIONS[:2]:  # warm-up: first-use costs (thread pools, contexts, the link) on both sides
            await ask("sdk", q)
            await ask("http", q)
        samples = []
        for r in range(args.repeats):
            for i, q in enumerate(QUESTIONS):
                order = ("sdk", "http") if (r + i) % 2 == 0 else ("http", "sdk")
                for path in order:
                    samples.append(dict(repeat=r, question=q, path=path, first=path == order[0],
                                        **await ask(path, q)))
            print(f"repeat {r + 1}/{args.repeats} done", flush=True)
        return samples
    finally:
        await sdk.close()
        await http.close()


def summarise(samples: list[dict]) -> dict:
    def med(xs):
        return round(statistics.median(xs), 2)

    out: dict = {}
    for path in ("sdk", "http"):
        s = [x for x in samples if x["path"] == path]
        per_token = [(x["total_ms"] - x["ttft_ms"]) / (x["tokens"] - 1) for x in s if x["tokens"] > 1]
        out[path] = dict(n=len(s), ttft_ms_median=med([x["ttft_ms"] for x in s]),
                         total_ms_median=med([x["total_ms"] for x in s]), per_token_ms_median=med(per_token),
                         tokens_median=med([x["tokens"] for x in s]))
    pairs = {}
    for x in samples:
        pairs.setdefault((x["repeat"], x["question"]), {})[x["path"]] = x
    d_ttft = [p["http"]["ttft_ms"] - p["sdk"]["ttft_ms"] for p in pairs.values()]
    d_total = [p["http"]["total_ms"] - p["sdk"]["total_ms"] for p in pairs.values()]
    out["overhead"] = dict(pairs=len(pairs), ttft_ms_median=med(d_ttft), total_ms_median=med(d_total),
                           total_ms_p10=round(sorted(d_total)[len(d_total) // 10], 2),
                           total_ms_p90=round(sorted(d_total)[(9 * len(d_total)) // 10], 2),
                           total_relative_median=round(statistics.median(
                               [(p["http"]["total_ms"] - p["sdk"]["total_ms"]) / p["sdk"]["total_ms"]
                                for p in pairs.values()]), 4))
    out["answers_equal"] = sum(p["http"]["text"] == p["sdk"]["text"] for p in pairs.values())
    return out


def plot(samples: list[dict], summary: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.2))
    for j, metric in enumerate(("ttft_ms", "total_ms")):
        data = [[x[metric] for x in samples if x["path"] == p] for p in ("sdk", "http")]
        pos = [j * 3 + 1, j * 3 + 2]
        a.boxplot(data, positions=pos, widths=0.7)
    a.set_xticks([1, 2, 4, 5], ["SDK", "HTTP", "SDK", "HTTP"])
    a.set_xlabel("time to first text          time to whole answer")
    a.set_ylabel("ms")
    a.set_title("per answer (same questions, greedy, streamed)")
    by_q = [[p_http["total_ms"] - p_sdk["total_ms"]
             for (p_sdk, p_http) in _pairs(samples, q)] for q in QUESTIONS]
    b.boxplot(by_q)
    b.axhline(0, color="grey", lw=0.8)
    b.set_xticks(range(1, len(QUESTIONS) + 1), [q.split()[-1].rstrip("?") for q in QUESTIONS])
    b.set_ylabel("HTTP - SDK, whole answer (ms)")
    o = summary["overhead"]
    b.set_title(f"paired overhead: median {o['total_ms_median']:+.1f} ms ({100 * o['total_relative_median']:+.1f}%)")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def _pairs(samples: list[dict], question: str):
    by = {}
    for x in samples:
        if x["question"] == question:
            by.setdefault(x["repeat"], {})[x["path"]] = x
    return [(p["sdk"], p["http"]) for p in by.values()]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--cloud", default=None, help="A running dragon-cloud URL (default: device-only answers).")
    ap.add_argument("--out", type=Path, default=RESULTS / "edge_serve.json")
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from dragon_demo import build_private_store

    env = describe(["llama_cpp_python", "aiohttp", "openai"])
    with tempfile.TemporaryDirectory(prefix="bench_edge_serve_") as tmp:
        root = Path(tmp)
        build_private_store(root).close()
        proc, url = start_server(root / "store", root, args.cloud)
        try:
            samples = asyncio.run(measure(args, root / "store", url))
        finally:
            proc.send_signal(signal.SIGTERM)
            exit_code = proc.wait(60)
    env["loadavg_at_end"] = os.getloadavg()
    summary = summarise(samples)
    result = dict(benchmark="bench_edge_serve", mode="dragon with cloud " + args.cloud if args.cloud else "device-only",
                  max_tokens=args.max_tokens, repeats=args.repeats, questions=QUESTIONS, summary=summary,
                  server_exit_code=exit_code, environment=env, samples=samples)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    title = (f"dragon-edge serve vs SDK, {result['mode']}, {args.max_tokens} max tokens, {env['affinity']} cores, "
             f"load {env['loadavg_at_start'][0]:.1f}")
    plot(samples, summary, args.out.with_suffix(".png"), title)
    print(json.dumps(summary, indent=1))
    print(f"wrote {args.out} and {args.out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
