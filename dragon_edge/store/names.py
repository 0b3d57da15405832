"""How a file path becomes a source name in the store, and how paths are shown.

Linux file names are bytes. Python hands back a name that is not UTF-8 with lone surrogates
(PEP 383), which SQLite, JSON and a UTF-8 terminal all refuse, so one such name used to abort
a whole folder. A source name is the resolved absolute path with those bytes written as
``\\xNN``: the file is ingested, found and deleted like any other, and printing it never fails.
"""

from __future__ import annotations

import os


def display_path(path: str | os.PathLike) -> str:
    """``path`` as printable UTF-8 text; undecodable bytes become ``\\xNN``."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def source_key(path: str | os.PathLike) -> str:
    """The store's name for the file at ``path``: its real absolute path, printable.
    ``realpath`` rather than ``Path.resolve`` because it never raises on a symlink loop."""
    return display_path(os.path.realpath(path))


def names_one_source(keys: list[str], source: str | os.PathLike) -> bool:
    """``keys`` (what ``DocumentStore.sources_matching(source)`` found) is ``source`` itself, not
    the files under a folder of that name: deleting it needs no confirmation."""
    return keys in ([display_path(source)], [source_key(source)])
