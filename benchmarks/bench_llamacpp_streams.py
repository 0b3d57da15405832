"""Device decode throughput of the llama.cpp backend with k = 1, 2, 4 document streams.

One group of k streams answers one question (k retrieved passages of ~64 words, the store's
default chunk, laid out by ``dragon_core.prompt``). A *step* appends one token to every stream
and reads back the k full next-token distributions, through the async engine API exactly as the
session driver calls it (worker-thread hop and ``Dist`` construction included). Reported per k:

* ``ms_per_step``: median wall time of one step;
* ``answer_tokens_per_s``: steps per second (one answer token per step: what the user sees);
* ``stream_tokens_per_s``: k x that (positions decoded by llama.cpp);
* ``batching_speedup``: k one-stream steps' time / one k-stream step's time (1.0 = no gain
  from putting the k streams in one ``llama_decode``);
* ``prefill_s`` / ``prefill_tokens_per_s``: ``open_group`` (shared system prefix once, then
  the k document+query remainders);
* ``rollback_ms``: roll back 4 tokens, append 4 others, compute (a rejected draft of depth 4).

Run: ``python -m benchmarks.bench_llamacpp_streams [--ks 1 2 4] [--steps 64] [--threads N]``.
Writes ``benchmarks/results/llamacpp_streams.json`` and prints a table. This machine's 2 cores
are shared: the JSON records the load average, compare numbers from one run only.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
PASSAGES = [
    "The Eiffel Tower is a wrought-iron lattice tower on the Champ de Mars in Paris, France. It is named "
    "after the engineer Gustave Eiffel, whose company designed and built the tower from 1887 to 1889 as the "
    "centerpiece of the 1889 World's Fair. Although initially criticised by some of France's leading artists "
    "and intellectuals for its design, it has since become a global cultural icon of France.",
    "Mount Everest is Earth's highest mountain above sea level, located in the Mahalangur Himal sub-range of "
    "the Himalayas. The China-Nepal border runs across its summit point. Its elevation of 8,848.86 m was most "
    "recently established in 2020 by the Chinese and Nepali authorities. Climbers attempt it mostly from the "
    "south-east ridge in Nepal and the north ridge in Tibet.",
    "The Great Barrier Reef is the world's largest coral reef system, composed of over 2,900 individual reefs "
    "and 900 islands stretching for over 2,300 kilometres over an area of approximately 344,400 square "
    "kilometres. The reef is located in the Coral Sea, off the coast of Queensland, Australia, and can be "
    "seen from outer space.",
    "Johann Sebastian Bach was a German composer and musician of the late Baroque period. He is known for "
    "orchestral music such as the Brandenburg Concertos; instrumental compositions such as the Cello Suites; "
    "keyboard works such as the Goldberg Variations and The Well-Tempered Clavier; organ works; and vocal "
    "music such as the St Matthew Passion and the Mass in B minor.",
]
QUERY = "Which of these is the oldest, and why is it famous?"


def build_prompts(tok, k: int) -> list[list[int]]:
    from dragon_core.prompt import document_prompt

    return [document_prompt(tok, PASSAGES[i % len(PASSAGES)], QUERY) for i in range(k)]


async def measure(engine, prompts: list[list[int]], steps: int, repeats: int) -> dict:
    k = len(prompts)
    prefill, step_ms, rollback_ms = [], [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        group = await engine.open_group(prompts)
        dists = await group.next_dists()
        prefill.append(time.perf_counter() - t0)
        for _ in range(steps):
            t0 = time.perf_counter()
            await group.append([dists[0].argmax()])
            dists = await group.next_dists()
            step_ms.append((time.perf_counter() - t0) * 1e3)
        for _ in range(4):  # a depth-4 draft rejected at its first token
            n = group.length
            t0 = time.perf_counter()
            await group.rollback(n - 4)
            await group.append([dists[0].argmax()] * 4)
            dists = await group.next_dists()
            rollback_ms.append((time.perf_counter() - t0) * 1e3)
        await group.close()
    ms = statistics.median(step_ms)
    n_prompt = sum(len(p) for p in prompts)
    return {
        "k": k,
        "prompt_tokens": n_prompt,
        "ms_per_step": round(ms, 2),
        "ms_per_step_p90": round(sorted(step_ms)[int(0.9 * len(step_ms))], 2),
        "answer_tokens_per_s": round(1e3 / ms, 1),
        "stream_tokens_per_s": round(k * 1e3 / ms, 1),
        "prefill_s": round(statistics.median(prefill), 3),
        "prefill_tokens_per_s": round(n_prompt / statistics.median(prefill), 1),
        "rollback_ms": round(statistics.median(rollback_ms), 2),
    }


async def run(args) -> dict:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer

    from dragon_host.models import get_model
    from dragon_edge.engines.llamacpp import LlamaCppEngine

    spec = get_model(args.model)
    tok = AutoTokenizer.from_pretrained(str(spec.tokenizer_dir()))
    engine = LlamaCppEngine(spec.gguf_path(), n_threads=args.threads)
    await measure(engine, build_prompts(tok, 1), 4, 1)  # warm-up: page the weights in
    rows = [await measure(engine, build_prompts(tok, k), args.steps, args.repeats) for k in args.ks]
    await engine.close()
    base = next((r["ms_per_step"] for r in rows if r["k"] == 1), None)
    for r in rows:
        r["batching_speedup"] = round(r["k"] * base / r["ms_per_step"], 2) if base else None
    return {
        "benchmark": "llamacpp_streams",
        "model": args.model,
        "gguf": spec.gguf_file,
        "n_threads": engine.n_threads,
        "steps": args.steps,
        "repeats": args.repeats,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                    "loadavg_1m": round(os.getloadavg()[0], 2)},
        "rows": rows,
    }


def print_table(result: dict) -> None:
    print(f"llama.cpp {result['gguf']}, {result['n_threads']} threads, load {result['machine']['loadavg_1m']}")
    print(f"{'k':>2} {'ms/step':>8} {'p90':>7} {'answer tok/s':>13} {'stream tok/s':>13} "
          f"{'speedup':>8} {'prefill s':>10} {'prefill tok/s':>14} {'rollback ms':>12}")
    for r in result["rows"]:
        print(f"{r['k']:>2} {r['ms_per_step']:>8} {r['ms_per_step_p90']:>7} {r['answer_tokens_per_s']:>13} "
              f"{r['stream_tokens_per_s']:>13} {r['batching_speedup']:>8} {r['prefill_s']:>10} "
              f"{r['prefill_tokens_per_s']:>14} {r['rollback_ms']:>12}")


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--ks", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--steps", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="llama.cpp threads (default: all cores)")
    p.add_argument("--out", type=Path, default=RESULTS / "llamacpp_streams.json")
    args = p.parse_args(argv)
    result = asyncio.run(run(args))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print_table(result)
    print(f"(results in {args.out})")
    return result


if __name__ == "__main__":
    main()
