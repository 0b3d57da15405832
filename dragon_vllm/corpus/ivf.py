"""The faiss index of a public corpus: which kind (flat, IVF-Flat, IVF-PQ), with which
parameters, and how it is trained and filled from vectors that may not fit in RAM.

IVF indexes keep faiss's default ``ArrayInvertedLists``: one contiguous codes array and one
ids array per list in host memory. That is the layout the lookahead cluster cache copies from
(a list = one ``memcpy``; ``dragon_vllm/corpus/lookahead.py``), on the GPU machine into a
device buffer.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

from dragon_vllm.corpus.errors import CorpusCorrupt, CorpusInputError

KINDS = ("auto", "flat", "ivf-flat", "ivf-pq")
MIN_NPROBE = 32
ADD_BLOCK = 1 << 16  # vectors per faiss add(): bounds the copy out of a memory map
TRAIN_PER_LIST = 64  # k-means training points per list (faiss warns under 39)
PQ_TRAIN_MIN = 32_768  # PQ codebooks: 128 points per centroid of a sub-quantizer (faiss wants >= 39)


def ivf_nlist(n: int) -> int:
    """~4 sqrt(n) lists, and at least 8 training points per list for tiny forced-IVF builds."""
    return max(1, min(int(4 * math.sqrt(n)), n // 8))


def default_nprobe(nlist: int) -> int:
    """An eighth of the lists (at least 32): recall@4 vs flat was 0.95 at nlist/7 on WikiText-2
    with NQ questions (docs/CORPUS.md); scanning 1/8 of the vectors is still cheap."""
    return min(nlist, max(MIN_NPROBE, nlist // 8))


@dataclass(frozen=True)
class IndexSpec:
    """What to build. ``kind="auto"`` is the historical default: flat under ``ivf_threshold``
    passages, IVF-Flat from there on."""

    kind: str = "auto"
    nlist: int | None = None  # None: ivf_nlist(n)
    nprobe: int | None = None  # None: default_nprobe(nlist)
    pq_m: int = 48  # IVF-PQ sub-quantizers: 48 x 8 bits = 48 bytes per 384-d vector (32x smaller)
    pq_nbits: int = 8  # bits per sub-quantizer code (4: 16 centroids, quick to train, coarser)
    ivf_threshold: int = 50_000

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise CorpusInputError(f"unknown index kind {self.kind!r}; one of {', '.join(KINDS)}")
        for name in ("nlist", "nprobe"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or v < 1):
                raise CorpusInputError(f"--{name} must be a positive integer, got {v!r}")
        if self.pq_m < 1:
            raise CorpusInputError(f"--pq-m must be a positive integer, got {self.pq_m!r}")
        if self.pq_nbits not in (4, 6, 8, 10, 12):
            raise CorpusInputError(f"--pq-nbits must be 4, 6, 8, 10 or 12, got {self.pq_nbits!r}")

    def resolve(self, n: int) -> str:
        """The concrete kind for ``n`` vectors."""
        if self.kind != "auto":
            return self.kind
        return "flat" if n < self.ivf_threshold else "ivf-flat"


def build_faiss_index(vecs: np.ndarray, spec: IndexSpec, seed: int = 0, device: str | None = None):
    """Train (on a sample) and fill an index with ``vecs`` (row i = id i; may be a memory map).
    ``device`` (IVF kinds): None for faiss's own k-means and assignment, or a torch device where
    they run instead ("cuda" on the GPU machine: seconds instead of minutes at 10M;
    ``gpu_build.py``). Returns the index and the manifest's ``index`` entry."""
    import faiss

    n, dim = vecs.shape
    kind = spec.resolve(n)
    if kind == "flat":
        index, info = faiss.IndexFlatIP(dim), {"type": "flat", "kind": "flat", "factory": "Flat"}
    else:
        index, info, centroids = _trained_ivf(vecs, kind, spec, seed, device)
        if centroids is not None:
            from dragon_vllm.corpus.gpu_build import add_assigned

            add_assigned(index, vecs, centroids, device)
            return index, {**info, "build_device": device}
    for start in range(0, n, ADD_BLOCK):
        index.add(np.ascontiguousarray(vecs[start : start + ADD_BLOCK], dtype=np.float32))
    return index, info


def _trained_ivf(vecs: np.ndarray, kind: str, spec: IndexSpec, seed: int, device: str | None = None):
    import faiss

    n, dim = vecs.shape
    nlist = min(spec.nlist or ivf_nlist(n), n)
    if kind == "ivf-pq" and dim % spec.pq_m:
        raise CorpusInputError(f"--pq-m {spec.pq_m} does not divide the dimension {dim}")
    train_n = min(n, TRAIN_PER_LIST * nlist)
    nbits = spec.pq_nbits
    if kind == "ivf-pq":
        train_n = min(n, max(train_n, PQ_TRAIN_MIN))
        nbits = min(nbits, 8 if train_n >= 1024 else 4)  # tiny corpora: 16 centroids per sub-quantizer
    factory = f"IVF{nlist},Flat" if kind == "ivf-flat" else f"IVF{nlist},PQ{spec.pq_m}x{nbits}"
    index = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    ivf = faiss.extract_index_ivf(index)
    ivf.cp.spherical = True  # unit-norm vectors, inner-product metric: keep centroids on the sphere
    ivf.cp.min_points_per_centroid = 1  # tiny forced-IVF builds: no faiss warning spam
    rows = np.sort(np.random.default_rng(seed).choice(n, size=train_n, replace=False))
    sample = np.ascontiguousarray(vecs[rows], dtype=np.float32)  # fancy indexing of a memmap: only the sample
    centroids = None
    if device is not None:  # the coarse k-means on the device; faiss then trains only what is left (PQ)
        from dragon_vllm.corpus.gpu_build import kmeans

        centroids = kmeans(sample, nlist, device, seed)
        ivf.quantizer.add(centroids)
    index.train(sample)
    ivf.nprobe = min(spec.nprobe, nlist) if spec.nprobe else default_nprobe(nlist)
    info = {"type": "ivf", "kind": kind, "factory": factory, "nlist": nlist, "nprobe": int(ivf.nprobe),
            "train_size": int(train_n)}
    if kind == "ivf-pq":
        info.update(pq_m=spec.pq_m, pq_nbits=nbits)
    return index, info, centroids


def check_index_info(info: object, where: str) -> dict:
    """The manifest's ``index`` entry, validated: :class:`CorpusCorrupt` names what is wrong.
    Manifests written before ``kind`` existed say only ``type`` (flat or IVF-Flat)."""
    if not isinstance(info, dict) or info.get("type") not in ("flat", "ivf"):
        raise CorpusCorrupt(f"{where}: the manifest's index entry is not a flat or IVF index: {info!r}")
    kind = info.get("kind", "flat" if info["type"] == "flat" else "ivf-flat")
    if kind not in KINDS[1:] or (kind == "flat") != (info["type"] == "flat"):
        raise CorpusCorrupt(f"{where}: unknown index kind {kind!r} (type {info['type']!r})")
    if kind != "flat":
        for name in ("nlist", "nprobe"):
            if not isinstance(info.get(name), int) or info[name] < 1:
                raise CorpusCorrupt(f"{where}: the manifest's {name} is {info.get(name)!r}, not a positive integer")
    return {**info, "kind": kind}


def spec_dict(spec: IndexSpec) -> dict:
    return asdict(spec)
