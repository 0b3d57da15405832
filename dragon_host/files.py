"""File helpers both sides need to keep what they write on disk whole.

A build (the cloud's corpus, a converted model) or a cache (the device's faiss file) is
written beside its target and then renamed into place, so a reader sees the old version or
the new one, never half of one; ``fsync`` makes the bytes, and then the rename, survive a
crash or a power cut.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

_BLOCK = 1 << 22  # 4 MiB reads: a multi-GB file is hashed in bounded memory


def file_sha256(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file's bytes, read in blocks (the file may exceed RAM)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(_BLOCK), b""):
            h.update(block)
    return h.hexdigest()


def fsync_path(path: str | os.PathLike) -> None:
    """Flush a file's bytes, or a folder's entries (a rename in it), to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def install(tmp: Path, target: Path) -> None:
    """Put the finished ``tmp`` (a file, or a folder) at ``target``, replacing what is there.

    A file replaces the old one in one atomic ``os.replace``. A folder cannot be renamed over a
    non-empty one, so an old folder is moved aside first (to ``.<name>.old-<pid>``) and removed
    after: readers see the old folder or the new one, and only a crash between the two renames
    leaves ``target`` missing, with the old one still beside it. The parent folder is synced so
    that the rename itself is durable."""
    if tmp.is_dir() and target.is_dir():
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        os.rename(target, old)
        os.rename(tmp, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, target)
    fsync_path(target.parent)
