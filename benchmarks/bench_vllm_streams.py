"""Cloud decode throughput at engine level: R concurrent requests x k document streams, vs plain vLLM.

Three engines in one run, one after the other, on the same prompts (no network):

* **gang** (the default cloud path): each request is a gang (``dragon_vllm.drafting``): its k
  streams are mixed inside vLLM and drafted ``--chunk-tokens`` per chunk (0, the default:
  open-ended, until the caller leaves the gang's path); the caller reads the
  side's canonical top-K ``Dist`` per position and appends its greedy token (one token = one
  answer step). vLLM runs Model Runner V1 here (a logits processor is configured).
* **sessions** (the older path, ``--paths sessions``): every step reads back k top-K
  distributions, mixes them in Python and appends the token: one engine round trip per token.
* **plain**: ordinary vLLM decoding of the same R*k prompts, one request each,
  ``max_tokens=steps``, with the best plain configuration (no processor: Model Runner V2 on the
  GPU, async scheduling). Three variants: top-K log-probs on one request in k (what DRAGON needs:
  one top-K per answer step, the ratio's reference), on every request, and none.

Reported per level: answer tokens/s, stream tokens/s (x k), per-token latency p50/p99 (gaps
between a request's steps), and ``ratio`` = gang stream tokens/s / plain (same log-probs).

Run: ``python -m benchmarks.bench_vllm_streams [--levels 1 8 32] [--k 4] [--steps 32]``;
bigger shapes without weights: ``--shape 1.7b`` (a Llama config with SmolLM2's vocabulary and
``load_format="dummy"``: real timing, meaningless text). ``--model DIR`` / ``$DRAGON_HF_DIR`` /
``dragon-models prepare``. Passages: ``--passages FILE.jsonl`` else built-in ones. JSON + PNG
land in ``benchmarks/results/``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).parent / "results"
BUILTIN = [
    "The Eiffel Tower is a wrought-iron lattice tower on the Champ de Mars in Paris, France, named after the "
    "engineer Gustave Eiffel, whose company designed and built it from 1887 to 1889.",
    "Mount Everest is Earth's highest mountain above sea level, in the Mahalangur Himal sub-range of the "
    "Himalayas; the China-Nepal border runs across its summit point.",
    "The Great Barrier Reef is the world's largest coral reef system, with over 2,900 individual reefs and "
    "900 islands along more than 2,300 kilometres off the coast of Queensland, Australia.",
    "Johann Sebastian Bach was a German composer of the late Baroque period, known for the Brandenburg "
    "Concertos, the Goldberg Variations and the Mass in B minor.",
]


def load_passages(path: str | None, n: int) -> list[str]:
    if not path:
        return [f"{BUILTIN[i % len(BUILTIN)]} (Passage {i}.)" for i in range(n)]
    out = []
    with open(path) as f:
        for line in f:
            row = json.loads(line)
            out.append(" ".join(str(row.get("contents") or row.get("text") or "").split()[:120]))
            if len(out) == n:
                break
    return out


def build_prompts(tok, passages: list[str], requests: int, k: int, block: int) -> list[list[list[int]]]:
    """Request r reads k passages from a shared pool (hot documents recur across requests)."""
    from dragon_core.prompt import document_prompt

    pool = len(passages)
    return [[document_prompt(tok, passages[(r * 3 + j) % pool], f"Question number {r}: what is described?",
                             block_size=block) for j in range(k)] for r in range(requests)]


def controller_token(dists) -> int:
    """The older path's controller work per step: mix the k top-K distributions into the side's
    canonical top-20 ``Dist`` (uniform scores) and take its greedy token."""
    from dragon_core.aggregate import canonical_side_dist

    return canonical_side_dist(dists, np.zeros(len(dists)), 20).argmax()


async def run_sessions_group(engine, prompts: list[list[int]], steps: int, gaps: list[float]) -> int:
    group = await engine.open_group(prompts, temperature=1.0)
    try:
        token: list[int] = []
        last = time.perf_counter()
        for step in range(steps):
            token = [controller_token(await group.advance(token))]
            now = time.perf_counter()
            if step:  # the first gap is the time to first token
                gaps.append(now - last)
            last = now
        return steps
    finally:
        await group.close()


def second_best(dist) -> int:
    """A token the gang did not predict: the canonical distribution's second most likely id."""
    order = np.argsort(-dist.logprobs.astype(np.float64), kind="stable")
    return int(dist.ids[order[1]]) if len(order) > 1 else (dist.argmax() + 1) % dist.vocab_size


