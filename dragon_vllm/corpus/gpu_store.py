"""TeleRAG's GPU cluster buffer: cached IVF-Flat lists in a fixed block of GPU memory, scanned there.

The :class:`~dragon_vllm.corpus.lookahead.LookaheadSearcher` calls the same three methods as on
:class:`~dragon_vllm.corpus.cluster_store.CpuClusterStore`:

* ``copy_in(clusters)``: host lists -> the buffer. The buffer is carved once, at start, from
  what vLLM leaves (``budget_bytes``), in pages of ``PAGE_ROWS`` vectors: a list takes any free
  pages, so eviction never fragments it. The cache budgets in whole pages
  (``list_cost_bytes``), so the carve is the budget, not more. All of a request's lists go in
  one pass on a side CUDA stream, from page-locked host memory where ``pin_host`` registered
  them: one async copy per list, then one write of every page, row table and norm. It overlaps
  the link round trip and the prefills; the lists are published to scans only once the side
  stream is done, and the side stream first waits for the default stream (a reused page's drop
  and earlier scans come first).
* ``drop(clusters)``: their pages go back to the free list (the cache decided; nothing moves).
* ``scan(x, probes, coarse, k)``: for each query, every candidate of its probed, resident
  lists whose score is at least the query's k-th, with its store_pairs label (list << 32 | offset).

Why the results equal faiss-cpu's, id for id and score for score: the GPU's float32 dot products
are summed in another order than faiss's, so they may differ from faiss's in the last bits. The
GPU only *selects*: it keeps every row within ``tol`` of its k-th GPU score, where ``tol`` is twice
the worst-case float32 error of a d-term dot product under any summation order
(``2 * 2 * gamma_d * |x| * max|y|``, gamma_d = d u / (1 - d u), u = 2^-24; TF32 is refused). An
item whose faiss score reaches the faiss k-th is always among them (module test). The kept few
are then re-scored on the CPU with faiss's own kernel (``fvec_inner_products_ny``, bitwise the
IVF-Flat scanner's score) and cut at the exact k-th, so the merge (``merge.replay``) sees faiss's
numbers.

Torch, not faiss-gpu: PyPI has faiss-gpu only for CUDA 12 (``faiss-gpu-cu12``, plus ~700 MB of
CUDA 12 runtime wheels), the GPU machine runs CUDA 13, and vLLM's own torch is there already.
On a machine without a GPU, ``device="cpu"`` runs this very code on torch's CPU backend (the
tests do), though only the CUDA device makes it fast. IVF-PQ lists stay on the CPU store.
"""

from __future__ import annotations

import contextlib
import heapq
import threading

import numpy as np

from dragon_vllm.corpus.cluster_store import PAIR_SHIFT, ivf_of
from dragon_vllm.corpus.errors import GpuUnavailable

PAGE_ROWS = 32  # vectors per buffer page: a list wastes < 32 rows (48 KB at 384-d)
GATHER_SHARE = 0.5  # scan the listed rows alone while they are under this share of the used rows
QUERY_CHUNK = 16  # queries scored together: bounds the (queries x rows) score block
ROW_TABLE_BYTES = 16  # per buffer row: its list and its offset in the list (int64 each)
U = 2.0 ** -24  # float32 unit roundoff


def gpu_available(device: str = "cuda") -> str | None:
    """None when torch can use ``device``, else the reason it cannot."""
    try:
        import torch
    except ImportError:
        return "torch is not installed"
    if device.startswith("cuda") and not torch.cuda.is_available():
        return "torch sees no CUDA device"
    return None


def dot_error_bound(d: int) -> float:
    """Relative worst-case error of a float32 d-term dot product, any order: gamma_d * sum|x_i y_i|."""
    return d * U / (1 - d * U)


