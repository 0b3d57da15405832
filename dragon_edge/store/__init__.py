"""Private document store of the device (issue 3): ingest, persist, search with DRAGON scores."""

from dragon_edge.store.document_store import DocumentStore, IngestReport, Passage, StoreStats
from dragon_edge.store.errors import (
    DocumentError,
    EmptyDocument,
    EmptyFolder,
    FileTooLarge,
    FolderNotFound,
    NotARegularFile,
    RetrieverMismatch,
    StoreCorrupt,
    StoreError,
    StoreFull,
    StoreNotFound,
    StoreVersionError,
    UnknownSource,
    UnreadableDocument,
    UnsupportedDocument,
    WouldDeleteEverything,
)
from dragon_edge.store.readers import pdf_supported

__all__ = [
    "DocumentStore", "IngestReport", "Passage", "StoreStats", "pdf_supported",
    "StoreError", "StoreNotFound", "StoreCorrupt", "StoreVersionError", "RetrieverMismatch",
    "UnknownSource", "FolderNotFound", "EmptyFolder", "DocumentError", "UnreadableDocument",
    "UnsupportedDocument", "EmptyDocument", "NotARegularFile", "FileTooLarge", "StoreFull",
    "WouldDeleteEverything",
]
