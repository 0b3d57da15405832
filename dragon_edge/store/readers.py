"""Turn files into text: UTF-8 text/markdown always, PDF when ``pypdf`` is installed."""

from __future__ import annotations

import hashlib
import importlib.util
import io
import os
from dataclasses import dataclass
from pathlib import Path

from dragon_edge.store.errors import UnreadableDocument, UnsupportedDocument

TEXT_SUFFIXES = frozenset({".txt", ".md", ".markdown"})
PDF_SUFFIX = ".pdf"
_BINARY_SNIFF = 8192


def pdf_supported() -> bool:
    return importlib.util.find_spec("pypdf") is not None


def supported_suffixes() -> frozenset[str]:
    return TEXT_SUFFIXES | {PDF_SUFFIX} if pdf_supported() else TEXT_SUFFIXES


@dataclass(frozen=True)
class Document:
    path: Path
    text: str
    sha256: str  # of the file's bytes: what decides "changed"
    size: int
    mtime: float


def read_document(path: Path) -> Document:
    try:
        st = path.stat()
        raw = path.read_bytes()
    except OSError as e:
        raise UnreadableDocument(str(path), e.strerror or type(e).__name__) from e
    suffix = path.suffix.lower()
    if suffix in TEXT_SUFFIXES:
        text = _decode_text(raw, path)
    elif suffix == PDF_SUFFIX:
        text = _pdf_text(raw, path)
    else:
        raise UnsupportedDocument(str(path), f"unsupported type {suffix or '(none)'}")
    return Document(path, text, hashlib.sha256(raw).hexdigest(), st.st_size, st.st_mtime)


def _decode_text(raw: bytes, path: Path) -> str:
    if b"\0" in raw[:_BINARY_SNIFF]:
        raise UnreadableDocument(str(path), "binary content in a text file")
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise UnreadableDocument(str(path), f"not UTF-8 text (byte {e.start})") from e


def _pdf_text(raw: bytes, path: Path) -> str:
    if not pdf_supported():
        raise UnsupportedDocument(str(path), "PDF needs pypdf: pip install pypdf")
    import pypdf

    try:
        reader = pypdf.PdfReader(io.BytesIO(raw))
        if reader.is_encrypted and not reader.decrypt(""):
            raise UnreadableDocument(str(path), "encrypted PDF")
        return "\n".join(page.extract_text() or "" for page in reader.pages)
    except UnreadableDocument:
        raise
    except Exception as e:  # pypdf raises many types on malformed files
        raise UnreadableDocument(str(path), f"PDF parse error: {e}") from e


def why_unsupported(path: Path) -> str:
    if path.suffix.lower() == PDF_SUFFIX and not pdf_supported():
        return "PDF needs pypdf: pip install pypdf"
    return f"unsupported file type {path.suffix.lower() or '(none)'}"


def list_folder(root: Path) -> tuple[list[Path], list[Path]]:
    """(documents to ingest, other files), sorted; hidden files and folders are skipped."""
    wanted, others = [], []
    suffixes = supported_suffixes()
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if name.startswith("."):
                continue
            p = Path(dirpath) / name
            (wanted if p.suffix.lower() in suffixes else others).append(p)
    return wanted, others
