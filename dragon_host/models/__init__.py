"""The models DRAGON runs, on either side: registry, GGUF header, fingerprints, conversion, CLI.

Importing this package needs only the standard library; transformers/torch are imported inside
:func:`prepare` when a conversion really runs.

* ``registry``: ``ModelSpec``/``RetrieverSpec``, where their files are (``get_model``);
* ``gguf``: the GGUF metadata header and the cached file digest;
* ``fingerprint``: model and tokenizer fingerprints the handshake compares;
* ``convert``: ``prepare`` a model's safetensors folder from its GGUF, once;
* ``cli``: ``dragon-models`` / ``python -m dragon_host.models``.
"""

from dragon_host.models.cli import main
from dragon_host.models.convert import is_prepared, prepare
from dragon_host.models.fingerprint import Fingerprints, fingerprints, gguf_fingerprints, hf_fingerprints
from dragon_host.models.gguf import read_gguf_metadata
from dragon_host.models.registry import (MARKER, MODELS, RETRIEVERS, ModelSpec, RetrieverSpec, cache_dir,
                                         get_model, get_retriever)

__all__ = [
    "MARKER", "MODELS", "RETRIEVERS", "ModelSpec", "RetrieverSpec", "cache_dir", "get_model", "get_retriever",
    "read_gguf_metadata", "Fingerprints", "fingerprints", "gguf_fingerprints", "hf_fingerprints",
    "is_prepared", "prepare", "main",
]
