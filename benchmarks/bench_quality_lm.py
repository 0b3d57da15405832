"""Language-modelling quality: WikiText-2 perplexity with and without retrieval (issue 13, item 1).

The DRAGON paper's setup (docs/ALGORITHMS.md §5), scaled to this machine:

* **windows**: the WikiText-2 *test* text (raw) is tokenized once and cut into non-overlapping
  windows of ``--window`` tokens (256); a seeded sample of ``--windows`` of them is scored. The
  first 1/8 of a window is the retrieval query and the context every mode sees; the remaining
  7/8 are the target tokens, scored by teacher forcing;
* **corpus**: WikiText-2 *valid* in 64-word passages (the project's ``chunk_words``), embedded
  with the project's retriever (MiniLM, ``R = 10·cos``), split at random into a device half and a
  cloud half; each side retrieves its own top-k;
* **scoring**: one llama.cpp stream group per window (the device engine, SmolLM2-135M Q4_1)
  holds every prompt the modes need; the reference tokens are appended one at a time and each
  stream's distribution is read before each (``next_dists`` / ``append``: the engine interface
  as the sessions use it, no text generation). Output aggregation is the project's own
  (``dragon_core.aggregate``): ``side_mixture`` per side, ``cross_side_weights`` across sides.

Modes: no retrieval; device-only and cloud-only output aggregation over their top-k; DRAGON over
both sides' top-k (k = 1, 2, 4, 8 per side: 2-16 documents); and the DRCG baseline, context
concatenation: the 2k passages of both sides, best score first, in one prompt cut to a
``--budget`` of 256 tokens. A document stream reads ``passage + "\\n\\n" + context``; the plain
text layout (no chat template) because this is language modelling, not a question.

Every side's documents run on the same engine here (the paper also ran one model on both sides):
quality does not depend on where a stream is computed, up to the engines' numerics.

    python -m benchmarks.bench_quality_lm [--windows 64] [--ks 1 2 4 8] [--data DIR]
    python -m benchmarks.bench_quality_lm --quick      # a CI-sized run (tests/e2e/test_bench_quality.py)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from benchmarks.shared_data import data_dir
from dragon_core.aggregate import cross_side_weights, side_mixture

RESULTS = Path(__file__).parent / "results"
SIDES = ("device", "cloud")
SEP = "\n\n"


# ---------------------------------------------------------------------------- corpus
@dataclass
class Corpus:
    """Passages with their embeddings and the side each one lives on."""

    texts: list[str]
    vectors: np.ndarray  # (n, dim), L2-normalised
    side: np.ndarray  # (n,) 0 = device, 1 = cloud

    def top_k(self, query_vec: np.ndarray, side: int, k: int, embedder) -> tuple[list[int], list[float]]:
        """The side's ``k`` best passages and their scores ``R`` (exact search, best first)."""
        idx = np.flatnonzero(self.side == side)
        scores = embedder.score.scores(query_vec, self.vectors[idx])
        best = np.argsort(-scores, kind="stable")[:k]
        return [int(idx[i]) for i in best], [float(scores[i]) for i in best]


def load_corpus(path: Path, embedder, seed: int, limit: int | None = None) -> Corpus:
    """WikiText-2 valid in 64-word passages, split at random into two halves."""
    from dragon_core.retrieval import chunk_words
    from dragon_vllm.corpus import read_documents

    texts = [p for doc in read_documents(path, "wikitext") for p in chunk_words(doc.text)]
    rng = np.random.default_rng(seed)
    if limit is not None and limit < len(texts):
        texts = [texts[i] for i in sorted(rng.choice(len(texts), limit, replace=False))]
    side = rng.permutation(np.arange(len(texts)) % 2)  # exactly half on each side
    return Corpus(texts, embedder.embed(texts, batch_size=64), side)


def sample_windows(ids: Sequence[int], window: int, n: int, seed: int) -> list[tuple[int, list[int]]]:
    """``n`` non-overlapping windows (start, tokens), chosen at random, in text order."""
    starts = np.arange(0, len(ids) - window + 1, window)
    chosen = np.sort(np.random.default_rng(seed).choice(starts, min(n, starts.size), replace=False))
    return [(int(s), list(ids[s:s + window])) for s in chosen]


