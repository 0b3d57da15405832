"""IVF builds on a torch device: the coarse k-means and the list assignment of every vector.

At 10M+ passages these two are the build's cost on a CPU (the assignment alone is n x nlist x d
multiply-adds: minutes on 16 cores); on a GPU they take seconds. faiss still owns the index: the
centroids become its coarse quantizer (so ``index.train`` only trains PQ codebooks, if any) and
the vectors enter their lists through ``add_core`` with the assignment precomputed here.

Spherical k-means, as the CPU path (``cp.spherical``): unit-norm data, inner product, centroids
renormalised after each update; an emptied centroid is re-seeded on a random training point.
"""

from __future__ import annotations

import numpy as np

KMEANS_ITERS = 20  # faiss's default is 25; spherical k-means on 64 points per list settles sooner
ASSIGN_BLOCK = 1 << 16  # vectors per assignment block (a block's scores: block x nlist float32)


def kmeans(sample: np.ndarray, nlist: int, device: str, seed: int = 0, iters: int = KMEANS_ITERS) -> np.ndarray:
    """``nlist`` unit centroids of ``sample`` (spherical k-means on ``device``), float32 on the host."""
    import torch

    gen = torch.Generator(device="cpu").manual_seed(seed)
    x = torch.from_numpy(np.ascontiguousarray(sample, dtype=np.float32)).to(device)
    c = x[torch.randperm(len(x), generator=gen)[:nlist].to(device)].clone()
    for _ in range(iters):
        assign = _nearest(x, c)
        sums = torch.zeros_like(c).index_add_(0, assign, x)
        counts = torch.bincount(assign, minlength=nlist)
        empty = (counts == 0).nonzero(as_tuple=True)[0]
        if len(empty):  # re-seed on random points (faiss splits a big cluster; a random point is enough here)
            sums[empty] = x[torch.randint(len(x), (len(empty),), generator=gen).to(device)]
        c = sums / torch.linalg.vector_norm(sums, dim=1, keepdim=True).clamp_min(1e-12)
    return c.cpu().numpy()


def assign(vecs: np.ndarray, centroids: np.ndarray, device: str, block: int = ASSIGN_BLOCK):
    """Yield (start, block of vectors, their list numbers) over ``vecs`` (may be a memory map)."""
    import torch

    c = torch.from_numpy(np.ascontiguousarray(centroids, dtype=np.float32)).to(device)
    for start in range(0, len(vecs), block):
        x = np.ascontiguousarray(vecs[start : start + block], dtype=np.float32)
        lists = _nearest(torch.from_numpy(x).to(device), c)
        yield start, x, lists.cpu().numpy().astype(np.int64)


def add_assigned(index, vecs: np.ndarray, centroids: np.ndarray, device: str) -> None:
    """Fill a trained IVF index with ``vecs`` (row i = id i), lists chosen on ``device``."""
    import faiss

    ivf = faiss.extract_index_ivf(index)
    for start, x, lists in assign(vecs, centroids, device):
        ids = np.arange(start, start + len(x), dtype=np.int64)
        ivf.add_core(len(x), faiss.swig_ptr(x), faiss.swig_ptr(ids), faiss.swig_ptr(lists))
    index.ntotal = ivf.ntotal


def _nearest(x, c):
    """Row-wise argmax of inner products, in blocks (a block's scores fit in memory)."""
    import torch

    out = torch.empty(len(x), dtype=torch.int64, device=x.device)
    step = max(1, (1 << 28) // max(1, len(c)))  # <= 256M scores (1 GiB) at a time
    for s in range(0, len(x), step):
        out[s : s + step] = (x[s : s + step] @ c.T).argmax(dim=1)
    return out
