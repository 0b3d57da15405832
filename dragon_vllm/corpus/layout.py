"""The index's folder on disk: its file names and its manifest, which build writes and load
reads first.

    manifest.json      fingerprints, counts, build parameters, sources, file sizes/sha256
    index.faiss        IndexFlatIP (small corpora) or IVF{nlist},Flat (>= ivf_threshold);
                       faiss row i = passage id i
    passages.sqlite3   passages(id, title, text): random access by id, one file, crash-safe
"""

from __future__ import annotations

import json
from pathlib import Path

from dragon_vllm.corpus.errors import CorpusCorrupt, CorpusNotFound

FORMAT = "dragon-public-index"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
INDEX_FILE = "index.faiss"
PASSAGES_FILE = "passages.sqlite3"
_REQUIRED = {"retriever_fingerprint", "score_function", "dim", "passages", "index", "files"}


def read_manifest(root: Path) -> dict:
    """The manifest of the index at ``root``: :class:`CorpusNotFound` if there is no folder,
    :class:`CorpusCorrupt` if it is not a finished index of this format version."""
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
    missing = _REQUIRED - set(manifest)
    if missing:
        raise CorpusCorrupt(f"{root}/{MANIFEST} lacks {sorted(missing)}")
    return manifest
