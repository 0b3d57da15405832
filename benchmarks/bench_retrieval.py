"""Retrieval at scale (issue 15): flat exact vs IVF-Flat vs IVF-PQ, and TeleRAG's lookahead path.

On a SYNTHETIC clustered corpus (``benchmarks/synthetic_corpus.py``, generated on first use):

* per index kind: build time (train + add), process RSS growth, index bytes;
* per (kind, nprobe): single-query latency (p50/p90), batched latency and throughput (batches
  of ``--batch``), recall@k against the exact flat search;
* the lookahead path (``dragon_vllm.corpus.lookahead``) per IVF config: ``open`` (coarse
  quantizer + the cluster copies started in the background), then a *simulated* round trip
  (``time.sleep(--rtt-ms)``: the link, the device's retrieval and prefills in the real system)
  during which the copy runs, then ``search``; reported: the time on the critical path after the
  round trip, the cache hit rate, and whether the results equal the plain IVF search id for id.

    python -m benchmarks.bench_retrieval --n 1000000                      # CPU (faiss-cpu)
    python -m benchmarks.bench_retrieval --n 10000000 --store gpu --gpu-whole-index \\
        --out benchmarks/results/retrieval_h200.json                     # GPU machine (not run yet)

On CPU the "cache" is a copy in host memory, so the lookahead can only add cost: the numbers
check the path and its overhead. TeleRAG's goals (>= 1.6x lower latency than faiss-cpu IVF at
10M) are GPU goals, measured with ``--store gpu`` on the GPU machine.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np

from benchmarks import synthetic_corpus as synth

RESULTS = Path(__file__).resolve().parent / "results"


def rss_bytes() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    k = truth.shape[1]
    return float(np.mean([len(set(f[f >= 0]) & set(t)) / k for f, t in zip(found, truth)]))


def _ms(xs) -> dict:
    a = np.asarray(xs) * 1e3
    return {"p50_ms": round(float(np.percentile(a, 50)), 3), "p90_ms": round(float(np.percentile(a, 90)), 3),
            "mean_ms": round(float(a.mean()), 3)}


def time_single(search, xq: np.ndarray, k: int, gap: float = 0.0) -> tuple[dict, np.ndarray]:
    """Single queries, one after another (``gap`` 0) or arriving ``gap`` s apart, idle in between,
    as the lookahead's are: an idle GPU or OpenMP team wakes up slower than one kept busy."""
    out, times = [], []
    for i in range(len(xq)):
        if gap:
            time.sleep(gap)
        t = time.perf_counter()
        _, ids = search(xq[i : i + 1], k)
        times.append(time.perf_counter() - t)
        out.append(ids[0])
    return _ms(times), np.array(out)


def time_batched(search, xq: np.ndarray, k: int, batch: int) -> dict:
    times = []
    for s in range(0, len(xq), batch):
        t = time.perf_counter()
        search(xq[s : s + batch], k)
        times.append(time.perf_counter() - t)
    return {**_ms(times), "batch": batch, "queries_per_s": round(len(xq) / sum(times), 1)}


def build(vecs: np.ndarray, kind: str, nlist: int, pq_m: int, device: str | None = None) -> tuple[object, dict]:
    from dragon_vllm.corpus.ivf import IndexSpec, build_faiss_index

    rss0, t0 = rss_bytes(), time.perf_counter()
    index, info = build_faiss_index(vecs, IndexSpec(kind=kind, nlist=nlist, pq_m=pq_m),
                                    device=None if kind == "flat" else device)
    info.update(build_s=round(time.perf_counter() - t0, 2), rss_growth_bytes=rss_bytes() - rss0,
                index_bytes=index_bytes(index))
    return index, info


def index_bytes(index) -> int:
    """Bytes of the stored vectors/codes and ids (plus centroids): what must sit in memory."""
    if info_kind(index) == "flat":
        return int(index.ntotal * index.d * 4)
    from dragon_vllm.corpus.cluster_store import ivf_of, list_bytes

    ivf = ivf_of(index)
    return int(list_bytes(index).sum() + ivf.nlist * ivf.d * 4)


def info_kind(index) -> str:
    import faiss

    return "flat" if isinstance(index, faiss.IndexFlat) else "ivf"


