"""Build and query the cloud's public passage index.

    python -m dragon_vllm.corpus_cli build OUT_DIR INPUT... [--passage-words 64] [--ivf-threshold N] [--limit N]
        [--kind auto|flat|ivf-flat|ivf-pq] [--nlist N] [--nprobe P] [--pq-m M]
    python -m dragon_vllm.corpus_cli search OUT_DIR "query" [-k 4]
    python -m dragon_vllm.corpus_cli info OUT_DIR [--verify]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from dragon_core.errors import DragonError
from dragon_core.retrieval import DEFAULT_PASSAGE_WORDS
from dragon_vllm import corpus as c

_EPILOG = """\
input formats (auto-detected; any may be gzip-compressed, e.g. x.jsonl.gz):
  jsonl     one JSON object per line with "title" and "text" (or "contents" / "passage");
            DPR-style records with a "ctxs" list contribute each passage of the list;
            FlashRAG "contents" ("Title"\\nbody) give title and body
  wikitext  WikiText raw files (*.raw, or any file with " = Title = " lines): articles are
            split at those headings and keep their title; section headings are dropped
  text      anything else: one document per file, titled by the file name

examples:
  python -m dragon_vllm.corpus_cli build idx/wiki1k /work/shared/data/wiki_passages_sample/flashrag_wiki18_sample_1000.jsonl
  python -m dragon_vllm.corpus_cli build idx/wt2 /work/shared/data/wikitext-2-raw/wiki.valid.raw
  python -m dragon_vllm.corpus_cli search idx/wt2 "European lobster claws" -k 4
  dragon-cloud index build idx/wt2pq /work/shared/data/wikitext-2-raw/wiki.valid.raw --kind ivf-pq --nlist 64 --nprobe 8
"""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m dragon_vllm.corpus_cli",
        description="Build and query the cloud's public passage index (all-MiniLM-L6-v2 embeddings, faiss; "
                    "scores are R(d) of the score function the device uses).",
        epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True, metavar="{build,search,info}")

    b = sub.add_parser("build", help="build an index from text / jsonl / WikiText files",
                       description="Chunk INPUT files into passages, embed them, write a faiss index to OUT_DIR "
                                   "(built in a temporary directory and renamed into place when complete).",
                       epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    b.add_argument("out_dir", metavar="OUT_DIR", type=Path, help="index directory to create")
    b.add_argument("inputs", metavar="INPUT", type=Path, nargs="+", help="input files")
    b.add_argument("--passage-words", type=int, default=DEFAULT_PASSAGE_WORDS,
                   help="words per passage (default: %(default)s, as DRAGON and the device store)")
    b.add_argument("--ivf-threshold", type=int, default=c.DEFAULT_IVF_THRESHOLD, metavar="N",
                   help="use an IVF index (approximate, ~4*sqrt(n) lists) from N passages on; exact flat "
                        "index below (default: %(default)s)")
    b.add_argument("--kind", choices=c.KINDS, default="auto",
                   help="faiss index: flat (exact), ivf-flat (inverted lists of full vectors), ivf-pq (inverted "
                        "lists of product-quantized codes, ~32x smaller, approximate scores); auto: flat under "
                        "--ivf-threshold passages, ivf-flat from there on (default: %(default)s)")
    b.add_argument("--nlist", type=int, default=None, metavar="N",
                   help="IVF lists (default: ~4*sqrt(passages))")
    b.add_argument("--nprobe", type=int, default=None, metavar="P",
                   help="IVF lists probed per query, stored in the index's manifest as its default "
                        "(default: nlist/8, at least 32)")
    b.add_argument("--pq-m", type=int, default=48, metavar="M",
                   help="ivf-pq: sub-quantizers, bytes per vector; must divide the dimension (default: %(default)s)")
    b.add_argument("--limit", type=int, default=None, metavar="N", help="stop after N passages (quick builds)")
    b.add_argument("--format", dest="input_format", choices=c.INPUT_FORMATS, default="auto",
                   help="input format of every INPUT (default: auto-detect per file)")
    b.add_argument("--force", action="store_true", help="replace an existing index in OUT_DIR")
    b.add_argument("-q", "--quiet", action="store_true", help="no progress bars")

    s = sub.add_parser("search", help="print the top-k passages of a query",
                       description="Search a built index; scores are R(d) = scale * cosine.")
    s.add_argument("out_dir", metavar="OUT_DIR", type=Path, help="index directory")
    s.add_argument("queries", metavar="QUERY", nargs="+", help="query text (several: one batched search)")
    s.add_argument("-k", type=int, default=4, help="passages per query (default: %(default)s)")
    s.add_argument("--nprobe", type=int, default=None, help="IVF lists to probe (default: the index's)")
    s.add_argument("--lookahead", action="store_true",
                   help="IVF: search through the lookahead cluster cache (same results; CPU store here)")
    s.add_argument("--json", action="store_true", help="one JSON object per query")

    i = sub.add_parser("info", help="show an index's manifest summary",
                       description="Load an index (checking fingerprints and file sizes) and summarise it.")
    i.add_argument("out_dir", metavar="OUT_DIR", type=Path, help="index directory")
    i.add_argument("--verify", action="store_true", help="also check every file's sha256 against the manifest")
    return p


def _build(a: argparse.Namespace) -> int:
    t0 = time.perf_counter()
    index = c.PublicIndex.build(a.inputs, a.out_dir, passage_words=a.passage_words, ivf_threshold=a.ivf_threshold,
                                nprobe=a.nprobe, limit=a.limit, input_format=a.input_format,
                                progress=not a.quiet, overwrite=a.force, kind=a.kind, nlist=a.nlist, pq_m=a.pq_m)
    m = index.manifest
    secs = m["build"]["seconds"]
    print(f"built {a.out_dir}: {m['passages']} passages from {m['documents']} documents, "
          f"{m['index']['factory']} index, {time.perf_counter() - t0:.1f} s "
          f"(read {secs['read']:.1f} s, embed {secs['embed']:.1f} s, index {secs['index']:.1f} s)")
    return 0


def _search(a: argparse.Namespace) -> int:
    index = c.PublicIndex.load(a.out_dir, nprobe=a.nprobe, lookahead=a.lookahead)
    for query, hits in zip(a.queries, index.search_many(a.queries, a.k)):
        if a.json:
            print(json.dumps({"query": query, "passages": [
                {"id": h.id, "title": h.title, "text": h.text, "score": h.score} for h in hits]}))
            continue
        print(f"query: {query}")
        for rank, h in enumerate(hits, 1):
            print(f"{rank:>3}. [{h.score:7.4f}] #{h.id} {h.title}\n     {h.text}")
    return 0


def _info(a: argparse.Namespace) -> int:
    m = c.PublicIndex.load(a.out_dir, verify=a.verify).manifest
    print(json.dumps({k: m[k] for k in ("passages", "documents", "index", "score_function",
                                        "retriever_fingerprint", "build", "sources")}, indent=2))
    return 0


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    a = _parser().parse_args(argv)
    try:
        return {"build": _build, "search": _search, "info": _info}[a.command](a)
    except DragonError as e:  # every typed error: corpus, model not installed, ...
        print(f"error ({e.code}): {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