async def run_gang_group(engine, prompts: list[list[int]], steps: int, gaps: list[float], stats: dict,
                         rollback_every: int = 0, follow_engine: bool = False) -> int:
    """``rollback_every`` > 0: every that many steps the caller appends another token than the
    gang's (what a rejected draft does: the gang is aborted and reopened after it)."""
    group = await engine.open_group(prompts, 1.0, [0.0] * len(prompts), steps)
    try:
        last = time.perf_counter()
        for step in range(steps):
            dist = await group.next_side_dist(20)
            detour = rollback_every and step % rollback_every == rollback_every - 1
            predicted = group.engine_token() if follow_engine else None
            token = dist.argmax() if predicted is None else predicted
            await group.append([second_best(dist) if detour else token])
            now = time.perf_counter()
            if step:  # the first gap is the time to first token
                gaps.append(now - last)
            last = now
        for key in ("chunks", "reopens", "rewinds", "repairs", "served_from_chunk"):
            stats[key] = stats.get(key, 0) + getattr(group, key)
        return steps
    finally:
        await group.close()


async def timed(groups) -> tuple[float, float]:
    t0 = time.perf_counter()
    done = sum(await asyncio.gather(*groups))
    return done, time.perf_counter() - t0


def latency_row(prefix: str, tokens: int, seconds: float, k: int, gaps: list[float]) -> dict:
    ms = 1e3 * np.asarray(gaps or [0.0])
    return {f"{prefix}_tokens_per_s": round(tokens / seconds, 2),
            f"{prefix}_stream_tokens_per_s": round(tokens * k / seconds, 2),
            f"{prefix}_ms_per_token_p50": round(float(np.percentile(ms, 50)), 3),
            f"{prefix}_ms_per_token_p99": round(float(np.percentile(ms, 99)), 3)}


async def gang_level(engine, prompts, steps: int, k: int, rollback_every: int = 0, follow: bool = False) -> dict:
    """``follow``: append the engine's own token (dummy weights: see ``GangStreamGroup.engine_token``)."""
    await asyncio.gather(*(run_gang_group(engine, p, 2, [], {}) for p in prompts))  # warm: prefix cache
    gaps: list[float] = []
    stats: dict = {}
    tokens, seconds = await timed(run_gang_group(engine, p, steps, gaps, stats, rollback_every, follow)
                                  for p in prompts)
    return dict(latency_row("gang", tokens, seconds, k, gaps), gang_counters=stats, gang_seconds=round(seconds, 4))


async def rollback_level(engine, prompts, steps: int, k: int, every: int, clean_seconds: float,
                         follow: bool = False, mode: str = "reopen") -> dict:
    """The cost of a rollback at this load: the same answers with a forced detour every ``every``
    steps, minus the clean run's time, per rollback. ``mode``: ``reopen`` (abort + reopen of the
    gang; keys ``rollback_*``) or ``in_place`` (the gang scheduler truncates the sessions; keys
    ``inplace_rollback_*``, counted in rewinds)."""
    saved, engine.rollback = engine.rollback, mode
    try:
        got = await gang_level(engine, prompts, steps, k, every, follow)
    finally:
        engine.rollback = saved
    counters = got["gang_counters"]
    events = counters.get("reopens", 0) + counters.get("rewinds", 0)
    extra = got["gang_seconds"] - clean_seconds
    p = "rollback" if mode == "reopen" else "inplace_rollback"
    return {"rollback_every": every, f"{p}_stream_tokens_per_s": got["gang_stream_tokens_per_s"],
            f"{p}_ms_per_token_p50": got["gang_ms_per_token_p50"],
            f"{p}_ms_per_token_p99": got["gang_ms_per_token_p99"], f"{p}_reopens": counters.get("reopens", 0),
            f"{p}_rewinds": counters.get("rewinds", 0), f"{p}_repairs": counters.get("repairs", 0),
            f"{p}_seconds": got["gang_seconds"],
            f"{p}_ms_each": round(1e3 * extra / events * len(prompts), 2) if events else None}


