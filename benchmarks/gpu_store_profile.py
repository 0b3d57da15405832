"""Where the GPU cluster store's time goes (issue 15, a diagnostic for the GPU machine).

    python -m benchmarks.gpu_store_profile --n 10000000 --corpus /tmp/synth --out $OUT/gpu_store_profile.json

Prints and writes: the memlock limit and what ``cudaHostRegister`` answers for a few lists (the
10M run reported 0 bytes pinned), the time to copy one query's probed lists in (pinned or not),
and a cProfile of single searches with every list resident (baseline b) and after a lookahead.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import resource
import time
from pathlib import Path

import numpy as np

from benchmarks import synthetic_corpus as synth
from benchmarks.bench_retrieval import build, gpu_whole_index


def pin_probe(index) -> dict:
    """What cudaHostRegister answers for the first lists, with both flag values."""
    import faiss
    import torch

    from dragon_vllm.corpus.cluster_store import ivf_of
    from dragon_vllm.corpus.gpu_store import _list_vectors

    ivf = ivf_of(index)
    cudart, out = torch.cuda.cudart(), []
    for c in range(4):
        v = _list_vectors(faiss, ivf.invlists, c, ivf.invlists.list_size(c), ivf.d)
        row = {"list": c, "addr_mod_4096": int(v.ctypes.data % 4096), "bytes": int(v.nbytes)}
        for flags in (0, 1):
            rc = cudart.cudaHostRegister(v.ctypes.data, v.nbytes, flags)
            row[f"flags{flags}"] = str(rc)
            if int(rc) == 0:
                cudart.cudaHostUnregister(v.ctypes.data)
        out.append(row)
    t = torch.empty((1 << 20, 384), dtype=torch.float32, pin_memory=True)
    return {"memlock": resource.getrlimit(resource.RLIMIT_MEMLOCK), "lists": out,
            "torch_pin_memory_ok": bool(t.is_pinned())}


def copy_times(index, xq, pin: bool) -> dict:
    """One query's probed lists copied into a fresh 15% store, timed (pinned host lists or not)."""
    import torch

    from dragon_vllm.corpus.cluster_store import ivf_of, list_bytes
    from dragon_vllm.corpus.gpu_store import GpuClusterStore

    t0 = time.perf_counter()
    store = GpuClusterStore(index, int(list_bytes(index).sum() * 0.15), pin_host=pin)
    setup = time.perf_counter() - t0
    ivf = ivf_of(index)
    _, probes = ivf.quantizer.search(xq[:8], ivf.nprobe)
    times = []
    for row in probes:
        store.drop(sorted(store.resident()))
        torch.cuda.synchronize()
        t = time.perf_counter()
        store.copy_in([int(c) for c in row])
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    moved = sum(int(list_bytes(index)[c]) for c in probes[-1])
    store.close()
    return {"pin": pin, "pinned_bytes": store.pinned_bytes, "setup_s": round(setup, 2),
            "copy_ms": [round(x * 1e3, 2) for x in times], "bytes_per_query": moved}


def host_scan(index, qb) -> dict:
    """Batch of 64: plain faiss search vs the lookahead's host part (70% of the probes masked), ms."""
    import faiss
    import torch

    from dragon_vllm.corpus.cluster_store import HostLists

    ivf = faiss.extract_index_ivf(index)
    coarse, probes = ivf.quantizer.search(qb, ivf.nprobe)
    masked = np.where(np.random.default_rng(0).random(probes.shape) < 0.7, -1, probes)
    host = HostLists(index)

    def ms(fn) -> float:
        t = time.perf_counter()
        for _ in range(3):
            fn()
        return round((time.perf_counter() - t) / 3 * 1e3, 2)

    out = {"plain": ms(lambda: index.search(qb, 10)), "host_masked": ms(lambda: host.scan_ids(qb, masked, coarse, 10)),
           "host_all": ms(lambda: host.scan_ids(qb, probes, coarse, 10)), "torch_threads": torch.get_num_threads()}
    torch.set_num_threads(1)
    out["host_masked_torch1"] = ms(lambda: host.scan_ids(qb, masked, coarse, 10))
    out["plain_after"] = ms(lambda: index.search(qb, 10))
    return out


def profiled(fn, reps: int) -> dict:
    prof = cProfile.Profile()
    t = time.perf_counter()
    prof.enable()
    for _ in range(reps):
        fn()
    prof.disable()
    wall = (time.perf_counter() - t) / reps
    s = io.StringIO()
    pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(32)
    return {"ms_per_call": round(wall * 1e3, 3), "top": s.getvalue().splitlines()[:60]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=10_000_000)
    p.add_argument("--corpus", type=Path, default=Path("/tmp/synth"))
    p.add_argument("--nlist", type=int, default=4096)
    p.add_argument("--nprobe", type=int, default=32)
    p.add_argument("--threads", type=int, default=16)
    p.add_argument("--out", type=Path, required=True)
    a = p.parse_args()
    import faiss

    faiss.omp_set_num_threads(a.threads)
    if not (a.corpus / "synthetic.json").is_file():
        synth.generate(a.corpus, a.n, passages=False, workers=16)
    vecs, xq, _ = synth.load(a.corpus)
    index, _ = build(vecs, "ivf-flat", a.nlist, 16, "cuda")
    faiss.extract_index_ivf(index).nprobe = a.nprobe
    out: dict = {"n": a.n, "nlist": a.nlist, "nprobe": a.nprobe}
    out["pin_probe"] = pin_probe(index)
    print(json.dumps(out["pin_probe"]), flush=True)
    out["copy"] = [copy_times(index, xq, pin) for pin in (True, False)]
    print(json.dumps(out["copy"]), flush=True)
    g, _ = gpu_whole_index(index)
    q = np.ascontiguousarray(xq[:1])
    for _ in range(5):
        g.search_now(q, 10)
    out["whole_single"] = profiled(lambda: g.search_now(q, 10), 100)
    qb = np.ascontiguousarray(xq[:64])
    out["whole_batch64"] = profiled(lambda: g.search_now(qb, 10), 10)
    g.close()
    from dragon_vllm.corpus.cluster_store import list_bytes
    from dragon_vllm.corpus.lookahead import LookaheadSearcher

    s = LookaheadSearcher(index, budget_bytes=int(list_bytes(index).sum() * 0.15), store="gpu")
    queries = iter(range(10_000))

    def one(batch: int) -> None:
        i = next(queries) % (len(xq) // batch)
        la = s.open(np.ascontiguousarray(xq[i * batch:(i + 1) * batch]))
        time.sleep(0.02)  # the round trip
        s.search(la, 10)

    for _ in range(20):
        one(1)
    out["lookahead_single"] = profiled(lambda: one(1), 100)
    out["lookahead_batch64"] = profiled(lambda: one(64), 5)
    s.close()
    out["host_scan"] = host_scan(index, np.ascontiguousarray(xq[:64]))
    print(json.dumps(out["host_scan"]), flush=True)
    a.out.write_text(json.dumps(out, indent=1) + "\n")
    for key in ("whole_single", "whole_batch64", "lookahead_single", "lookahead_batch64"):
        print(key, out[key]["ms_per_call"])
        print("\n".join(line[:160] for line in out[key]["top"][8:40]))


if __name__ == "__main__":
    main()
