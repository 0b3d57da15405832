"""Typed errors of the private document store. Each says what is wrong and what to do."""

from __future__ import annotations

import errno
import sqlite3

from dragon_host import errors as index_errors


class StoreError(index_errors.PassageIndexError):
    """Base class of every document-store error."""

    code = "store_error"


class StoreNotFound(StoreError, index_errors.IndexNotFound):
    code = "store_not_found"


class StoreCorrupt(StoreError, index_errors.IndexCorrupt):
    """The SQLite database (the source of truth) is unreadable or inconsistent.
    A damaged faiss file is *not* this: it is rebuilt from SQLite silently."""

    code = "store_corrupt"


class StoreVersionError(StoreError):
    code = "store_version"


class RetrieverMismatch(StoreError, index_errors.RetrieverMismatch):
    """The store's vectors were made by another embedding model than the one loaded."""

    code = "retriever_mismatch"


class StoreFull(StoreError, OSError):
    """The disk (or the quota) is full. What was committed before stays, search keeps working,
    and the same ingest resumes once space is freed."""

    code = "store_full"


class UnknownSource(StoreError, LookupError):
    code = "unknown_source"


class WouldDeleteEverything(StoreError):
    """A delete that would empty the store was asked for by a path, not explicitly."""

    code = "would_delete_everything"


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


class NotARegularFile(DocumentError):
    """A FIFO, device, socket, loop or link that ingest must not open (it could block forever
    or never end, e.g. a FIFO or /dev/zero named ``.txt``)."""

    code = "not_a_regular_file"


class FileTooLarge(DocumentError):
    code = "file_too_large"


def is_disk_full(exc: BaseException) -> bool:
    """ENOSPC/EDQUOT from the OS, or SQLITE_FULL ("database or disk is full") from SQLite."""
    if isinstance(exc, sqlite3.Error):
        return getattr(exc, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL or "is full" in str(exc)
    return isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)
