"""Typed errors of the private document store. Each says what is wrong and what to do."""

from __future__ import annotations

from dragon_core.errors import DragonError


class StoreError(DragonError):
    """Base class of every document-store error."""

    code = "store_error"


class StoreNotFound(StoreError, FileNotFoundError):
    code = "store_not_found"


class StoreCorrupt(StoreError):
    """The SQLite database (the source of truth) is unreadable or inconsistent.
    A damaged faiss file is *not* this: it is rebuilt from SQLite silently."""

    code = "store_corrupt"


class StoreVersionError(StoreError):
    code = "store_version"


class RetrieverMismatch(StoreError):
    """The store's vectors were made by another embedding model than the one loaded."""

    code = "retriever_mismatch"


class UnknownSource(StoreError, LookupError):
    code = "unknown_source"


class FolderNotFound(StoreError, FileNotFoundError):
    code = "folder_not_found"


class EmptyFolder(StoreError):
    """A folder holds no document the store can ingest."""

    code = "empty_folder"


class DocumentError(StoreError):
    """One document could not be ingested. Folder ingests skip it and report why."""

    code = "document_error"

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason


class UnreadableDocument(DocumentError):
    code = "unreadable_document"


class UnsupportedDocument(DocumentError):
    code = "unsupported_document"


class EmptyDocument(DocumentError):
    code = "empty_document"