def faiss_ivf(index):
    import faiss

    return faiss.extract_index_ivf(index)


def bench_lookahead(index, xq, k: int, batch: int, rtt: float, plain_ids: np.ndarray, budget_fraction: float,
                    store: str, store_device: str = "cuda") -> dict:
    from dragon_vllm.corpus.cluster_store import list_bytes
    from dragon_vllm.corpus.lookahead import LookaheadSearcher

    budget = int(list_bytes(index).sum() * budget_fraction)
    t0 = time.perf_counter()
    s = LookaheadSearcher(index, budget_bytes=budget, store=_store(store, index, budget, store_device))
    setup_s = time.perf_counter() - t0
    opens, after, ids = [], [], []
    for i in range(len(xq)):
        t = time.perf_counter()
        la = s.open(xq[i : i + 1])
        opens.append(time.perf_counter() - t)
        time.sleep(rtt)  # simulated round trip: the prefetch copy runs meanwhile
        t = time.perf_counter()
        ids.append(s.search(la, k)[1][0])
        after.append(time.perf_counter() - t)
    single = {"open": _ms(opens), "after_rtt": _ms(after), **{f"cache_{a}": b for a, b in s.cache.snapshot().items()}}
    single["open_plus_after_rtt"] = _ms(np.add(opens, after))
    batched_t, batched_open = [], []
    for b in range(0, len(xq), batch):
        t = time.perf_counter()
        la = s.open(xq[b : b + batch])
        batched_open.append(time.perf_counter() - t)
        time.sleep(rtt)
        t = time.perf_counter()
        s.search(la, k)
        batched_t.append(time.perf_counter() - t)
    pinned = getattr(s.store, "pinned_bytes", None)  # before close(), which unpins
    s.close()
    crit = np.add(batched_open, batched_t)
    return {"rtt_ms": rtt * 1e3, "budget_bytes": budget, "budget_fraction": budget_fraction, "store": store,
            "store_setup_s": round(setup_s, 2), "store_bytes": getattr(s.store, "capacity_bytes", None),
            "pinned_bytes": pinned,
            "equal_to_plain_ivf": bool((np.array(ids) == plain_ids).all()), "single": single,
            "batched_after_rtt": {**_ms(batched_t), "batch": batch,
                                  "queries_per_s": round(len(xq) / sum(batched_t), 1)},
            "batched_open_plus_after_rtt": {**_ms(crit), "batch": batch, "queries_per_s": round(len(xq) / crit.sum(), 1)},
            "cache_after_batched": s.cache.snapshot()}


def _store(kind: str, index, budget: int, device: str = "cuda"):
    if kind == "cpu":
        return None  # LookaheadSearcher's default: CpuClusterStore
    from dragon_vllm.corpus.gpu_store import GpuClusterStore

    return GpuClusterStore(index, budget, device=device)  # raises GpuUnavailable without CUDA


def gpu_whole_index(index, device: str = "cuda"):
    """Baseline (b) of the issue: every list resident in GPU memory (the same torch store with a
    budget of the whole index, all copied in first: no lookahead, no misses). Not faiss-gpu:
    PyPI has it for CUDA 12 only (gpu_store.py)."""
    from dragon_vllm.corpus.cluster_store import ivf_of
    from dragon_vllm.corpus.gpu_store import GpuClusterStore
    from dragon_vllm.corpus.lookahead import LookaheadSearcher

    t0 = time.perf_counter()
    store = GpuClusterStore(index, 1 << 62, device=device)  # the carve stops at the whole index
    s = LookaheadSearcher(index, budget_bytes=store.capacity_bytes, store=store)
    lists = list(range(ivf_of(index).nlist))
    s.cache.plan(np.array([lists]))  # all admitted ...
    s.cache.release(np.array([lists]))
    store.copy_in(lists)  # ... and copied
    return s, {"store_bytes": store.capacity_bytes, "setup_s": round(time.perf_counter() - t0, 2)}