class GpuClusterStore:
    """Resident IVF-Flat lists in pages of one preallocated torch buffer (see the module docstring)."""

    def __init__(self, index, budget_bytes: int, device: str = "cuda", pin_host: bool = True) -> None:
        reason = gpu_available(device)
        if reason is not None:
            raise GpuUnavailable(f"GPU cluster store unavailable: {reason}; use the CPU store "
                                 f"(LookaheadSearcher's default) on this machine")
        import faiss
        import torch

        self.torch, self.faiss = torch, faiss
        self.ivf = ivf_of(index)
        if not isinstance(faiss.downcast_index(self.ivf), faiss.IndexIVFFlat) or self.ivf.metric_type != faiss.METRIC_INNER_PRODUCT:
            raise GpuUnavailable("the GPU cluster store scans IVF-Flat inner-product lists; "
                                 "keep IVF-PQ on the CPU store")
        if device.startswith("cuda") and torch.backends.cuda.matmul.allow_tf32:
            raise GpuUnavailable("TF32 matmuls are on (torch.backends.cuda.matmul.allow_tf32): "
                                 "the score error bound assumes float32")
        self.device, self.d, self.nlist = torch.device(device), self.ivf.d, self.ivf.nlist
        il = self.ivf.invlists
        self._sizes = [il.list_size(c) for c in range(self.nlist)]
        # host views of every list, no copy: vectors for the copies and the exact re-scoring, ids for labels
        self._host = [_list_vectors(faiss, il, c, n, self.d) for c, n in enumerate(self._sizes)]
        self._ids = [_list_ids(faiss, il, c, n) for c, n in enumerate(self._sizes)]
        self.pinned_bytes = self._pin(pin_host)
        # a page is its vectors plus the two int64 row tables: everything this store puts on the device
        self.page_bytes = PAGE_ROWS * (self.d * 4 + ROW_TABLE_BYTES)
        self._list_pages = np.array([-(-n // PAGE_ROWS) for n in self._sizes], dtype=np.int64)
        pages = int(min(int(budget_bytes) // self.page_bytes, self._list_pages.sum()))  # never more than the index
        self.capacity_bytes = pages * self.page_bytes
        self.buf = torch.zeros((pages * PAGE_ROWS, self.d), dtype=torch.float32, device=self.device)
        self.row_list = torch.full((pages * PAGE_ROWS,), self.nlist, dtype=torch.int64, device=self.device)
        self.row_offset = torch.zeros(pages * PAGE_ROWS, dtype=torch.int64, device=self.device)
        # each list's largest vector norm (rounded up), for the error bound; computed on the device at copy
        self.list_norm = torch.zeros(self.nlist + 1, dtype=torch.float32, device=self.device)
        self._free = list(range(pages))  # a heap: the lowest pages first, so the used ones stay packed
        self._rows: dict[int, object] = {}  # list -> its rows in the buffer (a device tensor)
        self._pages: dict[int, list[int]] = {}  # list -> its pages
        self._is_resident = np.zeros(self.nlist, dtype=bool)
        self._used_pages = 0
        self._high_water = 0  # pages below this were ever used: a whole-buffer scan stops here
        self._lock = threading.Lock()  # page bookkeeping; the GPU work is ordered by the default stream
        self._side = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None

    def list_cost_bytes(self) -> np.ndarray:
        """What each list takes in the buffer (whole pages with their row tables). The cache budgets
        with these, so whatever it admits always fits the pages carved here."""
        return self._list_pages * self.page_bytes

    # ------------------------------------------------------------------ residency
    def copy_in(self, clusters: list[int]) -> None:
        """Copy lists in, all of them in one pass: per list only an async host-to-device copy; the
        page writes, row tables and norms are one operation each for the whole batch."""
        torch = self.torch
        todo = [c for c in dict.fromkeys(int(c) for c in clusters) if c not in self._rows]
        if not todo:
            return
        with self._lock:
            need = int(self._list_pages[todo].sum())
            if need > len(self._free):
                raise RuntimeError(f"GPU cluster store full: {need} pages wanted, {len(self._free)} free "
                                   f"(the cache budgets with list_cost_bytes(); use it)")
            pages = {c: [heapq.heappop(self._free) for _ in range(int(self._list_pages[c]))] for c in todo}
            self._high_water = max([self._high_water] + [p + 1 for ps in pages.values() for p in ps])
        rows = [_page_rows(pages[c], self._sizes[c]) for c in todo]
        bounds = np.cumsum([0] + [len(r) for r in rows])
        rows_t = torch.from_numpy(np.concatenate(rows)).to(self.device)  # one upload; each list keeps a view
        filled = [c for c in todo if self._sizes[c]]
        if filled:
            self._write(filled, rows_t)
        with self._lock:  # published only now: a scan sees a list once its rows are on the device
            for c, a, b in zip(todo, bounds[:-1], bounds[1:]):
                self._rows[c] = rows_t[a:b]
                self._pages[c] = pages[c]
                self._is_resident[c] = True
                self._used_pages += len(pages[c])

    def _write(self, lists: list[int], rows_t) -> None:
        torch = self.torch
        offsets = np.concatenate([np.arange(self._sizes[c]) for c in lists])
        owner = np.repeat(np.asarray(lists, dtype=np.int64), [self._sizes[c] for c in lists])
        stream = self._side
        with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
            if stream is not None:  # after every earlier drop and scan on the default stream (page reuse)
                stream.wait_stream(torch.cuda.default_stream(self.device))
            staged = torch.empty((len(rows_t), self.d), dtype=torch.float32, device=self.device)
            start = 0
            for c in lists:  # from page-locked host memory: async, at full PCIe bandwidth
                n = self._sizes[c]
                staged[start:start + n].copy_(torch.from_numpy(self._host[c]), non_blocking=True)
                start += n
            owner_t = torch.from_numpy(owner).to(self.device, non_blocking=True)
            self.buf.index_copy_(0, rows_t, staged)
            self.row_offset.index_copy_(0, rows_t, torch.from_numpy(offsets).to(self.device, non_blocking=True))
            self.row_list.index_copy_(0, rows_t, owner_t)
            # float32 norms are within ~d u of the truth; 1e-3 up makes them upper bounds
            norms = torch.linalg.vector_norm(staged, dim=1) * (1 + 1e-3)
            self.list_norm.scatter_reduce_(0, owner_t, norms, reduce="amax")
        if stream is not None:
            stream.synchronize()  # the copier thread waits, not the scans: they start after publication

    def drop(self, clusters: list[int]) -> None:
        with self._lock:
            gone = [c for c in dict.fromkeys(clusters) if c in self._rows]
            if gone:  # one write: their rows now point at the "not probed" column of every scan's table
                self.row_list[torch_cat(self.torch, [self._rows[c] for c in gone])] = self.nlist
            for c in gone:
                del self._rows[c]
                self._is_resident[c] = False
                self._used_pages -= len(self._pages[c])
                for page in self._pages.pop(c):
                    heapq.heappush(self._free, page)

    def resident(self) -> set[int]:
        with self._lock:
            return set(self._rows)

    def used_bytes(self) -> int:
        with self._lock:
            return self._used_pages * self.page_bytes

    # ------------------------------------------------------------------ search
    def scan(self, x, probes, coarse, k):
        """Per query: (scores, store_pairs labels) of every candidate of its probed resident lists
        scoring at least its k-th (faiss's own scores; probes -1 and non-resident lists skipped)."""
        x = np.ascontiguousarray(x, dtype=np.float32)
        out = []
        for start in range(0, len(x), QUERY_CHUNK):
            out += self._scan_chunk(x[start:start + QUERY_CHUNK], probes[start:start + QUERY_CHUNK], k)
        return out

    def scan_ids(self, x, probes, coarse, k):
        """faiss's own top-``k`` (scores, ids) over the resident lists of ``probes``."""
        from dragon_vllm.corpus.merge import replay

        D = np.full((len(x), k), -np.inf, dtype=np.float32)
        I = np.full((len(x), k), -1, dtype=np.int64)
        for q, (scores, labels) in enumerate(self.scan(x, probes, coarse, k)):
            lists, offsets = labels >> PAIR_SHIFT, labels & ((1 << PAIR_SHIFT) - 1)
            rank = {int(c): r for r, c in enumerate(probes[q]) if c >= 0}
            order = np.array([rank[int(c)] for c in lists], dtype=np.int64) * (1 << PAIR_SHIFT) + offsets
            ids = np.array([self._ids[int(c)][int(o)] for c, o in zip(lists, offsets)], dtype=np.int64)
            D[q], I[q] = replay(scores, ids, order, k)
        return D, I

    def _scan_chunk(self, x: np.ndarray, probes: np.ndarray, k: int) -> list[tuple[np.ndarray, np.ndarray]]:
        torch = self.torch
        probes = np.asarray(probes, dtype=np.int64)
        with self._lock:
            # probed and resident, else the table's "never" column (nlist: also where free rows point)
            wanted = np.where((probes >= 0) & self._is_resident[np.maximum(probes, 0)], probes, self.nlist)
            lists = np.unique(wanted[wanted < self.nlist])
            if not lists.size:
                return [_empty() for _ in x]
            listed = int(sum(self._sizes[c] for c in lists))
            if listed < GATHER_SHARE * self._used_pages * PAGE_ROWS:
                rows = torch.cat([self._rows[int(c)] for c in lists])
                vecs, row_list, row_offset = self.buf[rows], self.row_list[rows], self.row_offset[rows]
            else:  # most of the used buffer: score it all up to its high-water page, mask the rest
                end = self._high_water * PAGE_ROWS
                vecs, row_list, row_offset = self.buf[:end], self.row_list[:end].clone(), self.row_offset[:end]
        wanted_t = torch.from_numpy(wanted).to(self.device, non_blocking=True)
        table = torch.zeros((len(x), self.nlist + 1), dtype=torch.bool, device=self.device)
        table.scatter_(1, wanted_t, True)
        table[:, self.nlist] = False
        max_norm = self.list_norm[wanted_t].max()
        xq = torch.from_numpy(x).to(self.device)
        scores = xq @ vecs.T
        scores.masked_fill_(~table[:, row_list], -torch.inf)
        kk = min(k, scores.shape[1])
        kth = scores.topk(kk, dim=1).values[:, -1]
        # the GPU's and faiss's scores differ by <= 2 gamma |x||y| (each within gamma of the truth),
        # and the k-th may move by as much the other way: 4; 0.1 more for the float32 norms
        tol = 4.1 * dot_error_bound(self.d) * torch.linalg.vector_norm(xq, dim=1) * max_norm
        keep = (scores >= (kth - tol)[:, None]) & (scores > -torch.inf)
        q_idx, r_idx = keep.nonzero(as_tuple=True)
        found = torch.stack([q_idx, row_list[r_idx], row_offset[r_idx]]).cpu().numpy()  # the one read back
        q_idx, cand_list, cand_off = found
        return [self._exact(x[q], cand_list[q_idx == q], cand_off[q_idx == q], k) for q in range(len(x))]

    def _exact(self, xq: np.ndarray, lists: np.ndarray, offsets: np.ndarray, k: int):
        """faiss's scores of the candidates, cut at their k-th (ties kept)."""
        if not len(lists):
            return _empty()
        ys = np.ascontiguousarray(np.stack([self._host[int(c)][int(o)] for c, o in zip(lists, offsets)]))
        scores = np.empty(len(ys), dtype=np.float32)
        self.faiss.fvec_inner_products_ny(self.faiss.swig_ptr(scores), self.faiss.swig_ptr(xq),
                                          self.faiss.swig_ptr(ys), self.d, len(ys))
        if len(scores) > k:
            keep = scores >= np.partition(scores, len(scores) - k)[len(scores) - k]
            scores, lists, offsets = scores[keep], lists[keep], offsets[keep]
        return scores, (lists.astype(np.int64) << PAIR_SHIFT) | offsets.astype(np.int64)

    # ------------------------------------------------------------------ host side
    def close(self) -> None:
        """Unpin the host lists (the buffer goes with the object)."""
        if self.pinned_bytes:
            cudart = self.torch.cuda.cudart()
            for v in self._host:
                if v.nbytes:
                    cudart.cudaHostUnregister(v.ctypes.data)
            self.pinned_bytes = 0

    def _pin(self, pin_host: bool) -> int:
        """Page-lock the lists' host memory (``cudaHostRegister``) so copies run at full PCIe
        bandwidth and asynchronously; returns the bytes pinned (0 on CPU or when refused)."""
        if not pin_host or self.device.type != "cuda":
            return 0
        cudart, pinned = self.torch.cuda.cudart(), 0
        for v in self._host:
            if v.nbytes and int(cudart.cudaHostRegister(v.ctypes.data, v.nbytes, 0)) == 0:
                pinned += v.nbytes
        return pinned


def _list_vectors(faiss, il, c: int, n: int, d: int) -> np.ndarray:
    if not n:
        return np.zeros((0, d), dtype=np.float32)
    return faiss.rev_swig_ptr(il.get_codes(c), n * d * 4).view(np.float32).reshape(n, d)


def _list_ids(faiss, il, c: int, n: int) -> np.ndarray:
    if not n:
        return np.zeros(0, dtype=np.int64)
    return faiss.rev_swig_ptr(il.get_ids(c), n).view(np.int64)


def _page_rows(pages: list[int], n: int) -> np.ndarray:
    """The buffer rows of a list of ``n`` vectors in ``pages``, in list order."""
    if not pages:
        return np.zeros(0, dtype=np.int64)
    return (np.asarray(pages, dtype=np.int64)[:, None] * PAGE_ROWS + np.arange(PAGE_ROWS)).ravel()[:n]


def torch_cat(torch, tensors: list):
    return tensors[0] if len(tensors) == 1 else torch.cat(tensors)


def _empty() -> tuple[np.ndarray, np.ndarray]:
    return np.zeros(0, dtype=np.float32), np.zeros(0, dtype=np.int64)
