"""vLLM's OpenAI protocol models, imported from where each supported vLLM version keeps them.

vLLM 0.32 (CPU CI) split ``vllm/entrypoints/openai/protocol.py`` into per-endpoint modules;
older releases (0.26 on the GPU machine may be either) keep one module. Only names present in
both layouts are used; the error body is built by hand (its model changed shape).
"""

from __future__ import annotations

try:  # the split layout (vLLM 0.32)
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
    from vllm.entrypoints.openai.completion.protocol import CompletionRequest
    from vllm.entrypoints.serve.engine.protocol import ModelCard, ModelList
except ImportError:  # the single-module layout
    from vllm.entrypoints.openai.protocol import (  # type: ignore[no-redef]
        ChatCompletionRequest,
        CompletionRequest,
        ModelCard,
        ModelList,
    )

__all__ = ["ChatCompletionRequest", "CompletionRequest", "ModelCard", "ModelList"]