def run(a: argparse.Namespace) -> dict:
    import faiss

    faiss.omp_set_num_threads(a.threads)
    corpus = a.corpus or Path(f"/tmp/dragon_synth_{a.n}")
    if not (corpus / "synthetic.json").is_file():
        synth.generate(corpus, a.n, clusters=a.clusters, passages=False, workers=a.workers)
    vecs, xq_all, meta = synth.load(corpus)
    xq = np.ascontiguousarray(xq_all[: a.queries])
    results = {"corpus": meta, "queries": len(xq), "k": a.k, "threads": a.threads, "configs": []}
    if a.skip_flat:  # at 10M+: the exact truth on the build device, no flat row
        t0 = time.perf_counter()
        truth = exact_top_k(vecs, xq, a.k, a.build_device or "cpu")
        results["truth_s"] = round(time.perf_counter() - t0, 2)
    else:
        flat, info = build(vecs, "flat", a.nlist, a.pq_m)
        _, truth = flat.search(xq, a.k)
        results["configs"].append(measure(flat, "flat", None, info, xq, truth, a))
        del flat
    for kind in a.kinds:
        index, info = build(vecs, kind, a.nlist, a.pq_m, a.build_device)
        print(json.dumps({"built": kind, **info}), flush=True)
        for nprobe in a.nprobe:
            faiss.extract_index_ivf(index).nprobe = nprobe
            results["configs"].append(measure(index, kind, nprobe, info, xq, truth, a))
            print(json.dumps(results["configs"][-1]), flush=True)
            a.out.with_suffix(".partial.json").write_text(json.dumps(results, indent=2) + "\n")  # a cut run keeps its rows
        del index
    return results


def measure(index, kind: str, nprobe: int | None, info: dict, xq, truth, a) -> dict:
    if kind != "flat":  # faiss's default for baseline (a); a lookahead searcher of the last config set 3
        faiss_ivf(index).parallel_mode = 0
    single, ids = time_single(index.search, xq, a.k)
    row = {"kind": kind, "nprobe": nprobe, "build": info, "recall_at_k": round(recall(ids, truth), 4),
           "single": single, "batched": time_batched(index.search, xq, a.k, a.batch)}
    if kind != "flat" and a.threads > 1:  # faiss splits one query's lists over threads only in parallel_mode 1
        ivf = faiss_ivf(index)
        ivf.parallel_mode = 1
        row["single_parallel_lists"] = time_single(index.search, xq, a.k)[0]
        if a.spaced:
            row["single_parallel_lists_spaced"] = time_single(index.search, xq, a.k, a.rtt_ms / 1e3)[0]
        ivf.parallel_mode = 0
    if kind != "flat" and a.spaced:
        row["single_spaced"] = time_single(index.search, xq, a.k, a.rtt_ms / 1e3)[0]
    if kind != "flat" and a.lookahead:
        store = a.store if kind == "ivf-flat" else "cpu"  # the GPU store scans IVF-Flat lists only
        row["lookahead"] = bench_lookahead(index, xq, a.k, a.batch, a.rtt_ms / 1e3, ids, a.budget_fraction, store,
                                           a.store_device)
    if kind == "ivf-flat" and a.gpu_whole_index:
        g, info = gpu_whole_index(index, a.store_device)
        g_single, g_ids = time_single(g.search_now, xq, a.k)
        row["gpu_whole_index"] = {**info, "single": g_single, "batched": time_batched(g.search_now, xq, a.k, a.batch),
                                  "equal_to_plain_ivf": bool((g_ids == ids).all())}
        if a.spaced:
            row["gpu_whole_index"]["single_spaced"] = time_single(g.search_now, xq, a.k, a.rtt_ms / 1e3)[0]
        g.close()
        del g
    row["ratios"] = ratios(row)
    return row


