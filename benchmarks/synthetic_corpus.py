"""A SYNTHETIC clustered corpus for scale tests of the public index: no real text, no real embeddings.

Vectors are 384-d (all-MiniLM-L6-v2's dimension) draws around ``--clusters`` random unit
"topic" centres, with uneven topic sizes (log-normal weights, as real corpora have), unit-norm
like the embedder's output; queries come from the same mixture. Passages are placeholders that
say they are synthetic. Everything is streamed in chunks of ``--chunk`` rows (a 1M x 384
float32 corpus is 1.5 GB on disk and never more than one chunk in memory; 10M/50M are for the
GPU machine's disk).

    python -m benchmarks.synthetic_corpus --n 1000000 --out /tmp/synth1m
    -> vectors.npy (n x 384 float32), queries.npy, clusters.npy (topic of each row, int32),
       passages.jsonl.gz (placeholders, --no-passages to skip), synthetic.json (parameters)

Real text for correctness comes from the existing corpora (tests/io/test_corpus.py).
"""

from __future__ import annotations

import argparse
import gzip
import json
import time
from pathlib import Path

import numpy as np

DIM = 384  # all-MiniLM-L6-v2
LABEL = "SYNTHETIC"


def centres(clusters: int, dim: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Unit topic centres and their (uneven) probabilities."""
    rng = np.random.default_rng(seed)
    c = rng.standard_normal((clusters, dim)).astype(np.float32)
    c /= np.linalg.norm(c, axis=1, keepdims=True)
    w = rng.lognormal(0.0, 1.0, clusters)
    return c, w / w.sum()


def draw(rng: np.random.Generator, c: np.ndarray, p: np.ndarray, n: int, spread: float) -> tuple[np.ndarray, np.ndarray]:
    """``n`` unit vectors: a centre plus isotropic noise of norm ~``spread``."""
    topic = rng.choice(len(c), size=n, p=p).astype(np.int32)
    x = rng.standard_normal((n, c.shape[1]), dtype=np.float32) * np.float32(spread / np.sqrt(c.shape[1]))
    x += c[topic]
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x, topic


def generate(out: Path, n: int, *, dim: int = DIM, clusters: int = 4096, spread: float = 1.0, queries: int = 1000,
             chunk: int = 1 << 16, seed: int = 0, passages: bool = True, workers: int = 1) -> dict:
    """Write the corpus into ``out`` chunk by chunk; return its description (synthetic.json).
    ``workers`` > 1 (vectors only): chunks drawn in parallel processes, the same bytes."""
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    c, p = centres(clusters, dim, seed)
    vecs = np.lib.format.open_memmap(out / "vectors.npy", mode="w+", dtype=np.float32, shape=(n, dim))
    topics = np.lib.format.open_memmap(out / "clusters.npy", mode="w+", dtype=np.int32, shape=(n,))
    del vecs, topics  # each writer maps them again
    starts = range(0, n, chunk)
    if workers > 1 and not passages:
        import multiprocessing

        with multiprocessing.get_context("fork").Pool(workers) as pool:
            pool.starmap(_fill, [(out, s, min(chunk, n - s), seed, c, p, spread) for s in starts])
    else:
        text = gzip.open(out / "passages.jsonl.gz", "wt", encoding="utf-8", compresslevel=1) if passages else None
        try:
            for start in starts:
                t = _fill(out, start, min(chunk, n - start), seed, c, p, spread)
                if text is not None:
                    text.writelines(_placeholder(start + i, int(ti)) for i, ti in enumerate(t))
        finally:
            if text is not None:
                text.close()
    xq, _ = draw(np.random.default_rng([seed, -1 % (1 << 32)]), c, p, queries, spread)
    np.save(out / "queries.npy", xq)
    meta = {"synthetic": True, "label": f"{LABEL}: gaussian clusters, not real passages or embeddings",
            "n": n, "dim": dim, "clusters": clusters, "spread": spread, "queries": queries, "seed": seed,
            "passages": passages, "seconds": round(time.perf_counter() - t0, 2)}
    (out / "synthetic.json").write_text(json.dumps(meta, indent=2) + "\n")
    return meta


def _fill(out: Path, start: int, rows: int, seed: int, c: np.ndarray, p: np.ndarray, spread: float) -> np.ndarray:
    """Draw rows ``start ..`` into the corpus files (per chunk seed: any order, any process)."""
    x, t = draw(np.random.default_rng([seed, start]), c, p, rows, spread)
    vecs = np.load(out / "vectors.npy", mmap_mode="r+")
    topics = np.load(out / "clusters.npy", mmap_mode="r+")
    vecs[start : start + rows], topics[start : start + rows] = x, t
    vecs.flush()
    topics.flush()
    return t


def _placeholder(i: int, topic: int) -> str:
    return json.dumps({"title": f"{LABEL} topic {topic}",
                       "text": f"{LABEL} placeholder passage {i} of gaussian topic {topic}; not real text."}) + "\n"


def load(out: Path) -> tuple[np.ndarray, np.ndarray, dict]:
    """(vectors as a read-only memory map, queries, description) of a generated corpus."""
    meta = json.loads((out / "synthetic.json").read_text())
    return np.load(out / "vectors.npy", mmap_mode="r"), np.load(out / "queries.npy"), meta


def main(argv: list[str] | None = None) -> int:
    a = argparse.ArgumentParser(prog="python -m benchmarks.synthetic_corpus", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    a.add_argument("--n", type=int, default=1_000_000, help="vectors (default: %(default)s)")
    a.add_argument("--out", type=Path, required=True, help="folder to write")
    a.add_argument("--dim", type=int, default=DIM)
    a.add_argument("--clusters", type=int, default=4096, help="gaussian topics (default: %(default)s)")
    a.add_argument("--spread", type=float, default=1.0, help="noise norm around a topic centre (default: %(default)s)")
    a.add_argument("--queries", type=int, default=1000)
    a.add_argument("--chunk", type=int, default=1 << 16, help="rows generated at once (default: %(default)s)")
    a.add_argument("--seed", type=int, default=0)
    a.add_argument("--no-passages", dest="passages", action="store_false", help="skip the placeholder passages")
    a.add_argument("--workers", type=int, default=1, help="processes drawing chunks (with --no-passages)")
    args = a.parse_args(argv)
    meta = generate(args.out, args.n, dim=args.dim, clusters=args.clusters, spread=args.spread, queries=args.queries,
                    chunk=args.chunk, seed=args.seed, passages=args.passages, workers=args.workers)
    print(json.dumps(meta))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
