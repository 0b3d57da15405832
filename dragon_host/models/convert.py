"""Convert a registered model's GGUF into the bf16 safetensors folder the cloud runs.

transformers/torch are imported only inside the conversion itself, so checking whether a model
is ready stays light.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any, Iterator

from dragon_core.errors import ConversionError, ModelNotInstalled
from dragon_host.files import install
from dragon_host.models.fingerprint import SPECIAL_KEYS, gguf_tokenizer, hf_tokenizer
from dragon_host.models.gguf import file_digest, read_gguf_metadata
from dragon_host.models.registry import FORMAT, MARKER, ModelSpec, get_model

# ---------------------------------------------------------------------------- conversion
def _source_record(spec: ModelSpec) -> dict[str, Any]:
    path = spec.gguf_path()
    return {"package": spec.package, "version": spec.version, "gguf_file": spec.gguf_file,
            "size": path.stat().st_size, "sha256": file_digest(path)}


def is_prepared(name: str) -> bool:
    """True when the converted folder exists, is complete and comes from the installed GGUF."""
    spec = get_model(name)
    try:
        marker = json.loads((spec.hf_dir() / MARKER).read_text())
    except (ModelNotInstalled, ValueError):
        return False
    src = marker.get("source", {})
    gguf = spec.gguf_path()
    # Cheap staleness check (no 100 MB hash on every start): format, package version, size.
    return (marker.get("format") == FORMAT and src.get("version") == spec.version
            and src.get("size") == gguf.stat().st_size)


@contextlib.contextmanager
def _lock(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)  # two setups at once: the second waits, then finds it done
        yield


def prepare(name: str, force: bool = False, log=print) -> Path:
    """Convert the model's GGUF into a bf16 safetensors folder with tokenizer and chat
    template (docs/ENGINES.md §5). Idempotent; written to a temporary folder, then renamed."""
    spec = get_model(name)
    target = spec.target_dir()
    with _lock(target.parent / f".{name}.lock"):
        if not force and is_prepared(name):
            log(f"[dragon-models] {name}: ready at {target}")
            return target
        gguf = spec.gguf_path()
        log(f"[dragon-models] {name}: converting {gguf.name} -> {target} (bf16, ~1 min) ...")
        t0 = time.monotonic()
        tmp = target.parent / f".{name}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            _convert(gguf, tmp)
            marker = {"format": FORMAT, "name": name, "dtype": "bfloat16", "source": _source_record(spec)}
            (tmp / MARKER).write_text(json.dumps(marker, indent=2) + "\n")
            install(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        log(f"[dragon-models] {name}: converted in {time.monotonic() - t0:.0f} s")
        return target


def _convert(gguf: Path, out: Path) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a local file; never reach a hub
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # weight-loading bars; the de-quantising one stays (2 s)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # float32 load: the GGUF kernels compute in float32, then one rounding to bf16 on save.
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer.remove_quantization_config(model)  # else config.json claims "gguf"
    model = model.to(torch.bfloat16)
    model.config.dtype = torch.bfloat16
    meta = read_gguf_metadata(gguf)
    _special_tokens_from_gguf(meta, tokenizer, model)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    _check_special_tokens(meta, out)


def _special_tokens_from_gguf(meta: dict[str, Any], tokenizer: Any, model: Any) -> None:
    """Set BOS/EOS/UNK/PAD from the GGUF's own ids. transformers' GGUF loader guesses them
    differently by version (5.17 wrote ``eos = <|im_start|>`` and no pad for SmolLM2, whose
    GGUF says ``<|im_end|>`` for both), and the handshake compares tokenizer fingerprints, so
    the conversion must not depend on the installed transformers."""
    tokens = meta["tokenizer.ggml.tokens"]
    for key, gguf_key in SPECIAL_KEYS:
        tid = meta.get(f"tokenizer.ggml.{gguf_key}_token_id")
        if tid is None:
            continue
        setattr(tokenizer, f"{key}_token", tokens[tid])
        for cfg in (model.config, getattr(model, "generation_config", None)):
            if cfg is not None:
                setattr(cfg, f"{key}_token_id", int(tid))


def _check_special_tokens(meta: dict[str, Any], folder: Path) -> None:
    """The saved tokenizer's special ids must be the GGUF's (read back from the files)."""
    want, got = gguf_tokenizer(meta)["special"], hf_tokenizer(folder)["special"]
    wrong = {k: (got.get(k), v) for k, v in want.items() if v is not None and got.get(k) != v}
    if wrong:
        raise ConversionError(f"converted tokenizer's special token ids differ from the GGUF's "
                              f"(key: (saved, gguf)): {wrong}")
