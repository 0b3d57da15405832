"""Which entries of a folder an ingest may open.

One bad entry used to break or hang a whole folder: a FIFO named ``.txt`` blocked forever, a
``.txt`` link to ``/dev/zero`` grew without end. Now only regular files are read; everything
else is skipped with the reason, by its type as ``lstat``/``stat`` see it (``readers.py`` checks
again with ``fstat`` what it actually opened). A symbolic link is followed only to a regular
file inside the folder, unless links out are allowed; a link loop or a dangling link is skipped.
Linked folders are not descended (``os.walk`` without ``followlinks``), so a folder that links
to itself cannot make the walk endless. Hidden files and folders are skipped silently, as
before, and so is the store's own folder when it lives inside the ingested one.
"""

from __future__ import annotations

import errno
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path

from dragon_edge.store import readers
from dragon_edge.store.names import display_path


@dataclass
class Listing:
    documents: list[Path] = field(default_factory=list)  # to read, in a stable order
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path shown, why)
    unsupported: int = 0  # regular files of a type the store does not read


def list_folder(root: Path, *, links_out: bool = False, exclude: Path | None = None) -> Listing:
    listing, seen = Listing(), set()
    real_root = os.path.realpath(root)
    excluded = os.path.realpath(exclude) if exclude is not None else None
    suffixes = readers.supported_suffixes()

    def unreadable_folder(err: OSError) -> None:
        listing.skipped.append((display_path(err.filename), f"folder not readable: {err.strerror}"))

    for dirpath, dirnames, filenames in os.walk(root, onerror=unreadable_folder):
        here = Path(dirpath)
        dirnames[:] = [d for d in sorted(dirnames) if _descend(here / d, excluded, listing)]
        for name in sorted(filenames):
            if name.startswith("."):
                continue
            path = here / name
            why = _why_not_read(path, real_root, links_out)
            if why is None and path.suffix.lower() not in suffixes:
                why = readers.why_unsupported(path)
                listing.unsupported += 1
            if why is not None:
                listing.skipped.append((display_path(path), why))
                continue
            target = os.path.realpath(path)
            if target not in seen:  # a link to a file listed already: read it once
                seen.add(target)
                listing.documents.append(path)
    return listing


def _descend(path: Path, excluded: str | None, listing: Listing) -> bool:
    if path.name.startswith(".") or os.path.realpath(path) == excluded:
        return False
    if path.is_symlink():
        listing.skipped.append((display_path(path), "a link to a folder (linked folders are not followed)"))
        return False
    return True


def _why_not_read(path: Path, real_root: str, links_out: bool) -> str | None:
    """None if ``path`` is, or links to, a regular file that may be read; else why not."""
    try:
        mode = path.lstat().st_mode
        if stat.S_ISLNK(mode):
            target = _link_target(path, real_root, links_out)
            if isinstance(target, str):
                return target
            mode = target.stat().st_mode
    except OSError as e:
        return e.strerror or type(e).__name__
    return None if stat.S_ISREG(mode) else readers.file_kind(mode)


def _link_target(path: Path, real_root: str, links_out: bool) -> Path | str:
    """The file a link ends at, or why it is not followed."""
    try:
        target = os.path.realpath(path, strict=True)
    except OSError as e:
        if e.errno == errno.ELOOP:
            return "a symbolic link loop"
        return f"a dangling symbolic link ({e.strerror})"
    inside = os.path.commonpath([real_root, target]) == real_root
    if not inside and not links_out:
        return (f"a symbolic link out of the folder (to {display_path(target)}); "
                "--follow-symlinks (follow_symlinks=True) reads it")
    return Path(target)