# ---------------------------------------------------------------------------- one window
@dataclass
class WindowScores:
    """``logp[name]``: the log-prob of each target token under one prompt."""

    logp: dict[str, np.ndarray]
    retrieved: dict[str, tuple[list[int], list[float]]]  # side -> (passage ids, scores)
    concat_tokens: dict[int, int]  # documents -> prompt tokens before the context
    concat_docs_kept: dict[int, int]  # documents -> passages at least partly inside the budget
    argmax: dict[str, np.ndarray] = field(default_factory=dict)  # "device/k", "dragon/2k" -> greedy id per step


def concat_prompt(tokenizer, passages: Sequence[str], budget: int) -> tuple[list[int], int]:
    """DRCG's context: the passages best first, joined, cut to ``budget`` tokens (the separator
    before the context included); returns the ids and how many passages it reaches into."""
    sep = _encode(tokenizer, SEP)
    room = budget - len(sep)
    ids: list[int] = []
    reached = 0
    for p in passages:
        if len(ids) >= room:
            break
        ids += (sep if ids else []) + _encode(tokenizer, p)
        reached += 1
    return ids[:room] + sep, reached


async def score_window(engine, tokenizer, embedder, corpus: Corpus, window: list[int], ks: Sequence[int],
                       budget: int) -> WindowScores:
    """Teacher-force one window through every prompt the modes need, in one stream group."""
    n_ctx = len(window) // 8
    context, targets = window[:n_ctx], window[n_ctx:]
    query_vec = embedder.embed_query(tokenizer.decode(context))
    kmax = max(ks)
    retrieved = {name: corpus.top_k(query_vec, s, kmax, embedder) for s, name in enumerate(SIDES)}
    prompts: dict[str, list[int]] = {"none": list(context)}
    for name, (ids, _) in retrieved.items():
        for j, pid in enumerate(ids):
            prompts[f"{name}/{j}"] = _encode(tokenizer, corpus.texts[pid] + SEP) + context
    concat_tokens, concat_kept = {}, {}
    for k in ks:
        merged = sorted(((sc, pid) for ids, scores in retrieved.values() for pid, sc in zip(ids[:k], scores[:k])),
                        key=lambda t: -t[0])
        ids, kept = concat_prompt(tokenizer, [corpus.texts[pid] for _, pid in merged], budget)
        prompts[f"concat/{2 * k}"], concat_tokens[2 * k], concat_kept[2 * k] = ids + context, len(ids), kept
    # identical prompts (concatenations saturated at the budget) are computed once: the cost
    # here is compute-bound, ~0.3 GFLOP per token on 2 cores
    unique = list(dict.fromkeys(tuple(p) for p in prompts.values()))
    group = await engine.open_group([list(p) for p in unique], 1.0)
    rows = np.empty((len(unique), len(targets)))
    doc_rows = {name: unique.index(tuple(p)) for name, p in prompts.items()}
    argmax: dict[str, np.ndarray] = {}
    try:
        for t, token in enumerate(targets):
            dists = await group.next_dists()
            rows[:, t] = [float(d.logprobs[token]) for d in dists]
            for name, top in greedy_ids(dists, doc_rows, retrieved, ks).items():
                argmax.setdefault(name, np.empty(len(targets), dtype=np.int64))[t] = top
            await group.append([token])
    finally:
        await group.close()
    logp = {name: rows[doc_rows[name]] for name in prompts}
    return WindowScores(logp, retrieved, concat_tokens, concat_kept, argmax)


def greedy_ids(dists, doc_rows: dict[str, int], retrieved, ks: Sequence[int]) -> dict[str, int]:
    """This step's greedy id of each side's k-document mixture and of DRAGON's (CONCORD's
    debt needs to know whether the cloud's evidence would have changed the device's token).
    The argmax of ``sum_j w_j p_j`` needs no log-space care: float64 probabilities."""
    out, mixed = {}, {}
    for k in ks:
        h = {}
        for name in SIDES:
            ids, scores = retrieved[name]
            n = min(k, len(ids))
            w = np.exp(np.asarray(scores[:n], dtype=np.float64) - max(scores[:n]))
            probs = np.stack([np.exp(np.asarray(dists[doc_rows[f"{name}/{j}"]].logprobs, dtype=np.float64))
                              for j in range(n)])
            mixed[name] = (w / w.sum()) @ probs
            h[name] = float(np.log(w.sum()) + max(scores[:n]))
        eta_d, eta_c = cross_side_weights(h["device"], h["cloud"])
        out[f"device/{k}"] = int(np.argmax(mixed["device"]))
        out[f"dragon/{2 * k}"] = int(np.argmax(eta_d * mixed["device"] + eta_c * mixed["cloud"]))
    return out


