"""vLLM's OpenAI protocol models, imported from where each supported vLLM version keeps them.

* vLLM 0.32 (CPU CI): per-endpoint modules; ``ModelCard``/``ModelList`` in
  ``vllm/entrypoints/serve/engine/protocol.py``.
* vLLM 0.26 (the GPU machine): the same request modules, but ``ModelCard``/``ModelList`` in
  ``vllm/entrypoints/openai/engine/protocol.py`` (verified on an H200, 2026-11-30).
* older releases: one ``vllm/entrypoints/openai/protocol.py``.

Each name is looked up in these places in order, so a layout that moves one of them still
imports. Only names present in every layout are used; the error body is built by hand (its
model changed shape).
"""

from __future__ import annotations

import importlib
from typing import Any

_PLACES = {
    "ChatCompletionRequest": ("vllm.entrypoints.openai.chat_completion.protocol", "vllm.entrypoints.openai.protocol"),
    "CompletionRequest": ("vllm.entrypoints.openai.completion.protocol", "vllm.entrypoints.openai.protocol"),
    "ModelCard": ("vllm.entrypoints.serve.engine.protocol", "vllm.entrypoints.openai.engine.protocol",
                  "vllm.entrypoints.openai.protocol"),
    "ModelList": ("vllm.entrypoints.serve.engine.protocol", "vllm.entrypoints.openai.engine.protocol",
                  "vllm.entrypoints.openai.protocol"),
}


def _find(name: str) -> Any:
    tried = []
    for module in _PLACES[name]:
        try:
            return getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError) as exc:
            tried.append(f"{module}: {exc}")
    raise ImportError(f"vLLM's {name} was not found in any known place ({'; '.join(tried)}); "
                      f"this vLLM version is not supported (verified: 0.26 GPU, 0.32 CPU)")


ChatCompletionRequest = _find("ChatCompletionRequest")
CompletionRequest = _find("CompletionRequest")
ModelCard = _find("ModelCard")
ModelList = _find("ModelList")

__all__ = ["ChatCompletionRequest", "CompletionRequest", "ModelCard", "ModelList"]
