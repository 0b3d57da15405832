"""Errors of a passage index on disk: the device's document store and the cloud's public
corpus fail in the same three ways, so a caller can handle either with one ``except``.

Each side subclasses these with its own code (``store_not_found``, ``corpus_not_found``, ...)
and its own base (``StoreError``, ``CorpusError``) for the errors only it has.
"""

from __future__ import annotations

from dragon_core.errors import DragonError


class PassageIndexError(DragonError):
    """Base class of the errors of a passage index on disk."""

    code = "index_error"


class IndexNotFound(PassageIndexError, FileNotFoundError):
    """There is no index at the path given."""

    code = "index_not_found"


class IndexCorrupt(PassageIndexError):
    """A file of the index is missing, unreadable or inconsistent with the rest."""

    code = "index_corrupt"


class RetrieverMismatch(PassageIndexError):
    """The index was embedded by another retriever (model files or score function) than the
    running one: its scores would not be comparable."""

    code = "retriever_mismatch"
