"""Model and tokenizer fingerprints, computed the same way from a GGUF and from its conversion.

The handshake compares two fingerprints computed independently on each side, so they are
defined on what both forms share, not on file bytes:

* **tokenizer**: vocabulary (id order), BPE merges, special-token ids, BOS/EOS insertion and
  the chat template;
* **model**: architecture values (layers, widths, heads, RoPE base, norm epsilon, context),
  the tokenizer fingerprint, and the digest of the GGUF the weights come from (the converted
  folder records it). Without the last item a base model and its instruct fine-tune, which
  share architecture and vocabulary, would look the same.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from dragon_core.errors import ModelNotInstalled
from dragon_host.models.gguf import file_digest, read_gguf_metadata
from dragon_host.models.registry import MARKER, get_model

# ---------------------------------------------------------------------------- fingerprints
@dataclass(frozen=True)
class Fingerprints:
    model: str
    tokenizer: str


def _digest(prefix: str, obj: Any) -> str:
    raw = json.dumps(obj, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return prefix + hashlib.sha256(raw.encode("utf-8", "surrogateescape")).hexdigest()[:32]


def _num(x: Any) -> Any:
    # GGUF stores floats as float32: compare at 6 significant digits so 1e-5 == 9.9999997e-06.
    return float(f"{x:.6g}") if isinstance(x, float) else x


# GGUF architecture name -> transformers model_type, where they differ.
_ARCH_ALIASES = {"gemma3": "gemma3_text"}


def _gguf_arch(meta: dict[str, Any]) -> dict[str, Any]:
    arch = meta["general.architecture"]
    g = lambda key, default=None: meta.get(f"{arch}.{key}", default)  # noqa: E731
    heads = g("attention.head_count")
    return {
        "architecture": _ARCH_ALIASES.get(arch, arch),
        "layers": g("block_count"),
        "hidden": g("embedding_length"),
        "ffn": g("feed_forward_length"),
        "heads": heads,
        "kv_heads": g("attention.head_count_kv", heads),
        "head_dim": g("attention.key_length", g("embedding_length") // heads),
        "vocab": g("vocab_size", len(meta["tokenizer.ggml.tokens"])),
        "context": g("context_length"),
        "rope_theta": _num(float(g("rope.freq_base", 10000.0))),
        "norm_eps": _num(float(g("attention.layer_norm_rms_epsilon"))),
    }


def _hf_arch(config: dict[str, Any]) -> dict[str, Any]:
    heads = config["num_attention_heads"]
    rope = config.get("rope_parameters") or {}
    return {
        "architecture": config["model_type"],
        "layers": config["num_hidden_layers"],
        "hidden": config["hidden_size"],
        "ffn": config["intermediate_size"],
        "heads": heads,
        "kv_heads": config.get("num_key_value_heads", heads),
        "head_dim": config.get("head_dim") or config["hidden_size"] // heads,
        "vocab": config["vocab_size"],
        "context": config["max_position_embeddings"],
        "rope_theta": _num(float(rope.get("rope_theta", config.get("rope_theta", 10000.0)))),
        "norm_eps": _num(float(config["rms_norm_eps"])),
    }


# (Hugging Face name, GGUF name) of the special tokens the tokenizer fingerprint covers
SPECIAL_KEYS = (("bos", "bos"), ("eos", "eos"), ("unk", "unknown"), ("pad", "padding"))


def gguf_tokenizer(meta: dict[str, Any]) -> dict[str, Any]:
    spm = meta.get("tokenizer.ggml.model") == "llama"  # SentencePiece-style adds BOS by default
    special = lambda key: meta.get(f"tokenizer.ggml.{key}_token_id")  # noqa: E731
    return {
        "tokens": meta["tokenizer.ggml.tokens"],
        "merges": meta.get("tokenizer.ggml.merges", []),
        "special": {k: special(g) for k, g in SPECIAL_KEYS},
        "add_bos": bool(meta.get("tokenizer.ggml.add_bos_token", spm)),
        "add_eos": bool(meta.get("tokenizer.ggml.add_eos_token", False)),
        "chat_template": meta.get("tokenizer.chat_template"),
    }


def hf_tokenizer(folder: Path) -> dict[str, Any]:
    tj = json.loads((folder / "tokenizer.json").read_text())
    tc = json.loads((folder / "tokenizer_config.json").read_text())
    vocab: dict[str, int] = dict(tj["model"]["vocab"])
    vocab.update({t["content"]: t["id"] for t in tj.get("added_tokens", [])})
    tokens: list[str | None] = [None] * (max(vocab.values()) + 1)
    for text, i in vocab.items():
        tokens[i] = text
    merges = [m if isinstance(m, str) else " ".join(m) for m in tj["model"].get("merges", [])]

    def token_id(key: str) -> int | None:
        tok = tc.get(key)
        tok = tok.get("content") if isinstance(tok, dict) else tok
        return vocab.get(tok) if tok is not None else None

    special = {k: token_id(f"{k}_token") for k in ("bos", "eos", "unk", "pad")}
    inserted = _post_processor_specials(tj.get("post_processor"))
    add_bos = tc.get("add_bos_token", special["bos"] is not None and inserted[0] == special["bos"])
    add_eos = tc.get("add_eos_token", special["eos"] is not None and inserted[-1:] == [special["eos"]])
    template_file = folder / "chat_template.jinja"
    template = template_file.read_text() if template_file.is_file() else tc.get("chat_template")
    return {
        "tokens": tokens,
        "merges": merges,
        "special": special,
        "add_bos": bool(add_bos),
        "add_eos": bool(add_eos),
        "chat_template": template,
    }


def _post_processor_specials(pp: dict[str, Any] | None) -> list[int | None]:
    """Ids a TemplateProcessing post-processor puts around a single sequence (None marks
    the sequence itself), so BOS/EOS insertion is read from what the tokenizer really does."""
    if not pp or pp.get("type") != "TemplateProcessing":
        return [None]
    ids: list[int | None] = []
    for piece in pp.get("single", []):
        if "Sequence" in piece:
            ids.append(None)
        else:
            name = piece["SpecialToken"]["id"]
            ids.extend(pp["special_tokens"][name]["ids"])
    return ids


def gguf_fingerprints(path: str | Path) -> Fingerprints:
    """Fingerprints of a GGUF file (the device side)."""
    path = Path(path)
    meta = read_gguf_metadata(path)
    tok = _digest("tok-", gguf_tokenizer(meta))
    model = _digest("model-", {"arch": _gguf_arch(meta), "tokenizer": tok, "weights": file_digest(path)})
    return Fingerprints(model=model, tokenizer=tok)


def hf_fingerprints(folder: str | Path) -> Fingerprints:
    """Fingerprints of a folder made by :func:`~dragon_host.models.convert.prepare` (the cloud side)."""
    folder = Path(folder)
    marker = folder / MARKER
    if not marker.is_file():
        raise ModelNotInstalled(f"{folder} was not made by `dragon-models prepare` (no {MARKER})")
    source = json.loads(marker.read_text())["source"]
    tok = _digest("tok-", hf_tokenizer(folder))
    config = json.loads((folder / "config.json").read_text())
    model = _digest("model-", {"arch": _hf_arch(config), "tokenizer": tok, "weights": source["sha256"]})
    return Fingerprints(model=model, tokenizer=tok)


def fingerprints(name: str, source: Literal["gguf", "hf"] = "gguf") -> Fingerprints:
    """Fingerprints of a registered model read from its GGUF or from its converted folder;
    the two are equal when the folder is an up-to-date conversion of the GGUF."""
    spec = get_model(name)
    if source == "gguf":
        return gguf_fingerprints(spec.gguf_path())
    if source == "hf":
        return hf_fingerprints(spec.hf_dir())
    raise ValueError(f"source must be 'gguf' or 'hf', not {source!r}")
