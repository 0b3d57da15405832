"""Cloud decode throughput: R concurrent requests x k document streams on one vLLM engine.

Each request is a lockstep group (``dragon_vllm.engine``): every step reads back k top-K
distributions, mixes them into the side's canonical top-32 ``Dist`` as the controller does, and
appends its greedy token to the k streams, i.e. the cloud's work per DRAGON token without the
network. Reported per concurrency level:

* ``tokens_per_s``: answer tokens per second over all requests (one token = one group step);
* ``stream_tokens_per_s``: the same times k (positions decoded by vLLM);
* ``ms_per_step``: mean wall time of one group step;
* ``tokens_per_s_dense_mixture``: the same run with the old dense mixture (49k-wide rows);
* ``sparse_mixture_ms`` / ``dense_mixture_ms``: the controller's mixing time per group step;
* ``plain_stream_tokens_per_s``: plain vLLM decoding of the same R*k prompts (one request
  each, ``max_tokens=steps``, no sessions) — the ceiling the session path is compared with.

Run: ``python -m benchmarks.bench_vllm_streams [--levels 1 8 32] [--k 4] [--steps 32]``.
Needs a converted model: ``--model DIR`` / ``$DRAGON_HF_DIR`` / ``dragon-models prepare``.
Passages: ``--passages FILE.jsonl`` (``contents`` or ``text`` per line, e.g. the FlashRAG
wiki sample) else a few built-in ones. JSON lands in ``benchmarks/results/``.
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


def controller_token(dists, how: str) -> int:
    """What the cloud's controller does per group step: mix the k top-K distributions into the
    side's canonical top-32 ``Dist`` (uniform scores) and take its greedy token. ``sparse`` is
    the production path (``canonical_side_dist``: union of listed ids); ``dense`` mixes 49k-wide
    rows, as before it."""
    from dragon_core.aggregate import canonical_side_dist, side_mixture, stack_logprobs
    from dragon_core.dist import Dist

    scores = np.zeros(len(dists))
    if how == "sparse":
        return canonical_side_dist(dists, scores, 32).argmax()
    return Dist.top_k(side_mixture(stack_logprobs(dists), scores)[0], 32).argmax()


def mixture_ms(dists, how: str, repeat: int = 20) -> float:
    from dragon_core.dist import Dist

    t0 = time.perf_counter()
    for _ in range(repeat):
        fresh = [Dist.from_top_k(d.vocab_size, d.ids, d.logprobs) for d in dists]  # no cached probs
        controller_token(fresh, how)
    return 1e3 * (time.perf_counter() - t0) / repeat


async def run_group(engine, prompts: list[list[int]], steps: int, step_times: list[float], how: str,
                    last: list | None = None) -> int:
    group = await engine.open_group(prompts, temperature=1.0)
    try:
        token: list[int] = []
        for _ in range(steps):
            t0 = time.perf_counter()
            dists = await group.advance(token)
            token = [controller_token(dists, how)]
            step_times.append(time.perf_counter() - t0)
        if last is not None:
            last.append(dists)
        return steps
    finally:
        await group.close()


async def sessions(engine, prompts, steps: int, how: str) -> tuple[float, list[float]]:
    step_times: list[float] = []
    t0 = time.perf_counter()
    done = await asyncio.gather(*(run_group(engine, p, steps, step_times, how) for p in prompts))
    return sum(done) / (time.perf_counter() - t0), step_times


async def level(engine, tok, passages, requests: int, k: int, steps: int) -> dict:
    prompts = build_prompts(tok, passages, requests, k, engine.block_size)
    last: list = []
    await asyncio.gather(*(run_group(engine, p, 2, [], "sparse", last) for p in prompts))  # warm: prefill + prefix cache
    tps, step_times = await sessions(engine, prompts, steps, "sparse")
    tps_dense, _ = await sessions(engine, prompts, steps, "dense")
    plain = await plain_decode(engine, [p for group in prompts for p in group], steps)
    return dict(requests=requests, k=k, steps=steps,
                tokens_per_s=round(tps, 2), stream_tokens_per_s=round(tps * k, 2),
                tokens_per_s_dense_mixture=round(tps_dense, 2),
                ms_per_step=round(1e3 * float(np.mean(step_times)), 2),
                ms_per_step_p90=round(1e3 * float(np.percentile(step_times, 90)), 2),
                sparse_mixture_ms=round(mixture_ms(last[0], "sparse"), 3),
                dense_mixture_ms=round(mixture_ms(last[0], "dense"), 3),
                plain_stream_tokens_per_s=round(plain, 2),
                session_slowdown=round(plain / (tps * k), 2))


async def plain_decode(engine, prompts: list[list[int]], steps: int) -> float:
    """Tokens/s of ordinary requests (same prompts, same top-K log-probs, no sessions)."""
    from vllm import SamplingParams
    from vllm.inputs.engine import tokens_input

    params = SamplingParams(max_tokens=steps, ignore_eos=True, temperature=1.0, logprobs=engine.top_k,
                            flat_logprobs=True, detokenize=False)

    async def one(i: int, ids: list[int]) -> int:
        n = 0
        async for out in engine.llm.generate(tokens_input(list(ids)), params, f"plain-{time.time_ns()}-{i}"):
            n = len(out.outputs[0].token_ids)
        return n

    t0 = time.perf_counter()
    n = sum(await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts))))
    return n / (time.perf_counter() - t0)


async def amain(args) -> dict:
    from transformers import AutoTokenizer

    from dragon_vllm.engine import make_engine, vllm_version

    max_seqs = max(args.levels) * args.k
    engine = make_engine(args.model, top_k=args.top_k, max_num_seqs=max_seqs, max_model_len=1024,
                         dtype=args.dtype, kv_cache_gib=args.kv_gib)
    try:
        tok = AutoTokenizer.from_pretrained(args.model)
        passages = load_passages(args.passages, 64)
        rows = []
        for r in args.levels:
            row = await level(engine, tok, passages, r, args.k, args.steps)
            print(json.dumps(row), flush=True)
            rows.append(row)
        return dict(benchmark="vllm_streams", device=args.device, vllm=".".join(map(str, vllm_version())),
                    dtype=args.dtype, top_k=args.top_k, max_num_seqs=max_seqs, block_size=engine.block_size,
                    cpu_count=os.cpu_count(), loadavg_at_end=os.getloadavg(), machine=platform.machine(),
                    engine_stats=engine.stats(), levels=rows)
    finally:
        await engine.close()


def _default_model() -> str | None:
    if os.environ.get("DRAGON_HF_DIR"):
        return os.environ["DRAGON_HF_DIR"]
    try:
        from dragon_core import models

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
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--kv-gib", type=int, default=None, help="CPU KV cache size (VLLM_CPU_KVCACHE_SPACE)")
    ap.add_argument("--passages", default=os.environ.get("DRAGON_PASSAGES"))
    ap.add_argument("--device", default="cpu", help="label for the result file")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if not args.model:
        raise SystemExit("no model: pass --model DIR, set DRAGON_HF_DIR, or run `dragon-models prepare smollm2-135m`")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    result = asyncio.run(amain(args))
    out = Path(args.out) if args.out else RESULTS / f"vllm_streams_{args.device}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
