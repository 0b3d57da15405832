"""Build the cloud from names: registered model -> vLLM engine; index folder -> PublicIndex."""

from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path

from dragon_core.prompt import eos_token_ids
from dragon_host.identity import local_identity
from dragon_host.models import get_model
from dragon_vllm.backend import DragonCloud

log = logging.getLogger("dragon.cloud")


async def load_cloud(model: str, index_dir: Path | None = None, *, default_k: int = 2, logprobs_k: int = 20,
                     max_num_seqs: int = 128, max_model_len: int = 2048, kv_cache_gib: float | None = None,
                     gpu_memory_utilization: float | None = None, emulate_decode_ms: float = 0.0,
                     warm_up: bool = True, lookahead: str = "off", lookahead_fraction: float = 0.15,
                     speculative_retrieval: bool = True, retriever: str = "dense", data_parallel_size: int = 1,
                     data_parallel_backend: str = "vllm", placement: str = "kv", ranks_per_gpu: int = 1,
                     **engine_kwargs) -> DragonCloud:
    """Start the engine inside the running event loop (vLLM's AsyncLLM binds to it); ``warm_up``
    runs one retrieval and two decode steps before the server reports healthy. ``lookahead``
    (IVF indexes): "off", or search through TeleRAG's cluster cache held in host memory ("cpu")
    or GPU memory ("gpu"), ``lookahead_fraction`` of the lists' bytes; the same results.
    ``retriever``: "dense" (the index's faiss search), or "bm25": BM25 over the index's passages
    selects, the dense ``R`` still weighs (``dragon_vllm.corpus.bm25``; built at start, in memory).
    ``data_parallel_size`` > 1: the engine on that many ranks (``dragon_vllm.data_parallel``), each
    request placed by ``placement`` and pinned to its rank."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer

    from dragon_vllm.engine import make_engine

    spec = get_model(model)
    hf_dir = spec.hf_dir()
    identity = local_identity(model, "hf")
    tokenizer = AutoTokenizer.from_pretrained(str(spec.tokenizer_dir()))
    index = None
    if index_dir is not None:
        from dragon_vllm.corpus import PublicIndex

        options = {} if lookahead == "off" else dict(lookahead=True, store=lookahead, budget_fraction=lookahead_fraction)
        index = await asyncio.to_thread(PublicIndex.load, index_dir, **options)
        if index.fingerprint != identity.retriever_fingerprint:
            raise RuntimeError(f"index {index_dir} was built with another retriever ({index.fingerprint})")
        log.info("public index %s: %d passages%s", index_dir, len(index),
                 "" if lookahead == "off" else f", lookahead cluster cache in {lookahead} memory")
        if retriever == "bm25":
            index = await asyncio.to_thread(_bm25_over, index)
    if data_parallel_size > 1:
        from dragon_vllm.data_parallel import make_ranked_engine

        engine = make_ranked_engine(str(hf_dir), data_parallel_size=data_parallel_size, backend=data_parallel_backend,
                                    policy=placement, ranks_per_gpu=ranks_per_gpu, logprobs_k=logprobs_k,
                                    max_num_seqs=max_num_seqs,
                                    max_model_len=max_model_len, kv_cache_gib=kv_cache_gib,
                                    gpu_memory_utilization=gpu_memory_utilization, **engine_kwargs)
    else:
        engine = make_engine(str(hf_dir), logprobs_k=logprobs_k, max_num_seqs=max_num_seqs, max_model_len=max_model_len,
                             kv_cache_gib=kv_cache_gib, gpu_memory_utilization=gpu_memory_utilization, **engine_kwargs)
    cloud = DragonCloud(engine, tokenizer, identity, eos_token_ids(tokenizer), index, default_k=default_k,
                        max_model_len=max_model_len, emulate_decode_ms=emulate_decode_ms,
                        speculative_retrieval=speculative_retrieval)
    if warm_up:
        log.info("warmed up in %.1f s", await cloud.warm_up())
    return cloud


def _bm25_over(index):
    """BM25 over every passage of the public index (their text read from its SQLite file)."""
    import time

    from dragon_vllm.corpus.bm25 import Bm25Index

    start = time.perf_counter()
    bm25 = Bm25Index.over(index)
    log.info("BM25 over %d public passages built in %.1f s (BM25 selects, dense R weighs)", len(bm25),
             time.perf_counter() - start)
    return bm25