def ratios(row: dict) -> dict:
    """The issue's goals, from one row: lookahead (open + search after the RTT) vs (a) faiss-cpu
    IVF and (b) the whole index on the GPU; batched throughput vs (a)."""
    la, whole, out = row.get("lookahead"), row.get("gpu_whole_index"), {}
    if la:
        crit = la["single"]["open_plus_after_rtt"]["p50_ms"]
        best_cpu = min(row["single"]["p50_ms"], row.get("single_parallel_lists", {}).get("p50_ms", np.inf))
        out["cpu_ivf_over_lookahead_single_p50"] = round(best_cpu / crit, 3)  # (a): faiss's better mode
        out["lookahead_over_cpu_ivf_batched_qps"] = round(
            la["batched_open_plus_after_rtt"]["queries_per_s"] / row["batched"]["queries_per_s"], 3)
        if whole:
            out["lookahead_over_whole_gpu_single_p50"] = round(crit / whole["single"]["p50_ms"], 3)
        spaced_cpu = [row[key]["p50_ms"] for key in ("single_spaced", "single_parallel_lists_spaced") if key in row]
        if spaced_cpu:  # the baselines' queries arriving as the lookahead's do, an RTT apart
            out["cpu_ivf_spaced_over_lookahead_single_p50"] = round(min(spaced_cpu) / crit, 3)
        if whole and "single_spaced" in whole:
            out["lookahead_over_whole_gpu_spaced_single_p50"] = round(crit / whole["single_spaced"]["p50_ms"], 3)
        if la.get("store_bytes") and row["build"].get("index_bytes"):
            out["store_share_of_index"] = round(la["store_bytes"] / row["build"]["index_bytes"], 3)
    return out