def concord_logp(ws: WindowScores, k: int, wait_steps: float, d_max: float) -> tuple[np.ndarray, np.ndarray]:
    """CONCORD's log-prob of every target token (docs/CONCORD.md): a step that consults the cloud
    scores under DRAGON's mixture (a consulted step commits dense DRAGON's token), a step committed
    locally under the device's own; which it is, the waiting debt decides as on the device
    (``WaitingDebt`` with the session's defaults): a consulted step costs ``wait_steps`` local
    steps of waiting, and every step's evidence (late, for a local one) says whether it changed
    the device's greedy token. Returns (log-probs, consulted mask)."""
    from dragon_core.certificate import WaitingDebt
    from dragon_core.concord import GAIN, RHO

    debt = WaitingDebt(d_max=d_max, rho=RHO, gain=GAIN)
    sides, dragon = sides_and_dragon(ws, k)
    device = sides["device"]
    changed = ws.argmax[f"dragon/{2 * k}"] != ws.argmax[f"device/{k}"]
    lp, consulted = np.empty_like(device), np.zeros(len(device), dtype=bool)
    for t in range(len(device)):
        consulted[t] = debt.should_wait()
        lp[t] = dragon[t] if consulted[t] else device[t]
        debt.record(wait_steps if consulted[t] else 0.0, bool(changed[t]))
    return lp, consulted



def mode_logp(ws: WindowScores, ks: Sequence[int]) -> dict[str, np.ndarray]:
    """Each mode's log-prob of every target token, from the per-prompt ones, through the project's
    aggregation: a side mixes its documents by ``softmax(R)`` and reports ``log h``; DRAGON weighs
    the two side mixtures by ``η``. A column of log-probs mixes like a whole vocabulary row."""
    out = {"none": ws.logp["none"]}
    for k in ks:
        side_lp, out[f"dragon/{2 * k}"] = sides_and_dragon(ws, k)
        out.update({f"{name}/{k}": lp for name, lp in side_lp.items()})
        out[f"concat/{2 * k}"] = ws.logp[f"concat/{2 * k}"]
    return out


def sides_and_dragon(ws: WindowScores, k: int) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Each side's k-document mixture and DRAGON's, as log-probs of the target tokens."""
    side_lp, side_h = {}, {}
    for name in SIDES:
        ids, scores = ws.retrieved[name]
        rows = np.stack([ws.logp[f"{name}/{j}"] for j in range(min(k, len(ids)))])
        side_lp[name], side_h[name] = side_mixture(rows, scores[:k])
    eta_d, eta_c = cross_side_weights(side_h["device"], side_h["cloud"])
    return side_lp, np.logaddexp(math.log(eta_d) + side_lp["device"], math.log(eta_c) + side_lp["cloud"])


# ---------------------------------------------------------------------------- the run
def summarize(per_mode: dict[str, list[np.ndarray]], ks: Sequence[int]) -> dict[str, Any]:
    """Perplexity per mode (over all target tokens), gains over no retrieval, DRAGON ÷ concat."""
    ppl = {name: math.exp(-float(np.concatenate(v).mean())) for name, v in per_mode.items()}
    base = ppl["none"]
    table = []
    for k in ks:
        n = 2 * k
        row = dict(documents=n, k_per_side=k, device=ppl[f"device/{k}"], cloud=ppl[f"cloud/{k}"],
                   dragon=ppl[f"dragon/{n}"], concat=ppl[f"concat/{n}"])
        row.update({f"gain_{m}": base - row[m] for m in ("device", "cloud", "dragon", "concat")})
        table.append(row)
    best_concat = max(r["gain_concat"] for r in table)
    last = table[-1]
    return dict(perplexity=ppl, no_retrieval=base, table=table, best_concat_gain=best_concat,
                dragon_over_best_concat_at_max=last["gain_dragon"] / best_concat if best_concat > 0 else None,
                dragon_over_concat_same_docs=[r["gain_dragon"] / r["gain_concat"] if r["gain_concat"] > 0 else None
                                              for r in table])


def concord_rows(ppl: dict[str, float], consulted: dict[str, list[np.ndarray]], args) -> list[dict]:
    """CONCORD's perplexity per waiting cost, against dense DRAGON and device-only at the same k."""
    k, rows = args.concord_k, []
    dragon, device = ppl[f"dragon/{2 * k}"], ppl[f"device/{k}"]
    for wait in args.concord_wait_steps:
        c = ppl[f"concord/{2 * k}@{wait:g}"]
        rows.append(dict(k_per_side=k, wait_steps=wait, debt_max=args.concord_debt_max, perplexity=c,
                         over_dragon=c / dragon, over_device_only=c / device,
                         consulted=float(np.concatenate(consulted[f"consulted@{wait:g}"]).mean())))
    return rows