async def sessions_level(engine, prompts, steps: int, k: int) -> dict:
    await asyncio.gather(*(run_sessions_group(engine, p, 2, []) for p in prompts))
    gaps: list[float] = []
    tokens, seconds = await timed(run_sessions_group(engine, p, steps, gaps) for p in prompts)
    return latency_row("sessions", tokens, seconds, k, gaps)


async def plain_decode(engine, prompts: list[list[int]], steps: int, logprobs_every: int) -> float:
    """Stream tokens/s of ordinary requests (same prompts, no sessions); top-K log-probs on one
    request in ``logprobs_every`` (0: none)."""
    from vllm import SamplingParams
    from vllm.inputs.engine import tokens_input

    def params(i: int):
        want = logprobs_every and i % logprobs_every == 0
        return SamplingParams(max_tokens=steps, ignore_eos=True, temperature=0.0,
                              logprobs=engine.top_k if want else None, flat_logprobs=True, detokenize=False)

    async def one(i: int, ids: list[int]) -> int:
        n = 0
        async for out in engine.llm.generate(tokens_input(list(ids)), params(i), f"plain-{time.time_ns()}-{i}"):
            n = len(out.outputs[0].token_ids)
        return n

    await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts)))  # warm: prefix cache, graphs
    t0 = time.perf_counter()
    n = sum(await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts))))
    return n / (time.perf_counter() - t0)


async def plain_level(engine, prompts, steps: int, k: int) -> dict:
    flat = [p for group in prompts for p in group]
    return dict(plain_stream_tokens_per_s=round(await plain_decode(engine, flat, steps, k), 2),
                plain_all_logprobs_stream_tokens_per_s=round(await plain_decode(engine, flat, steps, 1), 2),
                plain_no_logprobs_stream_tokens_per_s=round(await plain_decode(engine, flat, steps, 0), 2))


def shape_dir(shape: str, model: str) -> tuple[str, dict]:
    """A model folder for ``--shape``: the real one, or a 1.7B Llama config (SmolLM2-1.7B's
    dimensions, SmolLM2's tokenizer) for ``load_format="dummy"``."""
    if shape == "real":
        return model, {}
    import shutil
    import tempfile

    out = Path(tempfile.mkdtemp(prefix="dragon-1.7b-"))
    config = json.loads((Path(model) / "config.json").read_text())
    config.update(hidden_size=2048, intermediate_size=8192, num_hidden_layers=24, num_attention_heads=32,
                  num_key_value_heads=32, max_position_embeddings=8192, tie_word_embeddings=True)
    (out / "config.json").write_text(json.dumps(config))
    for f in Path(model).iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "generation_config", "vocab", "merges")):
            shutil.copy(f, out / f.name)
    return str(out), dict(load_format="dummy")


async def with_engine(make, body):
    engine = make()
    try:
        return await body(engine)
    finally:
        await engine.close()


