"""Typed errors of the public corpus. The three a load can raise (not found, corrupt, built by
another retriever) are the passage-index errors of ``dragon_host.errors``, shared with the
device's store; the others concern building."""

from __future__ import annotations

from dragon_host import errors as index_errors


class CorpusError(index_errors.PassageIndexError):
    """Base class of public-corpus errors."""

    code = "corpus_error"


class CorpusNotFound(CorpusError, index_errors.IndexNotFound):
    code = "corpus_not_found"


class CorpusCorrupt(CorpusError, index_errors.IndexCorrupt):
    """A file of the index is missing, truncated or inconsistent with the manifest: rebuild."""

    code = "corpus_corrupt"


class CorpusRetrieverMismatch(CorpusError, index_errors.RetrieverMismatch):
    code = "retriever_mismatch"


class CorpusInputError(CorpusError, ValueError):
    """An input file cannot be read (unknown format, bad JSON line, not UTF-8)."""

    code = "corpus_input_error"


class EmptyCorpus(CorpusError):
    """The inputs hold no passage to index."""

    code = "empty_corpus"


class GpuUnavailable(CorpusError, RuntimeError):
    """The GPU cluster store needs faiss-gpu and a CUDA device; this machine has not both."""

    code = "gpu_unavailable"


class LookaheadSpent(CorpusError, ValueError):
    """A lookahead handle was searched or released already: each handle pins its clusters once."""

    code = "lookahead_spent"
