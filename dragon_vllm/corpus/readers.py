"""Reading the corpus's input files into documents.

Plain text (one document per file), JSON lines (``title`` + ``text``/``contents``/``passage``,
or DPR-style ``ctxs`` lists), WikiText raw files (`` = Title = `` lines start articles); any of
them may be gzip-compressed (``.gz``).
"""

from __future__ import annotations

import gzip
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from dragon_vllm.corpus.errors import CorpusInputError

INPUT_FORMATS = ("auto", "text", "jsonl", "wikitext")
TEXT_FIELDS = ("text", "contents", "passage")  # a JSON record's text, in this order of preference


@dataclass(frozen=True)
class Document:
    title: str
    text: str


_WIKITEXT_TITLE = re.compile(r"^ = ([^=].*?) = $")  # " = Title = " (sections are " = = S = = ")
_WIKITEXT_SECTION = re.compile(r"^ (= )+.*( =)+ $")
_WIKITEXT_ESCAPES = ((" @-@ ", "-"), (" @,@ ", ","), (" @.@ ", "."))
_JSONL_SUFFIXES = {".jsonl", ".ndjson"}
_WIKITEXT_SUFFIXES = {".raw", ".tokens"}
_SNIFF = 1 << 20
_MAX_TITLE = 200  # a longer first line of "contents" is text, not a title


def _open_text(path: Path):
    if path.suffix == ".gz":
        return gzip.open(path, "rt", encoding="utf-8-sig")
    return open(path, encoding="utf-8-sig")


def detect_format(path: Path) -> str:
    """``jsonl`` / ``wikitext`` / ``text`` from the name (``.gz`` stripped), else by sniffing."""
    inner = Path(path.stem) if path.suffix == ".gz" else path
    if inner.suffix in _JSONL_SUFFIXES:
        return "jsonl"
    if inner.suffix in _WIKITEXT_SUFFIXES:
        return "wikitext"
    with _open_text(path) as f:
        head = f.read(_SNIFF)
    return "wikitext" if any(_WIKITEXT_TITLE.match(line) for line in head.splitlines()) else "text"


def resolve_format(path: Path, fmt: str = "auto") -> str:
    """``fmt``, or the detected format for ``auto``; :class:`CorpusInputError` if unreadable."""
    if fmt not in INPUT_FORMATS:
        raise CorpusInputError(f"unknown input format {fmt!r}; one of {', '.join(INPUT_FORMATS)}")
    if not Path(path).is_file():
        raise CorpusInputError(f"{path}: no such file")
    if fmt != "auto":
        return fmt
    try:
        return detect_format(Path(path))
    except (UnicodeDecodeError, gzip.BadGzipFile, EOFError, OSError) as e:
        raise CorpusInputError(f"{path}: not readable as UTF-8 text: {e}") from e


def read_documents(path: Path, fmt: str = "auto") -> Iterator[Document]:
    """The documents of one input file. Raises :class:`CorpusInputError` on unreadable input."""
    return (d for d in read_records(Path(path), fmt) if d is not None)


def read_records(path: Path, fmt: str) -> Iterator[Document | None]:
    """Documents, and ``None`` for each JSON record without text (counted as skipped)."""
    fmt = resolve_format(path, fmt)
    try:
        if fmt == "jsonl":
            yield from _read_jsonl(path)
        elif fmt == "wikitext":
            yield from _read_wikitext(path)
        elif fmt == "text":
            with _open_text(path) as f:
                yield Document(_stem(path), f.read())
    except (UnicodeDecodeError, gzip.BadGzipFile, EOFError) as e:
        raise CorpusInputError(f"{path}: not UTF-8 text{' (or bad gzip)' if path.suffix == '.gz' else ''}: {e}") from e


def _stem(path: Path) -> str:
    return Path(path.stem).stem if path.suffix == ".gz" else path.stem


def _read_jsonl(path: Path) -> Iterator[Document | None]:
    with _open_text(path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise CorpusInputError(f"{path}:{lineno}: bad JSON: {e.msg}") from e
            if not isinstance(rec, dict):
                raise CorpusInputError(f"{path}:{lineno}: expected a JSON object, got {type(rec).__name__}")
            # DPR / lost-in-the-middle style: a question with its passages in "ctxs".
            records = rec["ctxs"] if isinstance(rec.get("ctxs"), list) else [rec]
            for r in records:
                yield _record_document(r) if isinstance(r, dict) else None


def _record_document(rec: dict) -> Document | None:
    field = next((k for k in TEXT_FIELDS if isinstance(rec.get(k), str) and rec[k].strip()), None)
    if field is None:
        return None
    text, title = rec[field], rec.get("title")
    if not isinstance(title, str) and field == "contents":
        # FlashRAG wiki dumps: contents = title + "\n" + body, the title often in quotes.
        first, sep, rest = text.partition("\n")
        if sep and 0 < len(first.strip()) <= _MAX_TITLE:
            title, text = _unquote(first.strip()), rest
    return Document(title if isinstance(title, str) else "", text)


def _unquote(s: str) -> str:
    return s[1:-1] if len(s) >= 2 and s[0] == s[-1] == '"' else s


def _read_wikitext(path: Path) -> Iterator[Document]:
    title, lines = _stem(path), []
    with _open_text(path) as f:
        for raw in f:
            line = raw.rstrip("\n")
            m = _WIKITEXT_TITLE.match(line)
            if m:
                if any(s.strip() for s in lines):
                    yield Document(title, _unescape_wikitext(" ".join(lines)))
                title, lines = m.group(1).strip(), []
            elif not _WIKITEXT_SECTION.match(line):  # section headings are not passage text
                lines.append(line)
    if any(s.strip() for s in lines):
        yield Document(title, _unescape_wikitext(" ".join(lines)))


def _unescape_wikitext(text: str) -> str:
    for a, b in _WIKITEXT_ESCAPES:
        text = text.replace(a, b)
    return text