async def amain(args) -> dict:
    from transformers import AutoTokenizer

    from dragon_vllm.engine import make_engine, vllm_version

    model, extra = shape_dir(args.shape, args.model)
    max_seqs = max(args.levels) * args.k + args.seat_slack
    common = dict(top_k=args.top_k, max_num_seqs=max_seqs, max_model_len=1024, dtype=args.dtype,
                  kv_cache_gib=args.kv_gib, max_num_batched_tokens=max(8192, max_seqs * 4),
                  gpu_memory_utilization=args.gpu_memory_utilization, **extra)
    if args.cudagraph_max:  # both engines alike: the decode batch of R*k rows as one CUDA graph
        common["compilation_config"] = {"max_cudagraph_capture_size": args.cudagraph_max}
    tok = AutoTokenizer.from_pretrained(args.model)
    passages = load_passages(args.passages, 64)
    levels = {r: build_prompts(tok, passages, r, args.k, 32) for r in args.levels}
    rows = {r: dict(requests=r, k=args.k, steps=args.steps) for r in args.levels}
    engine_stats = {}

    async def gang(engine):
        follow = args.shape != "real"
        for chunk in args.chunk_tokens:
            engine.chunk_tokens = chunk
            for r, prompts in levels.items():
                got = await gang_level(engine, prompts, args.steps, args.k, follow=follow)
                if chunk != args.chunk_tokens[0]:  # the first chunk size is the row's headline
                    got = {f"{key}_chunk{chunk}": value for key, value in got.items()}
                rows[r].update(got)
                if args.rollback_every and chunk == args.chunk_tokens[0]:
                    # repeats: a clean run then each mode, interleaved; the row keeps the first
                    # repetition's figures and the per-rollback cost of every repetition + median
                    costs: dict[str, list] = {mode: [] for mode in args.rollback}
                    for rep in range(args.repeats):
                        clean = got if rep == 0 else await gang_level(engine, prompts, args.steps, args.k,
                                                                      follow=follow)
                        for mode in args.rollback:
                            res = await rollback_level(engine, prompts, args.steps, args.k, args.rollback_every,
                                                       clean["gang_seconds"], follow, mode)
                            p = "rollback" if mode == "reopen" else "inplace_rollback"
                            costs[mode].append(res[f"{p}_ms_each"])
                            if rep == 0:
                                rows[r].update(res)
                    if args.repeats > 1:
                        for mode, runs in costs.items():
                            p = "rollback" if mode == "reopen" else "inplace_rollback"
                            rows[r][f"{p}_ms_each_runs"] = runs
                            ok = [c for c in runs if c is not None]
                            rows[r][f"{p}_ms_each_median"] = round(float(np.median(ok)), 2) if ok else None
                print(json.dumps(rows[r]), flush=True)
        engine_stats["gang"] = engine.stats()

    async def plain(engine):
        for r, prompts in levels.items():
            rows[r].update(await plain_level(engine, prompts, args.steps, args.k))
            if "sessions" in args.paths:
                rows[r].update(await sessions_level(engine, prompts, args.steps, args.k))
            print(json.dumps(rows[r]), flush=True)
        engine_stats["plain"] = engine.stats()

    if "gang" in args.paths:
        # the engine is started in place mode when asked (the version gate); each run picks its mode
        rollback = "in_place" if "in_place" in args.rollback else "reopen"
        await with_engine(lambda: make_engine(model, mixing=True, chunk_tokens=args.chunk_tokens[0],
                                              rollback=rollback, **common), gang)
    if not args.skip_plain:
        await with_engine(lambda: make_engine(model, mixing=False, **common), plain)
    for row in rows.values():
        for chunk in args.chunk_tokens[1:] if "plain_stream_tokens_per_s" in row else ():
            row[f"ratio_chunk{chunk}"] = round(row[f"gang_stream_tokens_per_s_chunk{chunk}"]
                                               / row["plain_stream_tokens_per_s"], 3)
        if "gang_stream_tokens_per_s" in row and "plain_stream_tokens_per_s" in row:
            row["ratio"] = round(row["gang_stream_tokens_per_s"] / row["plain_stream_tokens_per_s"], 3)
            row["ratio_vs_no_logprobs"] = round(row["gang_stream_tokens_per_s"]
                                                / row["plain_no_logprobs_stream_tokens_per_s"], 3)
    return dict(benchmark="vllm_streams", device=args.device, shape=args.shape, vllm=".".join(map(str, vllm_version())),
                rollback=args.rollback, rollback_every=args.rollback_every, repeats=args.repeats,
                dtype=args.dtype, top_k=args.top_k, cudagraph_max=args.cudagraph_max, seat_slack=args.seat_slack, chunk_tokens=args.chunk_tokens, max_num_seqs=max_seqs,
                paths=args.paths, cpu_count=os.cpu_count(), loadavg_at_end=os.getloadavg(),
                machine=platform.machine(), gpu=_gpu_name(), engine_stats=engine_stats, levels=list(rows.values()))


def _gpu_name() -> str | None:
    try:
        import torch

        return torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except Exception:
        return None


