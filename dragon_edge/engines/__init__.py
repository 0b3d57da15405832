"""On-device engines implementing ``dragon_core.engine.Engine``.

* ``llamacpp`` (default): llama-cpp-python on the GGUF as shipped; k sequence ids in one context.
* ``hf``: transformers on the converted bf16 folder, float32 compute; the exact reference.

Backends are imported lazily: importing this package pulls in neither llama.cpp nor torch.
"""

from __future__ import annotations

from typing import Any

from dragon_core.engine import Engine

KINDS = ("llamacpp", "hf")


def load_engine(kind: str, model: str, **kwargs: Any) -> Engine:
    """Load a registered model (``dragon_host.models``) on the engine ``kind``."""
    if kind == "llamacpp":
        from dragon_edge.engines.llamacpp import LlamaCppEngine

        return LlamaCppEngine.from_name(model, **kwargs)
    if kind == "hf":
        from dragon_edge.engines.hf import HFEngine

        return HFEngine.from_name(model, **kwargs)
    raise ValueError(f"unknown engine {kind!r}; choose one of {', '.join(KINDS)}")


__all__ = ["KINDS", "load_engine"]