def bootstrap_ratio(per_mode: dict[str, list[np.ndarray]], k: int, ks: Sequence[int], reps: int = 1000,
                    seed: int = 0) -> list[float]:
    """95% interval of DRAGON's gain ÷ the best concatenation gain, resampling windows."""
    rng = np.random.default_rng(seed)
    n = len(per_mode["none"])
    out = []
    for _ in range(reps):
        pick = rng.integers(0, n, n)
        ppl = {m: math.exp(-float(np.concatenate([per_mode[m][i] for i in pick]).mean()))
               for m in ["none", f"dragon/{2 * k}", *(f"concat/{2 * j}" for j in ks)]}
        best = max(ppl["none"] - ppl[f"concat/{2 * j}"] for j in ks)
        if best > 0:
            out.append((ppl["none"] - ppl[f"dragon/{2 * k}"]) / best)
    return [float(np.percentile(out, 2.5)), float(np.percentile(out, 97.5))] if out else []


async def run(args: argparse.Namespace, engine=None, tokenizer=None, embedder=None) -> dict[str, Any]:
    from tqdm import tqdm

    from benchmarks.environment import describe
    from dragon_host.embedder import default_embedder
    from dragon_edge.loader import load_tokenizer

    t0 = time.time()
    data = data_dir(args.data)
    tokenizer = tokenizer or load_tokenizer(args.model)
    embedder = embedder or default_embedder()
    own_engine = engine is None
    if own_engine:
        from dragon_edge.engines.llamacpp import LlamaCppEngine

        # a context per stream just big enough for the longest prompt + window
        engine = LlamaCppEngine.from_name(args.model, n_ctx=args.budget + args.window + 64, n_threads=args.threads)
    corpus = load_corpus(data / "wikitext-2-raw" / "wiki.valid.raw", embedder, args.seed, args.corpus_limit)
    test_ids = _encode(tokenizer, (data / "wikitext-2-raw" / "wiki.test.raw").read_text(encoding="utf-8"))
    windows = sample_windows(test_ids, args.window, args.windows, args.seed)
    per_mode: dict[str, list[np.ndarray]] = {}
    samples = []
    try:
        for start, window in tqdm(windows, desc="windows", disable=args.quiet):
            ws = await score_window(engine, tokenizer, embedder, corpus, window, args.ks, args.budget)
            for name, lp in mode_logp(ws, args.ks).items():
                per_mode.setdefault(name, []).append(lp)
            for wait in args.concord_wait_steps:
                lp, consulted = concord_logp(ws, args.concord_k, wait, args.concord_debt_max)
                per_mode.setdefault(f"concord/{2 * args.concord_k}@{wait:g}", []).append(lp)
                per_mode.setdefault(f"consulted@{wait:g}", []).append(consulted.astype(np.float64))
            samples.append(dict(start=start, retrieved={s: ws.retrieved[s][0] for s in SIDES},
                                concat_tokens=ws.concat_tokens, concat_passages=ws.concat_docs_kept))
    finally:
        if own_engine:
            await engine.close()
    consulted = {name: per_mode.pop(name) for name in [n for n in per_mode if n.startswith("consulted@")]}
    summary = summarize(per_mode, args.ks)
    summary["dragon_over_best_concat_ci95"] = bootstrap_ratio(per_mode, max(args.ks), args.ks)
    summary["concord"] = concord_rows(summary["perplexity"], consulted, args)
    return dict(
        benchmark="quality_lm", setup=dict(
            model=args.model, engine="llama.cpp (GGUF Q4_1), both sides", retriever="all-MiniLM-L6-v2, R = 10 cos",
            window=args.window, context_tokens=args.window // 8, target_tokens_per_window=args.window - args.window // 8,
            windows=len(windows), test_tokens=len(test_ids), corpus_passages=len(corpus.texts),
            corpus_per_side={s: int((corpus.side == i).sum()) for i, s in enumerate(SIDES)},
            ks_per_side=list(args.ks), concat_budget_tokens=args.budget, seed=args.seed, quick=args.quick),
        **summary, windows=samples, seconds=time.time() - t0,
        environment=describe(["llama_cpp_python", "transformers", "sentence-transformers", "numpy"]))


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    table = result["table"]
    docs = [r["documents"] for r in table]
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for mode, label, style in (("dragon", "DRAGON (both sides)", "o-"), ("concat", "DRCG: concatenation ≤ 256 tok", "s-"),
                               ("device", "device-only (k per side)", "^--"), ("cloud", "cloud-only (k per side)", "v--")):
        ax.plot(docs, [r[mode] for r in table], style, label=label)
    ax.axhline(result["no_retrieval"], color="gray", ls=":", label="no retrieval")
    ax.set_xscale("log", base=2)
    ax.set_xticks(docs, [str(d) for d in docs])
    ax.set_xlabel("documents in total (device-only / cloud-only: half of them)")
    ax.set_ylabel("perplexity (lower is better)")
    s = result["setup"]
    ax.set_title(f"WikiText-2 test, SmolLM2-135M: {s['windows']} windows × {s['target_tokens_per_window']} tokens",
                 fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def _encode(tokenizer, text: str) -> list[int]:
    return [int(i) for i in tokenizer.encode(text, add_special_tokens=False)]


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", help="evaluation data folder (default $DRAGON_DATA or ../shared/data)")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--windows", type=int, default=64)
    ap.add_argument("--window", type=int, default=256)
    ap.add_argument("--ks", type=int, nargs="+", default=[1, 2, 4, 8], help="documents per side")
    ap.add_argument("--budget", type=int, default=256, help="concatenation budget in tokens")
    ap.add_argument("--corpus-limit", type=int, default=None, help="use this many passages of the corpus")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=RESULTS / "quality_lm.json")
    ap.add_argument("--concord-k", type=int, default=4, help="CONCORD row: documents per side")
    ap.add_argument("--concord-debt-max", type=float, default=4.0, help="CONCORD row: the debt bound (the default)")
    ap.add_argument("--concord-wait-steps", type=float, nargs="+", default=[0.0, 1.0, 3.6, 10.7],
                    help="CONCORD row: local steps waited per consulted step (H200 testbed: a ~28 ms device "
                         "step, so RTT 100 / 300 ms without evidence ahead are 3.6 / 10.7; 0: evidence ahead)")
    ap.add_argument("--quick", action="store_true", help="1 window of 128 tokens, k = 1, 2, 200 passages")
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args(argv)
    if args.quick:
        args.windows, args.window, args.ks, args.corpus_limit = 1, 128, [1, 2], 200
    if args.concord_k not in args.ks:
        args.concord_k = max(args.ks)
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse(argv)
    result = asyncio.run(run(args))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    plot(result, args.out.with_suffix(".png"))
    print(f"no retrieval: perplexity {result['no_retrieval']:.3f}")
    print(f"{'docs':>4} {'device':>8} {'cloud':>8} {'DRAGON':>8} {'concat':>8}   gains: DRAGON / concat")
    for r in result["table"]:
        print(f"{r['documents']:>4} {r['device']:8.3f} {r['cloud']:8.3f} {r['dragon']:8.3f} {r['concat']:8.3f}"
              f"   {r['gain_dragon']:+.3f} / {r['gain_concat']:+.3f}")
    ratio = result["dragon_over_best_concat_at_max"]
    print(f"DRAGON gain at {result['table'][-1]['documents']} docs ÷ best concatenation gain: "
          f"{ratio if ratio is None else round(ratio, 2)} (95% CI {result['dragon_over_best_concat_ci95']}); "
          f"{result['seconds']:.0f} s -> {args.out}")
    return result


if __name__ == "__main__":
    main()
