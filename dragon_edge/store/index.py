"""The faiss index file: a *cache* of the vectors held in SQLite.

Exact inner-product search (``IndexIDMap`` over ``IndexFlatIP``; ids = SQLite passage ids) is
fast enough for a device's private notes and needs no training. The file is written atomically
(tmp + fsync + ``os.replace``) with a checksum header, so a reader sees either the old or the
new file and never feeds garbage to faiss; if it is missing, damaged or out of date the store
repairs it from SQLite.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import faiss
import numpy as np

from dragon_host.files import fsync_path, install

MAGIC = b"DRAGON-FAISS-1\n"
_DIGEST = 32


class IndexFileInvalid(Exception):
    """The cache file cannot be used (internal: the store rebuilds it)."""


def new_index(dim: int) -> faiss.IndexIDMap:
    return faiss.IndexIDMap(faiss.IndexFlatIP(dim))


def index_ids(index: faiss.IndexIDMap) -> np.ndarray:
    return faiss.vector_to_array(index.id_map).astype(np.int64)


def save_index(index: faiss.IndexIDMap, path: Path, pause=lambda point: None) -> None:
    payload = faiss.serialize_index(index).tobytes()
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_bytes(MAGIC + hashlib.sha256(payload).digest() + payload)
        fsync_path(tmp)
        pause("index_write")
        install(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # a half-written tmp would hold on to the space (disk full)
        raise


def load_index(path: Path, dim: int) -> faiss.IndexIDMap:
    try:
        blob = path.read_bytes()
    except FileNotFoundError as e:
        raise IndexFileInvalid("missing") from e
    head, digest, payload = blob[: len(MAGIC)], blob[len(MAGIC) : len(MAGIC) + _DIGEST], blob[len(MAGIC) + _DIGEST :]
    if head != MAGIC:
        raise IndexFileInvalid("bad header")
    if hashlib.sha256(payload).digest() != digest:
        raise IndexFileInvalid("checksum mismatch")
    try:
        index = faiss.deserialize_index(np.frombuffer(payload, dtype=np.uint8))
    except RuntimeError as e:
        raise IndexFileInvalid(f"faiss cannot read it: {e}") from e
    if not isinstance(index, faiss.IndexIDMap) or index.d != dim or index.metric_type != faiss.METRIC_INNER_PRODUCT:
        raise IndexFileInvalid(f"unexpected index type or dim ({type(index).__name__}, d={index.d})")
    return index


def remove_stale_tmp(path: Path) -> None:
    """Tmp files of writers killed before ``os.replace``."""
    for tmp in path.parent.glob(f"{path.name}.tmp-*"):
        try:
            pid = int(tmp.name.rsplit("-", 1)[1])
        except ValueError:
            pid = -1
        if not _alive(pid):
            tmp.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
