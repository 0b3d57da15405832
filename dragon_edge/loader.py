"""Build a device runtime from names: model, engine, store, cloud URL."""

from __future__ import annotations

import logging
import os

from dragon_core.prompt import eos_token_ids
from dragon_host.identity import local_identity
from dragon_host.models import get_model
from dragon_edge.link import CloudLink
from dragon_edge.runtime import EdgeRuntime

log = logging.getLogger("dragon.edge")

ENGINES = ("llamacpp", "hf")


def load_tokenizer(model: str):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(get_model(model).tokenizer_dir()))


def load_runtime(model: str, engine: str = "llamacpp", store=None, cloud_url: str | None = None,
                 auth_token: str = "", **engine_options) -> EdgeRuntime:
    """The engine kind decides which copy of the weights the device runs (and fingerprints):
    llama.cpp reads the GGUF as shipped, transformers the converted safetensors folder.
    ``engine_options`` go to the engine (e.g. llama.cpp's ``n_threads``, ``max_idle_contexts``)."""
    from dragon_edge.engines import load_engine

    if engine not in ENGINES:
        raise ValueError(f"unknown engine {engine!r}; choose one of {', '.join(ENGINES)}")
    tokenizer = load_tokenizer(model)
    identity = local_identity(model, "gguf" if engine == "llamacpp" else "hf")
    eng = load_engine(engine, model, **engine_options)
    link = CloudLink(cloud_url, identity, auth_token) if cloud_url else None
    log.info("device runtime: model %s on %s, store %s, cloud %s", model, engine,
             getattr(store, "path", None), cloud_url or "none (device-only)")
    return EdgeRuntime(eng, tokenizer, identity, eos_token_ids(tokenizer), store=store, link=link)
