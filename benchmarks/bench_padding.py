"""How visible is the KV-block padding to the answer? (issue 13, item 4)

``dragon_core.prompt`` pads each document stream with spaces so that the cacheable part
(system prefix + document) ends on a KV block (vLLM's prefix cache then reuses the whole
document). The issue reports answers that end in runs of spaces: the answer copies the end of a
document and the run of pad spaces that followed it. Where the spaces go is the question:

* ``end``: after the document, before ``"\n\nQuestion: "`` (the layout up to issue 13);
* ``start``: before everything, at the first positions of the sequence;
* ``turn``: between the system turn and the user turn (after the system's end-of-turn): the
  layout ``dragon_core.prompt`` ships (``ADOPTED``);
* ``document``: between ``"Document:"`` and the document (shipped for a while in issue 13: on 200
  questions the model copied "label: spaces", ``'The answer is:        '``);
* ``none``: unpadded, the chat template's own tokens (the reference).

On NQ-open questions (their gold passage + one Wikipedia distractor, 64 words each, two streams
mixed by the project's ``canonical_side_dist``, llama.cpp), with bench_quality_qa's query:

* greedy answers per layout: answers ending in a whitespace run, answers with a repeated 3-gram,
  the share equal to the unpadded answer, F1;
* teacher-forced along the unpadded answer: total-variation distance to the unpadded next-token
  distribution, argmax agreement, and the mass on whitespace-only tokens (the leak shows there).

    python -m benchmarks.bench_padding [--questions 40] [--data DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import gzip
import json
import time
from pathlib import Path

import numpy as np

from benchmarks import qa_metrics as qm
from benchmarks.shared_data import data_dir
from dragon_core.aggregate import canonical_side_dist
from dragon_core.prompt import document_segments, eos_token_ids, pad_ids
from dragon_core.testing.reference import greedy_generate

RESULTS = Path(__file__).parent / "results"
QUERY = "{}? Answer in a few words."  # bench_quality_qa's
LAYOUTS = ("end", "start", "turn", "document", "none")
ADOPTED = "turn"  # the layout dragon_core.prompt ships (since issue 13; "end" before, "document" between)
SCORES = [6.0, 4.0]  # gold passage first, a distractor after (R = 10 cos scale)


def layout(tok, document: str, query: str, where: str) -> list[int]:
    """One stream's ids with the padding at ``where`` (see the module docstring): the unpadded
    ids with the same number of pad spaces inserted, whatever layout ``dragon_core.prompt``
    ships (``ADOPTED``: ``run`` checks that its ids are this function's)."""
    plain = document_segments(tok, document, query, pad=False)
    ids = plain.ids
    if where == "none":
        return ids
    num_pad = document_segments(tok, document, query).num_pad  # set by prefix + document's length only
    at = {"start": 0, "end": len(plain.prefix) + len(plain.document), "document": _after_document_label(tok),
          "turn": [i for i, t in enumerate(ids) if t == tok.convert_tokens_to_ids("<|im_start|>")][1]}[where]
    return ids[:at] + pad_ids(tok) * num_pad + ids[at:]


def _after_document_label(tok) -> int:
    """Where ``"Document:"`` ends in every unpadded stream (the system turn and the user turn's
    head are fixed): the length of the rendered template's ids up to the document."""
    from dragon_core.prompt import DEFAULT_SYSTEM, user_message

    marker = "\x00DOC\x00"
    text = tok.apply_chat_template([{"role": "system", "content": DEFAULT_SYSTEM},
                                    {"role": "user", "content": user_message(marker, "q")}],
                                   tokenize=False, add_generation_prompt=True)
    head = text.split(marker)[0].rstrip(" ")  # the space before the document goes with its first word
    return len(tok.encode(head, add_special_tokens=False))


async def greedy(engine, prompts: list[list[int]], eos: set[int], max_tokens: int) -> list[int]:
    """A greedy answer on the documents' mixture (the streams' canonical side distribution)."""
    return await greedy_generate(engine, prompts, lambda dists: canonical_side_dist(dists, SCORES).argmax(),
                                 eos, max_tokens)


async def teacher_forced(engine, prompts: list[list[int]], tokens: list[int]) -> np.ndarray:
    """The mixture's probability vectors before each of ``tokens``: ``(len, V)``."""
    group = await engine.open_group(prompts, 1.0)
    rows = []
    try:
        for token in tokens:
            rows.append(canonical_side_dist(await group.next_dists(), SCORES).probs())
            await group.append([token])
    finally:
        await group.close()
    return np.stack(rows)


async def run(args: argparse.Namespace) -> dict:
    from tqdm import tqdm

    from benchmarks.environment import describe
    from dragon_edge.engines.llamacpp import LlamaCppEngine
    from dragon_edge.loader import load_tokenizer

    t0 = time.time()
    data = data_dir(args.data)
    with gzip.open(data / "nq_open_passages" / "nq-open-oracle.jsonl.gz", "rt", encoding="utf-8") as f:
        rows = [json.loads(line) for line in f]
    with open(data / "wiki_passages_sample" / "flashrag_wiki18_sample_1000.jsonl", encoding="utf-8") as f:
        wiki = [" ".join(json.loads(line)["contents"].split()[:64]) for line in f]
    lines = sorted(np.random.default_rng(args.seed).choice(len(rows), args.questions, replace=False).tolist())
    tok = load_tokenizer(args.model)
    eos = set(eos_token_ids(tok))
    ws_ids = np.array([i for i in range(len(tok)) if i < 49152 and tok.decode([i]).isspace()])
    engine = LlamaCppEngine.from_name(args.model, n_ctx=512)
    recs = []
    try:
        for n, i in enumerate(tqdm(lines, desc="questions", disable=args.quiet)):
            r = rows[i]
            gold = " ".join(r["ctxs"][0]["text"].split()[:64])
            query = QUERY.format(r["question"])
            layouts = {name: [layout(tok, d, query, name) for d in (gold, wiki[n])] for name in LAYOUTS}
            assert layouts[ADOPTED] == [document_segments(tok, d, query).ids for d in (gold, wiki[n])]
            ans = {name: await greedy(engine, layouts[name], eos, args.max_tokens) for name in LAYOUTS}
            text = {name: tok.decode([t for t in a if t not in eos]) for name, a in ans.items()}
            ref = await teacher_forced(engine, layouts["none"], ans["none"])
            rec = dict(line=i, answers=text, f1={k: qm.f1(v, r["answers"]) for k, v in text.items()},
                       ws_mass={"none": float(ref[:, ws_ids].sum(1).mean())}, tv={}, argmax_agree={})
            for name in LAYOUTS[:-1]:
                p = await teacher_forced(engine, layouts[name], ans["none"])
                rec["tv"][name] = float(np.mean(0.5 * np.abs(p - ref).sum(1)))
                rec["argmax_agree"][name] = float(np.mean(p.argmax(1) == ref.argmax(1)))
                rec["ws_mass"][name] = float(p[:, ws_ids].sum(1).mean())
            recs.append(rec)
    finally:
        await engine.close()
    summary = {name: dict(
        trailing_whitespace_run=float(np.mean([qm.trailing_whitespace_run(x["answers"][name]) for x in recs])),
        repeated_3gram=float(np.mean([qm.repeated_ngram(x["answers"][name]) for x in recs])),
        same_as_unpadded=float(np.mean([x["answers"][name] == x["answers"]["none"] for x in recs])),
        f1=100 * float(np.mean([x["f1"][name] for x in recs])),
        whitespace_mass=float(np.mean([x["ws_mass"][name] for x in recs])),
        tv_to_unpadded=float(np.mean([x["tv"].get(name, 0.0) for x in recs])),
        argmax_agree=float(np.mean([x["argmax_agree"].get(name, 1.0) for x in recs]))) for name in LAYOUTS}
    return dict(benchmark="padding", setup=dict(model=args.model, engine="llama.cpp (GGUF Q4_1)", questions=len(lines),
                                                 seed=args.seed, max_tokens=args.max_tokens, scores=SCORES,
                                                 query=QUERY, layouts=LAYOUTS, adopted=ADOPTED),
                layouts=summary, questions=recs, seconds=time.time() - t0, environment=describe(["llama_cpp_python", "transformers"]))


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--questions", type=int, default=40)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--out", type=Path, default=RESULTS / "padding.json")
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args(argv)
    result = asyncio.run(run(args))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    for name, q in result["layouts"].items():
        print(f"{name:6s} " + "  ".join(f"{k} {v:.3f}" for k, v in q.items()))
    return result


if __name__ == "__main__":
    main()
