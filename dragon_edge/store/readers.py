"""Turn files into text: UTF-8 text/markdown always, PDF when ``pypdf`` is installed.

Only regular files are read, and at most ``max_bytes`` of them: what is opened is checked with
``fstat`` (the entry may have changed since the folder was listed), and the open itself does
not wait, so a FIFO that appears in between cannot block the ingest.
"""

from __future__ import annotations

import hashlib
import importlib.util
import io
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from dragon_edge.store.errors import FileTooLarge, NotARegularFile, UnreadableDocument, UnsupportedDocument
from dragon_edge.store.names import display_path

TEXT_SUFFIXES = frozenset({".txt", ".md", ".markdown"})
PDF_SUFFIX = ".pdf"
DEFAULT_MAX_FILE_BYTES = 64 * 2**20  # a 64 MiB text file is ~10 M words: about an hour to embed on 2 cores
_BINARY_SNIFF = 8192
_OPEN_FLAGS = os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC


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


def file_kind(mode: int) -> str:
    """Why a non-regular file is not read, by its type."""
    kinds = [(stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISCHR, "a character device"),
             (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"), (stat.S_ISDIR, "a folder")]
    name = next((name for test, name in kinds if test(mode)), "a special file")
    return f"{name}, not a regular file"


def too_large(size: int, max_bytes: int) -> str:
    return (f"{size / 2**20:.1f} MiB, over the {max_bytes / 2**20:g} MiB cap per file "
            "(raise it with --max-file-mb or max_file_bytes)")


def read_document(path: Path, max_bytes: int = DEFAULT_MAX_FILE_BYTES) -> Document:
    raw, st = _read_regular_file(path, max_bytes)
    suffix = path.suffix.lower()
    if suffix in TEXT_SUFFIXES:
        text = _decode_text(raw, path)
    elif suffix == PDF_SUFFIX:
        text = _pdf_text(raw, path)
    else:
        raise UnsupportedDocument(display_path(path), f"unsupported type {suffix or '(none)'}")
    return Document(path, text, hashlib.sha256(raw).hexdigest(), len(raw), st.st_mtime)


def _read_regular_file(path: Path, max_bytes: int) -> tuple[bytes, os.stat_result]:
    shown = display_path(path)
    try:
        fd = os.open(path, _OPEN_FLAGS)
    except OSError as e:
        raise UnreadableDocument(shown, e.strerror or type(e).__name__) from e
    with open(fd, "rb") as f:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise NotARegularFile(shown, file_kind(st.st_mode))
        if st.st_size > max_bytes:
            raise FileTooLarge(shown, too_large(st.st_size, max_bytes))
        try:
            raw = f.read(max_bytes + 1)  # never more, even if the file grows while we read
        except OSError as e:
            raise UnreadableDocument(shown, e.strerror or type(e).__name__) from e
    if len(raw) > max_bytes:
        raise FileTooLarge(shown, too_large(len(raw), max_bytes))
    return raw, st


def _decode_text(raw: bytes, path: Path) -> str:
    if b"\0" in raw[:_BINARY_SNIFF]:
        raise UnreadableDocument(display_path(path), "binary content in a text file")
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise UnreadableDocument(display_path(path), f"not UTF-8 text (byte {e.start})") from e


def _pdf_text(raw: bytes, path: Path) -> str:
    if not pdf_supported():
        raise UnsupportedDocument(display_path(path), "PDF needs pypdf: pip install pypdf")
    import pypdf

    try:
        reader = pypdf.PdfReader(io.BytesIO(raw))
        if reader.is_encrypted and not reader.decrypt(""):
            raise UnreadableDocument(display_path(path), "encrypted PDF")
        return "\n".join(page.extract_text() or "" for page in reader.pages)
    except UnreadableDocument:
        raise
    except Exception as e:  # pypdf raises many types on malformed files
        raise UnreadableDocument(display_path(path), f"PDF parse error: {e}") from e


def why_unsupported(path: Path) -> str:
    if path.suffix.lower() == PDF_SUFFIX and not pdf_supported():
        return "PDF needs pypdf: pip install pypdf"
    return f"unsupported file type {path.suffix.lower() or '(none)'}"
