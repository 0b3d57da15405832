"""A servable public index of real passages padded with SYNTHETIC vectors to a large index's size.

``dragon-cloud serve --index DIR`` needs a whole index folder (``dragon_vllm.corpus.layout``):
faiss index, passages, manifest with the retriever's fingerprint. This writes one from a real,
built index (its passages and their MiniLM vectors) and a synthetic corpus
(``benchmarks.synthetic_corpus``: N clustered 384-d unit vectors, no text): an IVF-Flat index
over all of them, the synthetic rows first (ids ``0..N-1``, placeholder passages labelled
SYNTHETIC), the real ones after (ids ``N..N+r-1``, their own text). Every search costs what an
index of ``N + r`` passages costs: the coarse quantizer is trained on the synthetic mixture, so
a query probes lists of the usual size, and the real vectors sit in those lists too. Which
passages a real question gets is not the small index's alone: its real passages may sit in
lists it does not probe (the clusters were not drawn around real text), and a synthetic row
(cosine ~0.2 at best with a real query) then enters its top-k. A placeholder passage has a real
passage's length (64 words), so the prompts cost the same either way.

The folder is built beside its target and renamed into place when complete; a folder already
built with the same parameters is reused (``ensure_padded_index``), so a benchmark cut short
by its time limit does not rebuild 15 GB on its next call.
"""

from __future__ import annotations

import json
import shutil
import sqlite3
import time
from pathlib import Path

import numpy as np

from benchmarks import synthetic_corpus as synth

PLACEHOLDER_TITLE = synth.LABEL
ROWS_PER_INSERT = 1 << 16
# A placeholder as long as a real passage (64 words, the corpus's chunk size): where a synthetic
# row reaches a question's top-k, its prompt costs what a real passage's would (10M rows: 3.7 GB)
_FILLER = (f"{synth.LABEL} placeholder passage {{i}} padding the public index to a large index's size: it "
           "holds no real text, only as many words as a real passage has, so that a prompt laid out around it "
           "costs what a real one costs. ").split()
PLACEHOLDER = " ".join((_FILLER * 3)[:64])


def ensure_padded_index(real_dir: Path, corpus: Path, out: Path, *, n: int, nlist: int, nprobe: int,
                        build_device: str | None = None, workers: int = 1) -> dict:
    """``out`` holds the padded index of ``real_dir`` + ``n`` synthetic vectors (generated into
    ``corpus`` if missing); returns its manifest. Reused when built with the same parameters."""
    params = dict(real=str(Path(real_dir).resolve()), synthetic=n, nlist=nlist, nprobe=nprobe)
    existing = _manifest(out)
    if existing is not None and existing.get("build", {}).get("padded") == params:
        return existing
    if not (corpus / "synthetic.json").is_file() or synth.load(corpus)[2]["n"] != n:
        if corpus.exists() and any(corpus.iterdir()) and not (corpus / "synthetic.json").is_file():
            raise FileExistsError(f"{corpus} is not a synthetic corpus; refusing to replace it")
        shutil.rmtree(corpus, ignore_errors=True)  # another size: regenerated
        synth.generate(corpus, n, passages=False, workers=workers)
    return build_padded_index(real_dir, corpus, out, params, build_device)


def build_padded_index(real_dir: Path, corpus: Path, out: Path, params: dict, build_device: str | None) -> dict:
    from dragon_host.files import install
    from dragon_vllm.corpus import PublicIndex
    from dragon_vllm.corpus.layout import INDEX_FILE, MANIFEST, PASSAGES_FILE

    t0 = time.perf_counter()
    real = PublicIndex.load(real_dir)
    try:
        real_ids = list(range(len(real)))
        real_vecs = real.vectors(real_ids)
        real_rows = [real.passage(i) for i in real_ids]
        real_manifest = real.manifest
    finally:
        real.close()
    vecs, _, meta = synth.load(corpus)
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        t1 = time.perf_counter()
        info = _write_faiss(tmp / INDEX_FILE, vecs, real_vecs, params, build_device)
        t2 = time.perf_counter()
        _write_passages(tmp / PASSAGES_FILE, len(vecs), real_rows)
        t3 = time.perf_counter()
        manifest = _padded_manifest(real_manifest, meta, info, params, len(vecs) + len(real_rows), tmp,
                                    dict(read=round(t1 - t0, 2), index=round(t2 - t1, 2), passages=round(t3 - t2, 2)))
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        install(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return manifest


def _write_faiss(path: Path, synthetic: np.ndarray, real: np.ndarray, params: dict, build_device: str | None) -> dict:
    """IVF-Flat trained and filled with the synthetic rows (ids 0..N-1; on ``build_device`` where
    given: ``dragon_vllm.corpus.gpu_build``), then the real rows added as ids N..N+r-1."""
    import faiss

    from dragon_vllm.corpus.ivf import IndexSpec, build_faiss_index

    index, info = build_faiss_index(synthetic, IndexSpec(kind="ivf-flat", nlist=params["nlist"],
                                                         nprobe=params["nprobe"]), device=build_device)
    n = len(synthetic)
    index.add_with_ids(np.ascontiguousarray(real, dtype=np.float32), np.arange(n, n + len(real), dtype=np.int64))
    faiss.write_index(index, str(path))
    return info


def _write_passages(path: Path, n_synthetic: int, real_rows: list[tuple[str, str]]) -> None:
    conn = sqlite3.connect(path)
    try:
        conn.executescript("PRAGMA journal_mode=OFF; PRAGMA synchronous=OFF;"
                           "CREATE TABLE passages (id INTEGER PRIMARY KEY, title TEXT NOT NULL, text TEXT NOT NULL);")
        for start in range(0, n_synthetic, ROWS_PER_INSERT):
            stop = min(n_synthetic, start + ROWS_PER_INSERT)
            conn.executemany("INSERT INTO passages VALUES (?, ?, ?)",
                             ((i, PLACEHOLDER_TITLE, PLACEHOLDER.replace("{i}", str(i), 1)) for i in range(start, stop)))
        conn.executemany("INSERT INTO passages VALUES (?, ?, ?)",
                         ((n_synthetic + j, title, text) for j, (title, text) in enumerate(real_rows)))
        conn.commit()
    finally:
        conn.close()


def _padded_manifest(real: dict, meta: dict, info: dict, params: dict, passages: int, folder: Path,
                     seconds: dict) -> dict:
    from dragon_vllm.corpus.layout import INDEX_FILE, PASSAGES_FILE

    keep = ("format", "version", "retriever_fingerprint", "model_fingerprint", "score_function", "dim")
    return {
        **{k: real[k] for k in keep if k in real},
        "passages": passages, "documents": real.get("documents", 0) + params["synthetic"],
        "index": info,
        "build": {"padded": params, "synthetic": meta, "seconds": seconds,
                  "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                  "note": f"{synth.LABEL}: ids 0..{params['synthetic'] - 1} are placeholder passages of random "
                          f"clustered vectors; the real passages follow"},
        "sources": real.get("sources", []),
        # no sha256: hashing 15 GB costs a benchmark call half a minute; load checks the sizes
        "files": {name: {"bytes": (folder / name).stat().st_size, "sha256": None} for name in (INDEX_FILE, PASSAGES_FILE)},
    }


def _manifest(out: Path) -> dict | None:
    try:
        return json.loads((out / "manifest.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None
