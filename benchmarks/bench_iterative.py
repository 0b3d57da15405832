"""Iterative retrieval and RaLMSpec (issue 16): speculative vs plain iterative RAG, and iterative vs one-shot.

One language model and one retriever, as in RaLMSpec's own evaluation: SmolLM2-135M on
llama.cpp (the device engine here) decodes each answer alone (a solo session through the host
driver, no network), over public passages retrieved every ``--every`` tokens with the question
and the answer so far as the query (``dragon_core.iterative``). Per question and setting:

* **once**: one retrieval before the answer (DRAGON's default; quality baseline);
* **iterative**: a real retrieval at every boundary, on the critical path;
* **ralmspec**: at a boundary the streams decode at once over passages from the request's cache
  (the top-20 of each real retrieval, scored with the index's own kernel), the real retrieval runs
  beside, drafts wait for its verdict (``dragon_host.documents``). Its answer must equal
  **iterative**'s token for token (checked, every question).

Corpus: NQ-open gold passages of the sampled questions + 1,000 Wikipedia passages (the QA
benchmark's, ``../shared/data``), embedded with MiniLM; ``--pad N`` adds N SYNTHETIC random unit
vectors to the index (placeholder passages, labelled) so a search costs what a large index's does;
random vectors sit near cosine 0 and do not displace real top-k passages. ``--retriever`` picks
the search (RaLMSpec's three kinds): ``flat`` (exact dense, the default), ``ivf`` (approximate
dense: faiss IVF-Flat over the same vectors, nlist ~ sqrt(N), ``--nprobe`` lists a search) or
``bm25`` (sparse: BM25 over the real passages' text selects, the dense ``R`` weighs;
``dragon_vllm.corpus.bm25``; the SYNTHETIC vectors have no text, so ``--pad`` does not apply).
Every kind re-scores its hits canonically, so the speculation from the cache stays exact.
Reported: answer time, retrieval time on the critical path, speculation hit rate, F1 /
answer-contained per setting, and the speed-ups.

    python -m benchmarks.bench_iterative [--questions 50] [--every 4 8] [--pad 1000000]
        [--retriever flat|ivf|bm25] [--dataset nq|webquestions] [--max-depth 16]
        [--retriever flat|ivf|bm25] [--nprobe 8]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.bench_quality_qa import load_world_data
from benchmarks.qa_metrics import contains, f1
from benchmarks.shared_data import data_dir

RESULTS = Path(__file__).parent / "results"
CACHE_SIZE = 20  # RaLMSpec's cache: the top-20 of each real retrieval
SYNTHETIC = "SYNTHETIC filler passage (a random vector padding the index to a large index's search cost)"
RETRIEVERS = ("flat", "ivf", "bm25")
PAD_BLOCK = 1 << 16  # synthetic vectors made (and added) at a time


class PaddedIndex:
    """The real passages' vectors plus ``pad`` synthetic ones in one faiss index, exact
    (``kind="flat"``) or approximate (``"ivf"``: IVF-Flat, nlist ~ sqrt(N), ``nprobe`` lists a
    search): the interface ``PublicDocuments`` uses (``embed_query``, ``search_vector``,
    ``vectors``, ``score_vectors``). Hits are re-scored with the canonical kernel, so flat and
    IVF give a passage the same bits and only differ in which passages they find."""

    def __init__(self, real, pad: int, seed: int = 0, *, kind: str = "flat", nprobe: int = 8) -> None:
        from dragon_core.passage import Passage

        self.real, self.Passage, self.kind = real, Passage, kind
        n, d = real.index.ntotal, real.index.d
        blocks = _vector_blocks(real.index.reconstruct_n(0, n), pad, d, seed)
        if kind == "flat":
            self.faiss_index, self.nlist = _flat_index(blocks, d), None
        elif kind == "ivf":
            self.nlist = max(1, round(math.sqrt(n + pad)))
            self.faiss_index = _ivf_index(blocks, d, self.nlist, nprobe)
        else:
            raise ValueError(f"PaddedIndex kind must be flat or ivf, not {kind!r}")
        self.n_real = n

    def __len__(self) -> int:
        return self.faiss_index.ntotal

    def embed_query(self, query: str) -> np.ndarray:
        return self.real.embed_query(query)

    def search_vector(self, q: np.ndarray, k: int):
        """As ``PublicIndex.search_vector``: the hits re-scored with the canonical kernel, ranked."""
        return self.search_vectors(np.asarray(q, dtype=np.float32).reshape(1, -1), k)[0]

    def search_vectors(self, queries: np.ndarray, k: int):
        """As ``PublicIndex.search_vectors``: several queries in one faiss search."""
        from dragon_vllm.corpus.index import canonical_hits

        queries = np.ascontiguousarray(queries, dtype=np.float32)
        _, ids = self.faiss_index.search(queries, k)
        return [[self._passage(i, score) for i, score in h] for h in canonical_hits(self, queries, ids)]

    def _passage(self, i: int, score: float):
        if i < self.n_real:
            title, text = self.real.passage(i)
            return self.Passage(i, text, score, title=title)
        return self.Passage(i, SYNTHETIC, score, title="SYNTHETIC")

    def vectors(self, ids) -> np.ndarray:
        return np.ascontiguousarray(self.faiss_index.reconstruct_batch(np.asarray(ids, dtype=np.int64)),
                                    dtype=np.float32)

    def score_vectors(self, q, vectors):
        return self.real.score_vectors(q, vectors)


def _vector_blocks(real_vectors: np.ndarray, pad: int, d: int, seed: int):
    """The real vectors, then ``pad`` SYNTHETIC random unit vectors in blocks (the same vectors
    for a seed whatever the index kind)."""
    yield real_vectors
    rng = np.random.default_rng(seed)
    for start in range(0, pad, PAD_BLOCK):
        x = rng.standard_normal((min(PAD_BLOCK, pad - start), d), dtype=np.float32)
        yield x / np.linalg.norm(x, axis=1, keepdims=True)


def _flat_index(blocks, d: int):
    import faiss

    index = faiss.IndexFlatIP(d)
    for x in blocks:
        index.add(x)
    return index


def _ivf_index(blocks, d: int, nlist: int, nprobe: int):
    """IVF-Flat trained on the real vectors and the first block of SYNTHETIC ones (a uniform
    sample of them: >= 39 points a list for a million pads), then filled with all."""
    import faiss

    head = [x for x in (next(blocks), next(blocks, None)) if x is not None]
    train = np.concatenate(head)
    if len(train) < nlist:
        raise ValueError(f"IVF with {nlist} lists needs >= {nlist} training vectors, has {len(train)}")
    index = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, nlist, faiss.METRIC_INNER_PRODUCT)
    index.train(train)
    for x in head:
        index.add(x)
    for x in blocks:
        index.add(x)
    index.nprobe = nprobe
    index.make_direct_map()  # reconstruct_batch: the cache's stored vectors
    return index


def build_retriever(real, args: argparse.Namespace):
    """The searched index for ``--retriever``, and what to record of it in the setup."""
    if args.retriever == "bm25":
        from dragon_vllm.corpus.bm25 import B, K1, METHOD, Bm25Index

        index = Bm25Index.over(real)
        return index, dict(index=f"BM25 selects (bm25s, {METHOD}, k1={K1}, b={B}) over the real passages; "
                                 f"the dense R (MiniLM, flat, faiss-cpu) weighs", synthetic_padding=0,
                           synthetic_padding_note="bm25: the SYNTHETIC pad vectors have no text; BM25 runs over "
                                                  "the real passages only (--pad not applied)")
    index = PaddedIndex(real, args.pad, args.seed, kind=args.retriever, nprobe=args.nprobe)
    if args.retriever == "ivf":
        return index, dict(index=f"IVF-Flat (approximate dense), nlist={index.nlist}, nprobe={args.nprobe}, "
                                 f"faiss-cpu; hits re-scored canonically", synthetic_padding=args.pad,
                           nlist=index.nlist, nprobe=args.nprobe)
    return index, dict(index="flat (exact dense), faiss-cpu", synthetic_padding=args.pad)


def source_for(engine, tokenizer, index, question: str, k: int, max_tokens: int, every: int, speculate: bool,
               cache_size: int = CACHE_SIZE):
    """The request's ``DocumentSource``: the cloud's own ``PublicDocuments`` (``cache_size``:
    passages of each real retrieval kept for speculation, RaLMSpec's 20). On the vLLM engine it
    opens what ``dragon-cloud serve`` opens (a gang mixed in vLLM, reopened at a boundary over
    vLLM's prefix cache); on llama.cpp a per-document group, kept while its documents stay."""
    from dragon_core import messages as m
    from dragon_core.prompt import passage_prompts
    from dragon_vllm.public_documents import PublicDocuments

    class Backend:
        emulate_decode_ms = 0.0

        def _check_length(self, prompts, max_tokens: int) -> None:
            pass  # n_ctx / max_model_len are set with room for the answer

    backend = Backend()
    backend.index, backend.tokenizer, backend.engine = index, tokenizer, engine
    req = m.Open(0, question, k, max_tokens, 0, retrieve_every=every)
    if _is_vllm(engine):
        return PublicDocuments(backend, req, speculate=speculate, cache_size=cache_size)

    class Documents(PublicDocuments):
        async def open(self, docs):
            prompts, _ = passage_prompts(tokenizer, question, [p.text for p in docs.payload], list(docs.scores))
            return await engine.open_group(prompts, 1.0)

    return Documents(backend, req, speculate=speculate, cache_size=cache_size)


def _is_vllm(engine) -> bool:
    return type(engine).__module__.startswith("dragon_vllm")


async def answer(engine, tokenizer, eos_ids, index, question: str, k: int, max_tokens: int, every: int,
                 speculate: bool, max_depth: int = 16, cache_size: int = CACHE_SIZE, when_idle: bool = False) -> dict:
    """One solo answer; its tokens, wall time, and the documents' stats."""
    from dragon_core import session as s
    from dragon_core.aggregate import log_mass
    from dragon_host.driver import SessionDriver

    t0 = time.perf_counter()
    source = source_for(engine, tokenizer, index, question, k, max_tokens, max(every, 1), speculate, cache_size)
    first = await source.retrieve(())
    group = await source.open(first)
    config = s.SessionConfig(request_id=0, max_tokens=max_tokens, seed=0, eos_ids=frozenset(eos_ids),
                             aggregator="cloud", scheduling=False, retrieve_every=every, max_depth=max_depth)
    session = s.Session("cloud", config, log_mass(first.scores), solo=True)

    async def no_send(msg) -> None:
        return None

    driver = SessionDriver(session, group, list(first.scores), no_send, documents=source if every else None)
    if driver.documents is not None:
        driver.documents.policy.when_idle = when_idle  # --verify: asynchronous when idle, or OS³'s stride only
    try:
        await driver.run()
    finally:
        await driver.group.close()
    st = driver.documents.stats if driver.documents is not None else None
    tokens = list(session.committed)
    return dict(tokens=tokens, text=tokenizer.decode(tokens, skip_special_tokens=True),
                seconds=time.perf_counter() - t0,
                waited_s=st.waited_s if st else 0.0, retrievals=st.retrievals if st else 0,
                swaps=st.swaps if st else 0,
                speculated=st.speculated if st else 0, right=st.speculated_right if st else 0,
                wrong=st.speculated_wrong if st else 0, retrieval_rollbacks=session.stats.retrieval_rollbacks,
                verifications=st.verifications if st else 0, largest_batch=st.largest_batch if st else 0)


async def run(args: argparse.Namespace) -> dict[str, Any]:
    from tqdm import tqdm

    from benchmarks.environment import describe
    from dragon_core.prompt import eos_token_ids
    from dragon_edge.loader import load_tokenizer
    from dragon_vllm.corpus import PublicIndex

    import faiss

    faiss.omp_set_num_threads(args.faiss_threads)
    t_start = time.time()
    # the engine first: vLLM forks its engine core, and a CUDA context made before (the embedder's,
    # on a GPU machine) cannot be used in a forked child
    engine = await load_engine(args)
    data = data_dir(args.data)
    questions, docs = load_world_data(data, args.questions, args.wiki, args.seed)
    if args.dataset == "webquestions":  # the same corpus (NQ's gold passages + Wikipedia), other questions
        questions = load_webquestions(data, args.questions, args.seed)
    root = Path(args.work)
    root.mkdir(parents=True, exist_ok=True)
    with open(root / "public.jsonl", "w", encoding="utf-8") as f:
        for name, text in docs.items():
            f.write(json.dumps({"title": name, "text": text}) + "\n")
    t0 = time.perf_counter()
    real = PublicIndex.build([root / "public.jsonl"], root / "index", progress=not args.quiet, overwrite=True,
                             kind="flat")
    build_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    index, retriever_setup = build_retriever(real, args)
    retriever_build_s = time.perf_counter() - t0
    q = index.embed_query(questions[0].question)
    t0 = time.perf_counter()
    for _ in range(5):
        index.search_vector(q, 20)
    search_ms = (time.perf_counter() - t0) / 5 * 1e3
    tokenizer = load_tokenizer(args.model)
    eos = eos_token_ids(tokenizer)
    policies = {"idle": [("ralmspec", True)], "os3": [("ralmspec", False)],
                "both": [("ralmspec", True), ("ralmspec_os3", False)]}[args.verify]
    settings = [("once", 0, False, False)] + [(name, n, spec, idle) for n in args.every
                                              for name, spec, idle in (("iterative", False, False),
                                                                       *((p, True, i) for p, i in policies))]
    rows: list[dict] = []
    try:
        for qn in tqdm(questions, desc="questions", disable=args.quiet):
            if args.budget_s and time.time() - t_start > args.budget_s:
                break  # a lent machine's call has a hard limit: keep what was answered
            row = dict(line=qn.line, question=qn.question, answers=qn.answers)
            for name, every, spec, idle in settings:
                a = await answer(engine, tokenizer, eos, index, qn.question, args.k, args.max_tokens, every, spec,
                                 args.max_depth, when_idle=idle)
                a.update(f1=f1(a["text"], qn.answers), contains=contains(a["text"], qn.answers))
                row[f"{name}@{every}" if every else name] = a
            rows.append(row)
    finally:
        await engine.close()
    return dict(benchmark="iterative", setup=dict(
        model=args.model, engine=engine_label(args), k=args.k,
        dataset=args.dataset,
        faiss_threads=args.faiss_threads, verify=args.verify,
        max_tokens=args.max_tokens, max_depth=args.max_depth, every=args.every, questions=len(rows),
        questions_sampled=len(questions), budget_s=args.budget_s,
        corpus_passages=len(real),
        retriever=args.retriever, **retriever_setup, search_ms_top20=round(search_ms, 2),
        build_s=round(build_s, 1), retriever_build_s=round(retriever_build_s, 1), cache_size=CACHE_SIZE, seed=args.seed),
        summary=summarize(rows, args.every), rows=rows, seconds=round(time.time() - t_start, 1),
        environment=describe(["llama_cpp_python", "faiss-cpu", "bm25s", "numpy"]))


async def load_engine(args: argparse.Namespace):
    """The decoding engine: llama.cpp (``--threads``) or the cloud's vLLM engine (bound to
    ``--engine-cores``, as ``dragon-cloud serve`` runs it: gangs, prefix caching)."""
    if args.engine == "llamacpp":
        from dragon_edge.engines.llamacpp import LlamaCppEngine

        return LlamaCppEngine.from_name(args.model, n_ctx=1024, n_threads=args.threads)
    import os

    from dragon_host.models import get_model
    from dragon_vllm.engine import make_engine

    os.environ["VLLM_CPU_OMP_THREADS_BIND"] = args.engine_cores
    return make_engine(str(get_model(args.model).hf_dir()), max_num_seqs=8, max_model_len=1024)


def engine_label(args: argparse.Namespace) -> str:
    if args.engine == "llamacpp":
        return f"llama.cpp, {args.threads} threads, solo (no network)"
    return f"vLLM (the cloud's engine: gangs mixed in vLLM, prefix caching), cores {args.engine_cores}, solo (no network)"


def load_webquestions(data: Path, n: int, seed: int) -> list:
    """A seeded sample of WebQuestions' test set (``other_qa/webquestions/test.json``). It has no
    gold passages: its answers are looked for in the same corpus as NQ's (which holds their
    passages only by chance), so its scores say how iterative retrieval fares on questions the
    corpus was not built for."""
    from benchmarks.bench_quality_qa import Question

    rows = json.loads((data / "other_qa" / "webquestions" / "test.json").read_text(encoding="utf-8"))
    picked = sorted(np.random.default_rng(seed).choice(len(rows), min(n, len(rows)), replace=False).tolist())
    return [Question(i, rows[i]["qText"], list(rows[i]["answers"]), "") for i in picked]


def summarize(rows: list[dict], everys) -> dict:
    out: dict[str, Any] = {"once": _agg(rows, "once")}
    for n in everys:
        it, sp = _agg(rows, f"iterative@{n}"), _agg(rows, f"ralmspec@{n}")
        same = sum(r[f"iterative@{n}"]["tokens"] == r[f"ralmspec@{n}"]["tokens"] for r in rows)
        out[f"every {n}"] = dict(iterative=it, ralmspec=sp, identical_answers=f"{same}/{len(rows)}",
                                 speedup_end_to_end=round(it["seconds"] / sp["seconds"], 3),
                                 speedup_retrieval=round(it["waited_s"] / max(sp["waited_s"], 1e-9), 3))
        if rows and f"ralmspec_os3@{n}" in rows[0]:  # --verify both: OS³'s stride alone, same questions
            os3 = _agg(rows, f"ralmspec_os3@{n}")
            same = sum(r[f"iterative@{n}"]["tokens"] == r[f"ralmspec_os3@{n}"]["tokens"] for r in rows)
            out[f"every {n}"].update(ralmspec_os3=os3, identical_answers_os3=f"{same}/{len(rows)}",
                                     speedup_end_to_end_os3=round(it["seconds"] / os3["seconds"], 3))
    return out


def _agg(rows: list[dict], key: str) -> dict:
    xs = [r[key] for r in rows]
    spec = sum(x["speculated"] for x in xs)
    return dict(seconds=round(float(np.sum([x["seconds"] for x in xs])), 2),
                waited_s=round(float(np.sum([x["waited_s"] for x in xs])), 3),
                swaps=int(np.sum([x.get("swaps", 0) for x in xs])),  # stream groups reopened at boundaries
                tokens=int(np.sum([len(x["tokens"]) for x in xs])),
                f1=round(100 * float(np.mean([x["f1"] for x in xs])), 1),
                contains=round(100 * float(np.mean([x["contains"] for x in xs])), 1),
                retrievals=int(np.sum([x["retrievals"] for x in xs])), speculated=spec,
                hit_rate=round(sum(x["right"] for x in xs) / spec, 3) if spec else None,
                retrieval_rollbacks=int(np.sum([x["retrieval_rollbacks"] for x in xs])),
                verifications=int(np.sum([x["verifications"] for x in xs])),  # batched real retrievals (OS³)
                largest_batch=int(max((x["largest_batch"] for x in xs), default=0)))


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summ, setup = result["summary"], result["setup"]
    everys = setup["every"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    x = np.arange(len(everys))
    for off, name in ((-0.2, "iterative"), (0.2, "ralmspec")):
        ax1.bar(x + off, [summ[f"every {n}"][name]["seconds"] for n in everys], 0.4, label=name)
        ax2.bar(x + off, [summ[f"every {n}"][name]["waited_s"] for n in everys], 0.4, label=name)
    for ax, label in ((ax1, "answer time, all questions (s)"), (ax2, "retrieval on the critical path (s)")):
        ax.set_xticks(x, [f"retrieve every {n}" for n in everys])
        ax.set_ylabel(label)
        ax.legend(fontsize=8)
    fig.suptitle(f"RaLMSpec vs plain iterative retrieval: {setup['questions']} NQ questions, {setup['engine']}, "
                 f"{setup.get('retriever', 'flat')} retriever, {setup['corpus_passages']:,} real + "
                 f"{setup['synthetic_padding']:,} SYNTHETIC vectors (top-20 search {setup['search_ms_top20']} ms)",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.bench_iterative", description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", help="evaluation data folder (default $DRAGON_DATA or ../shared/data)")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--questions", type=int, default=50)
    ap.add_argument("--dataset", choices=("nq", "webquestions"), default="nq",
                    help="NQ-open (default) or WebQuestions' test set, over the same corpus")
    ap.add_argument("--wiki", type=int, default=1000, help="Wikipedia passages beside the gold ones")
    ap.add_argument("--every", type=int, nargs="+", default=[4, 8], help="retrieve every N tokens")
    ap.add_argument("--k", type=int, default=2, help="passages per retrieval")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--max-depth", type=int, default=16,
                    help="steps decoded ahead of the verified ones (RaLMSpec: bounds the OS³ stride to "
                         "max-depth / every speculations a batch)")
    ap.add_argument("--pad", type=int, default=1_000_000,
                    help="SYNTHETIC vectors added to the dense index (flat, ivf; bm25 has none: they have no text)")
    ap.add_argument("--retriever", choices=RETRIEVERS, default="flat",
                    help="flat: exact dense; ivf: faiss IVF-Flat (approximate); bm25: BM25 selects, dense R weighs")
    ap.add_argument("--nprobe", type=int, default=8, help="IVF lists searched per query (--retriever ivf)")
    ap.add_argument("--engine", choices=("llamacpp", "vllm"), default="llamacpp",
                    help="the decoding engine: llama.cpp, or vLLM as dragon-cloud serve runs it")
    ap.add_argument("--engine-cores", default="0", help="vLLM's CPU cores (VLLM_CPU_OMP_THREADS_BIND)")
    ap.add_argument("--threads", type=int, default=1, help="llama.cpp threads (decoding)")
    ap.add_argument("--faiss-threads", type=int, default=1,
                    help="faiss threads (retrieval); with --threads 1 each has its own core of two, as a GPU "
                         "server decodes on the GPU and searches on CPU cores")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work", default="/tmp/dragon_bench_iterative", help="where the index is built")
    ap.add_argument("--out", type=Path, help="result JSON (default results/iterative_cpu.json; other "
                                             "retrievers / datasets: iterative_cpu_<retriever>_<dataset>.json)")
    ap.add_argument("--verify", choices=("os3", "idle", "both"), default="os3",
                    help="when RaLMSpec starts a verification: os3 (the default: at OS³'s stride) or idle (also "
                         "whenever none is running); both: each on the same questions (idle as ralmspec, os3 as "
                         "ralmspec_os3)")
    ap.add_argument("--budget-s", type=float, default=0.0,
                    help="stop taking new questions this many seconds after the start (0: answer all); the "
                         "result holds the questions answered, every setting of each")
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args(argv)
    if args.nprobe < 1:
        ap.error("--nprobe must be >= 1")
    if args.out is None:
        suffix = ("" if args.engine == "llamacpp" else f"_{args.engine}") + \
            ("" if args.retriever == "flat" else f"_{args.retriever}") + \
            ("" if args.dataset == "nq" else f"_{args.dataset}")
        args.out = RESULTS / f"iterative_cpu{suffix}.json"
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse(argv)
    result = asyncio.run(run(args))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    plot(result, args.out.with_suffix(".png"))
    print(json.dumps(result["summary"], indent=2))
    print(f"wrote {args.out} and {args.out.with_suffix('.png')}")
    return result


if __name__ == "__main__":
    main()
