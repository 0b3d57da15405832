"""The cloud's public corpus: build, persist, load and search a passage index.

Passages are 64-word chunks (``dragon_core.retrieval.chunk_words``, as on the device) embedded
with the shared :class:`~dragon_core.retrieval.Embedder`; scores are ``R(d)`` of the shared
score function, so the device can mix cloud and private documents in one softmax (the
handshake compares ``retriever_fingerprint``; :meth:`PublicIndex.load` refuses an index built
by another retriever).

On disk (one directory, swapped in atomically when a build finishes)::

    manifest.json      fingerprints, counts, build parameters, sources, file sizes/sha256
    index.faiss        IndexFlatIP (small corpora) or IVF{nlist},Flat (>= ivf_threshold);
                       faiss row i = passage id i
    passages.sqlite3   passages(id, title, text): random access by id, one file, crash-safe

Inputs: plain text (one document per file), JSON lines (``title`` + ``text``/``contents``/
``passage``, or DPR-style ``ctxs`` lists), WikiText raw files (`` = Title = `` lines start
articles); any of them may be gzip-compressed (``.gz``).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import math
import os
import re
import shutil
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np

from dragon_core.errors import DragonError
from dragon_core.retrieval import DEFAULT_PASSAGE_WORDS, Embedder, chunk_words, default_embedder

FORMAT = "dragon-public-index"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
INDEX_FILE = "index.faiss"
PASSAGES_FILE = "passages.sqlite3"
DEFAULT_IVF_THRESHOLD = 50_000
MIN_NPROBE = 32
EMBED_BLOCK = 256  # passages per embed call: bounds memory, and the progress bar moves often
INPUT_FORMATS = ("auto", "text", "jsonl", "wikitext")


# ------------------------------------------------------------------ errors
class CorpusError(DragonError):
    """Base class of public-corpus errors."""

    code = "corpus_error"


class CorpusNotFound(CorpusError, FileNotFoundError):
    code = "corpus_not_found"


class CorpusCorrupt(CorpusError):
    """A file of the index is missing, truncated or inconsistent with the manifest: rebuild."""

    code = "corpus_corrupt"


class CorpusRetrieverMismatch(CorpusError):
    """The index was embedded by another retriever or score function than the running one."""

    code = "retriever_mismatch"


class CorpusInputError(CorpusError, ValueError):
    """An input file cannot be read (unknown format, bad JSON line, not UTF-8)."""

    code = "corpus_input_error"


class EmptyCorpus(CorpusError):
    code = "empty_corpus"


@dataclass(frozen=True)
class Passage:
    id: int
    title: str
    text: str
    score: float  # R(d) of the shared score function (scale * cosine)


# ------------------------------------------------------------------ reading inputs
@dataclass(frozen=True)
class Document:
    title: str
    text: str


_WIKITEXT_TITLE = re.compile(r"^ = ([^=].*?) = $")  # " = Title = " (sections are " = = S = = ")
_WIKITEXT_SECTION = re.compile(r"^ (= )+.*( =)+ $")
_WIKITEXT_ESCAPES = ((" @-@ ", "-"), (" @,@ ", ","), (" @.@ ", "."))
_TEXT_FIELDS = ("text", "contents", "passage")
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
    return (d for d in _read_records(Path(path), fmt) if d is not None)


def _read_records(path: Path, fmt: str) -> Iterator[Document | None]:
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
    field = next((k for k in _TEXT_FIELDS if isinstance(rec.get(k), str) and rec[k].strip()), None)
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


# ------------------------------------------------------------------ building
def _progress(*, enabled: bool, **kw):
    from tqdm.auto import tqdm

    return tqdm(disable=not enabled, dynamic_ncols=True, **kw)


def ivf_nlist(n: int) -> int:
    """~4 sqrt(n) lists, and at least 8 training points per list for tiny forced-IVF builds."""
    return max(1, min(int(4 * math.sqrt(n)), n // 8))


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_passages(db_path: Path, inputs: Sequence[Path], fmt: str, passage_words: int,
                    limit: int | None, progress: bool) -> tuple[int, list[dict]]:
    """Pass 1: parse every input into SQLite (before any embedding, so bad input fails fast)."""
    conn = sqlite3.connect(db_path)
    conn.executescript("PRAGMA journal_mode=OFF; PRAGMA synchronous=OFF;"
                       "CREATE TABLE passages (id INTEGER PRIMARY KEY, title TEXT NOT NULL, text TEXT NOT NULL);")
    n, sources, seen = 0, [], set()
    bar = _progress(enabled=progress, desc="reading", unit=" passages")
    try:
        for path in inputs:
            path = Path(path)
            src = {"path": str(path.resolve()), "format": resolve_format(path, fmt), "bytes": path.stat().st_size,
                   "documents": 0, "duplicates": 0, "skipped": 0, "passages": 0}
            for doc in _read_records(path, src["format"]):
                if doc is None:
                    src["skipped"] += 1
                    continue
                key = hashlib.sha1(f"{doc.title}\0{doc.text}".encode()).digest()
                if key in seen:  # e.g. the same gold passage of several NQ questions
                    src["duplicates"] += 1
                    continue
                seen.add(key)
                chunks = chunk_words(doc.text, passage_words)
                if limit is not None:
                    chunks = chunks[: max(0, limit - n)]
                conn.executemany("INSERT INTO passages (id, title, text) VALUES (?, ?, ?)",
                                 [(n + i, doc.title, c) for i, c in enumerate(chunks)])
                n += len(chunks)
                src["documents"] += 1
                src["passages"] += len(chunks)
                bar.update(len(chunks))
                if limit is not None and n >= limit:
                    break
            src["sha256"] = _sha256(path)
            sources.append(src)
            if limit is not None and n >= limit:
                break
        conn.commit()
    finally:
        bar.close()
        conn.close()
    return n, sources


def _embed_all(db_path: Path, vec_path: Path, n: int, embedder: Embedder, progress: bool) -> np.ndarray:
    """Pass 2: embed in blocks into a memory-mapped ``.npy`` (the corpus may exceed RAM)."""
    vecs = np.lib.format.open_memmap(vec_path, mode="w+", dtype=np.float32, shape=(n, embedder.dim))
    conn = sqlite3.connect(db_path)
    bar = _progress(total=n, enabled=progress, desc="embedding", unit=" passages")
    try:
        for start in range(0, n, EMBED_BLOCK):
            rows = conn.execute("SELECT text FROM passages WHERE id >= ? AND id < ? ORDER BY id",
                                (start, start + EMBED_BLOCK)).fetchall()
            vecs[start : start + len(rows)] = embedder.embed([r[0] for r in rows], batch_size=64)
            bar.update(len(rows))
    finally:
        bar.close()
        conn.close()
    vecs.flush()
    return vecs


def default_nprobe(nlist: int) -> int:
    """An eighth of the lists (at least 32): recall@4 vs flat was 0.95 at nlist/7 on WikiText-2
    with NQ questions (docs/CORPUS.md); scanning 1/8 of the vectors is still cheap."""
    return min(nlist, max(MIN_NPROBE, nlist // 8))


def _build_faiss(vecs: np.ndarray, ivf_threshold: int, nprobe: int | None, seed: int = 0):
    import faiss

    n, dim = vecs.shape
    if n < ivf_threshold:
        index, info = faiss.IndexFlatIP(dim), {"type": "flat", "factory": "Flat"}
    else:
        nlist = ivf_nlist(n)
        factory = f"IVF{nlist},Flat"
        index = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
        ivf = faiss.extract_index_ivf(index)
        ivf.cp.spherical = True  # unit-norm vectors, inner-product metric: keep centroids on the sphere
        ivf.cp.min_points_per_centroid = 1  # tiny forced-IVF builds: no faiss warning spam
        train_n = min(n, 64 * nlist)
        rows = np.sort(np.random.default_rng(seed).choice(n, size=train_n, replace=False))
        index.train(np.ascontiguousarray(vecs[rows]))
        ivf.nprobe = min(nprobe, nlist) if nprobe else default_nprobe(nlist)
        info = {"type": "ivf", "factory": factory, "nlist": nlist, "nprobe": int(ivf.nprobe),
                "train_size": int(train_n)}
    for start in range(0, n, 1 << 16):
        index.add(np.ascontiguousarray(vecs[start : start + (1 << 16)]))
    return index, info


def _check_target(out: Path, overwrite: bool) -> None:
    """Only an empty directory or (with ``overwrite``) a previous index may be replaced."""
    if not out.exists() or (out.is_dir() and not any(out.iterdir())):
        return
    if not out.is_dir() or not (out / MANIFEST).is_file():
        raise CorpusError(f"{out} exists and is not a public index; refusing to replace it")
    if not overwrite:
        raise CorpusError(f"{out} already holds an index; pass overwrite=True (CLI: --force) to replace it")


def _install(tmp: Path, out: Path, overwrite: bool) -> None:
    """Rename the finished tmp dir into place. An old index is moved aside first, so readers see
    the old directory or the new one; only a crash between the two renames leaves ``out``
    missing, with the old index still in ``.<name>.old-<pid>``."""
    _check_target(out, overwrite)
    if out.is_dir() and not any(out.iterdir()):
        out.rmdir()
    if not out.exists():
        os.rename(tmp, out)
    else:
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.rename(out, old)
        os.rename(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    _fsync_path(out.parent)


# ------------------------------------------------------------------ the index
class PublicIndex:
    """A built index, opened read-only. ``search`` is thread-safe (the cloud calls it from
    ``asyncio.to_thread``)."""

    def __init__(self, path: Path, manifest: dict, index, conn: sqlite3.Connection, embedder: Embedder) -> None:
        self.path, self.manifest, self.index, self.embedder = path, manifest, index, embedder
        self._conn = conn
        self._db_lock = threading.Lock()  # one sqlite connection shared by threads
        self._embed_lock = threading.Lock()  # HF fast tokenizers fail when used by two threads at once

    # ---------------------------------------------------------- build
    @classmethod
    def build(cls, inputs: Sequence[str | os.PathLike], out_dir: str | os.PathLike, *,
              passage_words: int = DEFAULT_PASSAGE_WORDS, ivf_threshold: int = DEFAULT_IVF_THRESHOLD,
              nprobe: int | None = None, limit: int | None = None, input_format: str = "auto",
              embedder: Embedder | None = None, progress: bool = True, overwrite: bool = False) -> "PublicIndex":
        """Build an index of ``inputs`` in ``out_dir`` and open it."""
        if not inputs:
            raise CorpusInputError("no input files")
        out = Path(out_dir).absolute()
        _check_target(out, overwrite)  # before the expensive part
        embedder = embedder or default_embedder()
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        try:
            t0 = time.perf_counter()
            n, sources = _write_passages(tmp / PASSAGES_FILE, [Path(p) for p in inputs], input_format,
                                         passage_words, limit, progress)
            if n == 0:
                raise EmptyCorpus(f"no passages in {', '.join(map(str, inputs))} (records need one of "
                                  f"{'/'.join(_TEXT_FIELDS)} in JSON lines)")
            t1 = time.perf_counter()
            vecs = _embed_all(tmp / PASSAGES_FILE, tmp / "vectors.npy", n, embedder, progress)
            t2 = time.perf_counter()
            index, info = _build_faiss(vecs, ivf_threshold, nprobe)
            del vecs
            (tmp / "vectors.npy").unlink()
            import faiss

            faiss.write_index(index, str(tmp / INDEX_FILE))
            t3 = time.perf_counter()
            manifest = {
                "format": FORMAT, "version": FORMAT_VERSION,
                "retriever_fingerprint": embedder.fingerprint, "model_fingerprint": embedder.model_fingerprint,
                "score_function": embedder.score.id(), "dim": embedder.dim,
                "passages": n, "documents": sum(s["documents"] for s in sources),
                "index": info,
                "build": {"passage_words": passage_words, "ivf_threshold": ivf_threshold, "limit": limit,
                          "input_format": input_format, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                          "seconds": {"read": round(t1 - t0, 3), "embed": round(t2 - t1, 3),
                                      "index": round(t3 - t2, 3)}},
                "sources": sources,
                "files": {name: {"bytes": (tmp / name).stat().st_size, "sha256": _sha256(tmp / name)}
                          for name in (INDEX_FILE, PASSAGES_FILE)},
            }
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
            for name in (INDEX_FILE, PASSAGES_FILE, MANIFEST):
                _fsync_path(tmp / name)
            _install(tmp, out, overwrite)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return cls.load(out, embedder=embedder)

    # ---------------------------------------------------------- load
    @classmethod
    def load(cls, path: str | os.PathLike, *, embedder: Embedder | None = None, nprobe: int | None = None,
             verify: bool = False) -> "PublicIndex":
        """Open a built index. Raises :class:`CorpusNotFound`, :class:`CorpusCorrupt` (missing,
        truncated or — with ``verify`` — altered files) or :class:`CorpusRetrieverMismatch`."""
        root = Path(path)
        manifest = read_manifest(root)
        embedder = embedder or default_embedder()
        _check_retriever(manifest, embedder, root)
        for name in (INDEX_FILE, PASSAGES_FILE):
            _check_file(root, name, manifest, verify)
        index = _read_faiss(root / INDEX_FILE, manifest)
        if nprobe is not None and manifest["index"]["type"] == "ivf":
            import faiss

            faiss.extract_index_ivf(index).nprobe = max(1, int(nprobe))
        conn = _open_passages(root / PASSAGES_FILE, manifest)
        return cls(root, manifest, index, conn, embedder)

    # ---------------------------------------------------------- search
    def __len__(self) -> int:
        return int(self.index.ntotal)

    @property
    def fingerprint(self) -> str:
        return self.manifest["retriever_fingerprint"]

    @property
    def nprobe(self) -> int | None:
        if self.manifest["index"]["type"] != "ivf":
            return None
        import faiss

        return int(faiss.extract_index_ivf(self.index).nprobe)

    def search(self, query: str, k: int = 4) -> list[Passage]:
        """Top-``k`` passages by ``R(d)``, best first."""
        return self.search_many([query], k)[0]

    def search_many(self, queries: Sequence[str], k: int = 4) -> list[list[Passage]]:
        """Batched :meth:`search`: one embedding call, one faiss search, one SQLite read."""
        if k <= 0 or not queries:
            return [[] for _ in queries]
        with self._embed_lock:
            q = self.embedder.embed(list(queries))
        ip, ids = self.index.search(q, min(k, len(self)))
        # Missing hits (id -1, an IVF probing too few lists) carry -FLT_MAX: zero them before scaling.
        scores = self.embedder.score.from_inner_product(np.where(ids >= 0, ip, 0.0))
        rows = self._rows({int(i) for i in ids.ravel() if i >= 0})
        return [[Passage(int(i), *rows[int(i)], float(s)) for i, s in zip(ids_q, sc_q) if i >= 0]
                for ids_q, sc_q in zip(ids.tolist(), scores.tolist())]

    def passage(self, pid: int) -> tuple[str, str]:
        """(title, text) of one passage id."""
        if not 0 <= pid < len(self):
            raise KeyError(pid)
        return self._rows({pid})[pid]

    def _rows(self, ids: Iterable[int]) -> dict[int, tuple[str, str]]:
        ids = sorted(ids)
        if not ids:
            return {}
        marks = ",".join("?" * len(ids))
        with self._db_lock:
            found = self._conn.execute(f"SELECT id, title, text FROM passages WHERE id IN ({marks})", ids).fetchall()
        rows = {r[0]: (r[1], r[2]) for r in found}
        if len(rows) != len(ids):
            raise CorpusCorrupt(f"{self.path}: passages {sorted(set(ids) - set(rows))[:5]} are in the faiss "
                                f"index but not in {PASSAGES_FILE}; rebuild the index")
        return rows

    def close(self) -> None:
        with self._db_lock:
            self._conn.close()

    def __enter__(self) -> "PublicIndex":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ------------------------------------------------------------------ load checks
def read_manifest(root: Path) -> dict:
    if not root.is_dir():
        raise CorpusNotFound(f"no public index at {root} (build one: python -m dragon_vllm.corpus_cli build)")
    try:
        manifest = json.loads((root / MANIFEST).read_text())
    except FileNotFoundError as e:
        raise CorpusCorrupt(f"{root}: {MANIFEST} is missing; not a finished public index") from e
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CorpusCorrupt(f"{root}/{MANIFEST} is not valid JSON: {e}") from e
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CorpusCorrupt(f"{root}/{MANIFEST} is not a {FORMAT} manifest")
    if manifest.get("version") != FORMAT_VERSION:
        raise CorpusCorrupt(f"{root}: index format version {manifest.get('version')}, this code reads "
                            f"{FORMAT_VERSION}; rebuild the index")
    missing = {"retriever_fingerprint", "score_function", "dim", "passages", "index", "files"} - set(manifest)
    if missing:
        raise CorpusCorrupt(f"{root}/{MANIFEST} lacks {sorted(missing)}")
    return manifest


def _check_retriever(manifest: dict, embedder: Embedder, root: Path) -> None:
    if manifest["score_function"] != embedder.score.id():
        raise CorpusRetrieverMismatch(f"{root} was built for score function {manifest['score_function']}, "
                                      f"running {embedder.score.id()}; rebuild the index")
    if manifest["retriever_fingerprint"] != embedder.fingerprint:
        raise CorpusRetrieverMismatch(f"{root} was built with retriever {manifest['retriever_fingerprint']}, "
                                      f"running {embedder.fingerprint} (other model files); rebuild the index")


def _check_file(root: Path, name: str, manifest: dict, verify: bool) -> None:
    p, want = root / name, manifest["files"].get(name, {})
    if not p.is_file():
        raise CorpusCorrupt(f"{root}: {name} is missing; rebuild the index")
    size = p.stat().st_size
    if size != want.get("bytes"):
        raise CorpusCorrupt(f"{root}: {name} has {size} bytes, the manifest says {want.get('bytes')}; rebuild")
    if verify and _sha256(p) != want.get("sha256"):
        raise CorpusCorrupt(f"{root}: {name} checksum differs from the manifest; rebuild the index")


def _read_faiss(path: Path, manifest: dict):
    import faiss

    try:
        index = faiss.read_index(str(path))
    except RuntimeError as e:
        raise CorpusCorrupt(f"faiss cannot read {path}: {str(e).strip().splitlines()[-1]}") from e
    if index.d != manifest["dim"] or index.ntotal != manifest["passages"] or \
            index.metric_type != faiss.METRIC_INNER_PRODUCT:
        raise CorpusCorrupt(f"{path}: {index.ntotal} vectors of dim {index.d}, the manifest says "
                            f"{manifest['passages']} of dim {manifest['dim']} (inner product)")
    return index


def _open_passages(path: Path, manifest: dict) -> sqlite3.Connection:
    # immutable=1: the file never changes in place (a rebuild swaps the directory), so no locking.
    conn = sqlite3.connect(f"file:{path}?mode=ro&immutable=1", uri=True, check_same_thread=False)
    try:
        n, lo, hi = conn.execute("SELECT count(*), min(id), max(id) FROM passages").fetchone()
    except sqlite3.DatabaseError as e:
        conn.close()
        raise CorpusCorrupt(f"{path} is not a readable passage database: {e}") from e
    if (n, lo, hi) != (manifest["passages"], 0, manifest["passages"] - 1):
        conn.close()
        raise CorpusCorrupt(f"{path} holds {n} passages (ids {lo}..{hi}), the manifest says {manifest['passages']}")
    return conn


__all__ = [
    "PublicIndex", "Passage", "Document", "default_nprobe", "read_documents", "detect_format", "resolve_format", "read_manifest", "ivf_nlist",
    "CorpusError", "CorpusNotFound", "CorpusCorrupt", "CorpusRetrieverMismatch", "CorpusInputError", "EmptyCorpus",
]