def exact_top_k(vecs: np.ndarray, xq: np.ndarray, k: int, device: str, block: int = 1 << 20) -> np.ndarray:
    """Exact inner-product top-k ids over a (memory-mapped) corpus, block by block on ``device``."""
    import torch

    q = torch.from_numpy(xq).to(device)
    best_s = torch.full((len(xq), k), -torch.inf, device=device)
    best_i = torch.full((len(xq), k), -1, dtype=torch.int64, device=device)
    for start in range(0, len(vecs), block):
        x = torch.from_numpy(np.ascontiguousarray(vecs[start : start + block], dtype=np.float32)).to(device)
        s = torch.cat([best_s, q @ x.T], dim=1)
        i = torch.cat([best_i, torch.arange(start, start + len(x), device=device).expand(len(xq), -1)], dim=1)
        best_s, pos = s.topk(k, dim=1)
        best_i = i.gather(1, pos)
    return best_i.cpu().numpy()


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = results["configs"]
    labels = [r["kind"] + (f"\nnprobe {r['nprobe']}" if r["nprobe"] else "") for r in rows]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    x = np.arange(len(rows))
    ax1.bar(x - 0.2, [r["single"]["p50_ms"] for r in rows], 0.4, label="plain search")
    ax1.bar(x + 0.2, [r.get("lookahead", {}).get("single", {}).get("after_rtt", {}).get("p50_ms", 0) for r in rows],
            0.4, label=f"lookahead, after a simulated {results.get('rtt_ms', 0):g} ms RTT")
    ax1.set_ylabel("single-query latency p50 (ms)")
    ax1.set_yscale("log")
    for i, r in enumerate(rows):
        ax1.annotate(f"R@{results['k']}={r['recall_at_k']:.3f}", (i, r["single"]["p50_ms"]), ha="center",
                     va="bottom", fontsize=7)
    ax2.bar(x - 0.2, [r["batched"]["queries_per_s"] for r in rows], 0.4, label="plain search")
    ax2.bar(x + 0.2, [r.get("lookahead", {}).get("batched_after_rtt", {}).get("queries_per_s", 0) for r in rows],
            0.4, label="lookahead (after RTT)")
    ax2.set_ylabel(f"batched throughput, batches of {rows[0]['batched']['batch']} (queries/s)")
    for ax in (ax1, ax2):
        ax.set_xticks(x, labels, fontsize=8)
        ax.legend(fontsize=8)
    m = results["corpus"]
    where = "lookahead on the GPU store (torch)" if results.get("store") == "gpu" else "lookahead on the CPU store"
    fig.suptitle(f"Retrieval, faiss-cpu {results['threads']} threads vs {where}; SYNTHETIC {m['n']:,} x "
                 f"{m['dim']}-d gaussian clusters", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def table(results: dict) -> str:
    """The README's markdown table of one results file."""
    head = ("| index | nprobe | build s | index MB | recall@{k} | single p50 ms | batch {b} q/s "
            "| lookahead after RTT p50 ms | lookahead batch q/s | cache hit rate | = plain IVF |")
    rows = results["configs"]
    out = [head.format(k=results["k"], b=rows[0]["batched"]["batch"]), "|" + "---|" * 11]
    for r in rows:
        la = r.get("lookahead")
        cells = [r["kind"], r["nprobe"] or "-", r["build"]["build_s"], round(r["build"]["index_bytes"] / 2**20),
                 r["recall_at_k"], r["single"]["p50_ms"], r["batched"]["queries_per_s"],
                 la["single"]["after_rtt"]["p50_ms"] if la else "-",
                 la["batched_after_rtt"]["queries_per_s"] if la else "-",
                 round(la["single"]["cache_hit_rate"], 3) if la else "-",
                 ("yes" if la["equal_to_plain_ivf"] else "NO") if la else "-"]
        out.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(out)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_retrieval", description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=1_000_000, help="synthetic vectors (default: %(default)s)")
    p.add_argument("--corpus", type=Path, default=None, help="synthetic corpus folder (default: /tmp/dragon_synth_N)")
    p.add_argument("--clusters", type=int, default=4096, help="gaussian topics of a generated corpus")
    p.add_argument("--kinds", nargs="+", default=["ivf-flat", "ivf-pq"], choices=["ivf-flat", "ivf-pq"])
    p.add_argument("--nlist", type=int, default=1024)
    p.add_argument("--nprobe", type=int, nargs="+", default=[8, 32])
    p.add_argument("--pq-m", type=int, default=48)
    p.add_argument("--queries", type=int, default=200)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--threads", type=int, default=1,
                   help="faiss OpenMP threads (default 1: on a shared 2-core box 2 threads spin and train ~7x slower)")
    p.add_argument("--rtt-ms", type=float, default=20.0, help="simulated round trip between open and search")
    p.add_argument("--budget-fraction", type=float, default=0.15, help="cluster cache size, fraction of the lists")
    p.add_argument("--spaced", action="store_true",
                   help="also time the baselines' single queries arriving --rtt-ms apart, as the lookahead's do")
    p.add_argument("--no-lookahead", dest="lookahead", action="store_false")
    p.add_argument("--store", choices=["cpu", "gpu"], default="cpu", help="cluster store of the lookahead path")
    p.add_argument("--gpu-whole-index", action="store_true",
                   help="also baseline (b): every IVF-Flat list resident in GPU memory (the torch store)")
    p.add_argument("--build-device", default=None,
                   help="torch device for the IVF k-means and assignment, and the exact truth (e.g. cuda)")
    p.add_argument("--skip-flat", action="store_true",
                   help="no flat row; the exact truth computed block by block on --build-device (10M+)")
    p.add_argument("--workers", type=int, default=1, help="processes generating a synthetic corpus")
    p.add_argument("--store-device", default="cuda", help="torch device of --store gpu (cpu: a smoke test)")
    p.add_argument("--out", type=Path, default=RESULTS / "retrieval_cpu.json")
    p.add_argument("--table", type=Path, default=None, metavar="JSON",
                   help="only print the markdown table of a results file")
    return p


def main(argv: list[str] | None = None) -> int:
    from benchmarks.environment import describe

    a = parser().parse_args(argv)
    if a.table:
        print(table(json.loads(a.table.read_text())))
        return 0
    t0 = time.perf_counter()
    a.out.parent.mkdir(parents=True, exist_ok=True)
    results = run(a)
    results.update(rtt_ms=a.rtt_ms, store=a.store, seconds=round(time.perf_counter() - t0, 1),
                   note=("SYNTHETIC corpus; " + ("the lookahead cache is TeleRAG's GPU buffer (torch store)"
                         if a.store == "gpu" else "on CPU the lookahead cache is a host-memory copy (no speed-up "
                         "possible); TeleRAG's latency goals are GPU goals")),
                   environment=describe(["faiss-cpu", "torch", "numpy"]))
    a.out.write_text(json.dumps(results, indent=2) + "\n")
    a.out.with_suffix(".partial.json").unlink(missing_ok=True)
    plot(results, a.out.with_suffix(".png"))
    print(table(results))
    print(f"wrote {a.out} and {a.out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # shared cores: no spinning OpenMP threads
    raise SystemExit(main())
