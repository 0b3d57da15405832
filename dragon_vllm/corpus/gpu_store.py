"""The GPU cluster buffer of TeleRAG: the interface, checked, ready for the GPU machine.

Same three methods as :class:`~dragon_vllm.corpus.cluster_store.CpuClusterStore`, which the
:class:`~dragon_vllm.corpus.lookahead.LookaheadSearcher` calls:

* ``copy_in(clusters)``: host lists -> a fixed device buffer of ``budget_bytes`` carved from
  what vLLM leaves (``gpu_memory_utilization``), on a side CUDA stream so the copy overlaps
  the link round trip and the prefills; the host lists should be in pinned memory
  (``cudaHostRegister`` over the ``ArrayInvertedLists`` codes) for full PCIe bandwidth;
* ``drop(clusters)``: free their slots in the buffer (the cache decided; no copy back);
* ``scan(x, probes, coarse, k)``: scan only the listed clusters (the others are -1: the scan is
  masked to the probed, cached clusters) and return, per query, every candidate scoring at
  least the k-th score with its store_pairs label (list << 32 | offset), as ``cluster_store.scan``
  does. Scores must be bitwise those of faiss-cpu for the id-for-id equality: compute them in
  float32 in the same order, or re-score the few merged candidates on the CPU.

Not written yet (no GPU time in the session that built the CPU path); the constructor checks
for faiss-gpu and CUDA first, so a CPU machine gets a clear, typed error instead of a crash.
"""

from __future__ import annotations

from dragon_vllm.corpus.errors import GpuUnavailable


def gpu_available() -> str | None:
    """None when faiss-gpu sees a CUDA device, else the reason it cannot be used."""
    try:
        import faiss
    except ImportError:
        return "faiss is not installed"
    if not hasattr(faiss, "StandardGpuResources"):
        return "this faiss has no GPU support (faiss-cpu); install the faiss-gpu wheel built for the CUDA runtime"
    if faiss.get_num_gpus() < 1:
        return "faiss-gpu sees no CUDA device"
    return None


class GpuClusterStore:
    """Cached clusters in GPU memory (see the module docstring for the contract)."""

    def __init__(self, index, budget_bytes: int, device: int = 0) -> None:
        reason = gpu_available()
        if reason is not None:
            raise GpuUnavailable(f"GPU cluster store unavailable: {reason}; use the CPU store "
                                 f"(LookaheadSearcher's default) on this machine")
        self.index, self.budget_bytes, self.device = index, budget_bytes, device
        raise GpuUnavailable("GpuClusterStore is not implemented yet: it is written on the GPU machine "
                             "(issue 15); the interface and its CPU twin are in cluster_store.py")

    def copy_in(self, clusters: list[int]) -> None:  # pragma: no cover - GPU machine
        raise NotImplementedError

    def drop(self, clusters: list[int]) -> None:  # pragma: no cover - GPU machine
        raise NotImplementedError

    def scan(self, x, probes, coarse, k):  # pragma: no cover - GPU machine
        raise NotImplementedError
