"""The cloud's public corpus: build, persist, load and search a passage index.

One module per concern:

* ``readers``: input files (text, JSON lines, WikiText; gzip or not) -> documents;
* ``build``: documents -> passages, vectors and a faiss index, installed atomically;
* ``layout``: the folder's file names and its manifest;
* ``index``: :class:`PublicIndex`, a built index opened read-only, and its load checks;
* ``ivf``: the index kinds (flat, IVF-Flat, IVF-PQ), their parameters and their build
  (``gpu_build``: the k-means and the list assignment on a torch device);
* ``lookahead`` (+ ``cluster_cache``, ``cluster_store``, ``merge``, ``gpu_store``): TeleRAG's
  prefetch of a query's IVF clusters into a cache (host memory, or GPU memory through torch),
  results equal to plain IVF search;
* ``errors``: the typed errors (not found / corrupt / retriever mismatch are shared with the
  device's store through ``dragon_host.errors``);
* ``cli``: ``python -m dragon_vllm.corpus_cli build | search | info``.

docs/CORPUS.md has the formats, the on-disk layout and the measurements.
"""

from dragon_core.passage import Passage
from dragon_vllm.corpus.build import DEFAULT_IVF_THRESHOLD, EMBED_BLOCK, MIN_NPROBE, default_nprobe, ivf_nlist
from dragon_vllm.corpus.errors import (
    CorpusCorrupt,
    CorpusError,
    CorpusInputError,
    CorpusNotFound,
    CorpusRetrieverMismatch,
    EmptyCorpus,
    GpuUnavailable,
    LookaheadSpent,
)
from dragon_vllm.corpus.ivf import KINDS, IndexSpec
from dragon_vllm.corpus.index import PublicIndex
from dragon_vllm.corpus.layout import FORMAT, FORMAT_VERSION, INDEX_FILE, MANIFEST, PASSAGES_FILE, read_manifest
from dragon_vllm.corpus.readers import INPUT_FORMATS, Document, detect_format, read_documents, resolve_format

__all__ = [
    "PublicIndex", "Passage", "Document", "default_nprobe", "read_documents", "detect_format", "resolve_format",
    "read_manifest", "ivf_nlist",
    "CorpusError", "CorpusNotFound", "CorpusCorrupt", "CorpusRetrieverMismatch", "CorpusInputError", "EmptyCorpus",
    "GpuUnavailable", "LookaheadSpent", "KINDS", "IndexSpec",
    "FORMAT", "FORMAT_VERSION", "MANIFEST", "INDEX_FILE", "PASSAGES_FILE", "INPUT_FORMATS",
    "DEFAULT_IVF_THRESHOLD", "MIN_NPROBE", "EMBED_BLOCK",
]