def plot(result: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["levels"]
    n = [r["requests"] for r in rows]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for key, label in (("gang_stream_tokens_per_s", "DRAGON gang (in-engine)"),
                       ("sessions_stream_tokens_per_s", "one-token sessions (older path)"),
                       ("plain_stream_tokens_per_s", "plain vLLM, same log-probs"),
                       ("plain_no_logprobs_stream_tokens_per_s", "plain vLLM, no log-probs")):
        if all(key in r for r in rows):
            a.plot(n, [r[key] for r in rows], marker="o", label=label)
    a.set(xscale="log", xlabel="concurrent requests (k streams each)", ylabel="stream tokens/s",
          title=f"{result['shape']} on {result['device']}, k={rows[0]['k']}")
    a.legend(fontsize=8)
    for key, label in (("gang_ms_per_token_p50", "gang p50"), ("gang_ms_per_token_p99", "gang p99"),
                       ("sessions_ms_per_token_p50", "sessions p50"),
                       ("rollback_ms_per_token_p99", "with rollbacks, reopen p99"),
                       ("inplace_rollback_ms_per_token_p99", "with rollbacks, in place p99")):
        if all(key in r for r in rows):
            b.plot(n, [r[key] for r in rows], marker="o", label=label)
    b.set(xscale="log", yscale="log", xlabel="concurrent requests", ylabel="ms per answer token")
    b.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
def _default_model() -> str | None:
    if os.environ.get("DRAGON_HF_DIR"):
        return os.environ["DRAGON_HF_DIR"]
    try:
        from dragon_host import models

        return str(models.get_model("smollm2-135m").hf_dir())
    except Exception:
        return None


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=_default_model(), help="converted safetensors folder")
    ap.add_argument("--levels", type=int, nargs="+", default=[1, 8, 32], help="concurrent requests")
    ap.add_argument("--k", type=int, default=4, help="documents (streams) per request")
    ap.add_argument("--steps", type=int, default=32, help="answer tokens per request")
    ap.add_argument("--top-k", type=int, default=20)
    ap.add_argument("--chunk-tokens", type=int, nargs="+", default=[0],
                    help="gang path: tokens drafted per engine chunk, 0 = open-ended (the server's default); "
                         "several: one gang run each")
    ap.add_argument("--rollback-every", type=int, default=0,
                    help="also time the gang path with a rejected draft every N steps (abort + reopen): the "
                         "cost of one rollback, in ms of one gang's time")
    ap.add_argument("--rollback", nargs="+", default=["reopen"], choices=["reopen", "in_place"],
                    help="with --rollback-every: the rollback modes to time, one after the other on the same "
                         "engine (in_place: truncation inside the gang scheduler; vLLM 0.32 only)")
    ap.add_argument("--repeats", type=int, default=1,
                    help="with --rollback-every: repeat (clean run, then each mode) this many times")
    ap.add_argument("--skip-plain", action="store_true", help="no plain-vLLM engine (rollback costs only)")
    ap.add_argument("--paths", nargs="+", default=["gang"], choices=["gang", "sessions"],
                    help="paths to measure besides plain vLLM")
    ap.add_argument("--shape", default="real", choices=["real", "1.7b"], help="1.7b: dummy weights")
    ap.add_argument("--gpu-memory-utilization", type=float, default=None)
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--seat-slack", type=int, default=0,
                    help="engine seats beyond R*k (room for a reopened gang's new rows before the old ones leave)")
    ap.add_argument("--cudagraph-max", type=int, default=None,
                    help="vLLM max_cudagraph_capture_size for both engines (default: vLLM's, 512 on the GPU)")
    ap.add_argument("--kv-gib", type=int, default=None, help="CPU KV cache size (VLLM_CPU_KVCACHE_SPACE)")
    ap.add_argument("--passages", default=os.environ.get("DRAGON_PASSAGES"))
    ap.add_argument("--device", default="cpu", help="label for the result file")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if not args.model:
        raise SystemExit("no model: pass --model DIR, set DRAGON_HF_DIR, or run `dragon-models prepare smollm2-135m`")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    result = asyncio.run(amain(args))
    suffix = "" if args.shape == "real" else f"_{args.shape}"
    out = Path(args.out) if args.out else RESULTS / f"vllm_streams_{args.device}{suffix}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    plot(result, out.with_suffix(".png"))
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
