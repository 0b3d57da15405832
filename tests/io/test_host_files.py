"""dragon_host: the file helpers and the passage-index error bases both sides share."""

from __future__ import annotations

import hashlib
from pathlib import Path

from dragon_edge.store import errors as store_errors
from dragon_host.errors import IndexCorrupt, IndexNotFound, RetrieverMismatch
from dragon_host.files import file_sha256, install
from dragon_vllm.corpus import errors as corpus_errors


def test_file_sha256_is_the_hash_of_the_bytes(tmp_path: Path):
    data = bytes(range(256)) * 40_000  # more than one read block
    (tmp_path / "f").write_bytes(data)
    assert file_sha256(tmp_path / "f") == hashlib.sha256(data).hexdigest()


def test_install_replaces_a_file(tmp_path: Path):
    (tmp_path / "target").write_text("old")
    (tmp_path / "tmp").write_text("new")
    install(tmp_path / "tmp", tmp_path / "target")
    assert (tmp_path / "target").read_text() == "new" and not (tmp_path / "tmp").exists()


def test_install_swaps_a_folder_and_removes_the_old_one(tmp_path: Path):
    for name, text in (("target", "old"), ("tmp", "new")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "a").write_text(text)
    install(tmp_path / "tmp", tmp_path / "target")
    assert (tmp_path / "target" / "a").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["target"]


def test_install_renames_a_folder_into_a_free_place(tmp_path: Path):
    (tmp_path / "tmp").mkdir()
    install(tmp_path / "tmp", tmp_path / "target")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["target"]


def test_one_except_handles_either_sides_index_errors():
    pairs = [(IndexNotFound, store_errors.StoreNotFound, corpus_errors.CorpusNotFound),
             (IndexCorrupt, store_errors.StoreCorrupt, corpus_errors.CorpusCorrupt),
             (RetrieverMismatch, store_errors.RetrieverMismatch, corpus_errors.CorpusRetrieverMismatch)]
    for base, store, corpus in pairs:
        assert issubclass(store, base) and issubclass(corpus, base)
    # each side keeps its own base class and its codes
    assert issubclass(store_errors.StoreNotFound, store_errors.StoreError)
    assert issubclass(corpus_errors.CorpusNotFound, corpus_errors.CorpusError)
    assert [c.code for c in pairs[0][1:]] == ["store_not_found", "corpus_not_found"]
    assert store_errors.RetrieverMismatch.code == corpus_errors.CorpusRetrieverMismatch.code == "retriever_mismatch"
    assert issubclass(corpus_errors.CorpusNotFound, FileNotFoundError)
