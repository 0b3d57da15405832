"""The device's private document store, with the real MiniLM model, real faiss and SQLite."""

from __future__ import annotations

import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from dragon_core.errors import DragonError
from dragon_core.retrieval import chunk_words
from dragon_host.embedder import default_embedder
from dragon_edge.store import (
    DocumentStore,
    EmptyDocument,
    EmptyFolder,
    FolderNotFound,
    RetrieverMismatch,
    StoreCorrupt,
    StoreError,
    StoreNotFound,
    UnknownSource,
    UnreadableDocument,
    pdf_supported,
)
from dragon_edge.store import index as ix
from dragon_edge.store.document_store import DB_NAME, INDEX_NAME, PAUSE_ENV

os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = Path(__file__).resolve().parents[2]

NOTES = {
    "wifi.md": "# Home network\nThe home wifi password is tangerine-42. The router sits in the hallway closet.",
    "dentist.txt": "My dentist appointment is on Tuesday at 3pm with Dr. Alvarez on Elm Street.",
    "bread.txt": "Banana bread recipe: three ripe bananas, baking soda, butter, and one hour at 175 degrees.",
    "sub/car.md": "The car's next oil change is due at 92,000 kilometres; the mechanic is Jorge's garage.",
    # 128 filler words + the fact: three passages; the fact is the whole third one.
    "long.txt": " ".join(["filler words about nothing in particular at all"] * 16)
    + " My passport number is X1234567 and it expires in March 2031.",
}


@pytest.fixture(scope="module")
def embedder():
    return default_embedder()


@pytest.fixture
def notes(tmp_path: Path) -> Path:
    root = tmp_path / "notes"
    for name, text in NOTES.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root


@pytest.fixture
def store(tmp_path: Path, embedder) -> DocumentStore:
    with DocumentStore(tmp_path / "store", embedder) as s:
        yield s


def db_ids(path: Path) -> list[int]:
    with sqlite3.connect(path / DB_NAME) as c:
        return [r[0] for r in c.execute("SELECT id FROM passages ORDER BY id")]


def content(path: Path) -> set[tuple[str, int, str]]:
    with sqlite3.connect(path / DB_NAME) as c:
        q = "SELECT s.source, p.ordinal, p.text FROM passages p JOIN sources s ON p.source_id = s.id"
        return set(c.execute(q))


def assert_consistent(s: DocumentStore) -> None:
    st = s.stats()
    assert st.passages == st.index_vectors
    assert sorted(ix.index_ids(s._index).tolist()) == db_ids(s.path)
    loaded = ix.load_index(s.path / INDEX_NAME, st.dim)  # the file on disk matches too
    assert sorted(ix.index_ids(loaded).tolist()) == db_ids(s.path)


def top_source(s: DocumentStore, query: str) -> str:
    return Path(s.search(query, k=1)[0].source).name


# ------------------------------------------------------------------ ingest and search
def test_ingest_folder_and_search(store, notes, embedder):
    report = store.ingest(notes, progress=False)
    assert len(report.added) == len(NOTES) and not report.skipped
    expected = sum(len(chunk_words(t)) for t in NOTES.values())
    assert report.passages_added == expected == store.stats().passages
    assert top_source(store, "what is the wifi password?") == "wifi.md"
    assert top_source(store, "when do I see the dentist") == "dentist.txt"
    assert top_source(store, "when does the car need an oil change") == "car.md"

    hits = store.search("what is my passport number", k=3)
    assert Path(hits[0].source).name == "long.txt" and hits[0].ordinal == 2
    assert "X1234567" in hits[0].text
    assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)
    # score is exactly R(d) of the shared contract
    brute = embedder.scores("what is my passport number", [h.text for h in hits])
    np.testing.assert_allclose([h.score for h in hits], brute, atol=1e-4)
    assert_consistent(store)


def test_reopen_keeps_everything(tmp_path, notes, embedder):
    with DocumentStore(tmp_path / "s", embedder) as s:
        s.ingest(notes, progress=False)
        before = [(h.id, round(h.score, 4)) for h in s.search("wifi password", k=3)]
    with DocumentStore(tmp_path / "s", embedder, create=False) as s:
        assert s.recovered is None
        assert [(h.id, round(h.score, 4)) for h in s.search("wifi password", k=3)] == before
        assert s.stats().retriever_fingerprint == embedder.fingerprint


def test_search_on_empty_store_and_large_k(store, embedder):
    assert store.search("anything", k=5) == []
    store.add_texts("only one passage here about tulips", source="t")
    assert len(store.search("tulips", k=50)) == 1


def test_incremental_add(store, notes, capsys):
    store.ingest(notes, progress=True)
    assert "ingest: 100%" in capsys.readouterr().err  # the tqdm bar
    old_ids = set(db_ids(store.path))
    (notes / "plants.txt").write_text("Water the fiddle leaf fig every Sunday; it hates cold drafts.")
    report = store.ingest(notes, progress=False)
    assert [Path(p).name for p in report.added] == ["plants.txt"]
    assert len(report.unchanged) == len(NOTES) and report.passages_added == 1
    assert old_ids < set(db_ids(store.path))  # old passages untouched
    assert top_source(store, "how often do I water the fig") == "plants.txt"
    n = store.add_texts(["Grandma's birthday is on the 9th of May."], source="sdk:family")
    assert n == 1 and store.search("when is grandma's birthday", k=1)[0].source == "sdk:family"
    assert_consistent(store)


def test_add_texts_replace_and_noop(store):
    assert store.add_texts(["The locker code is 4711."], source="s") == 1
    assert store.add_texts(["The locker code is 4711."], source="s") == 0  # same content
    assert store.add_texts(["The locker code changed to 9090."], source="s") == 1
    texts = [p.text for p in store.search("locker code", k=5)]
    assert texts == ["The locker code changed to 9090."]
    auto = store.add_texts("An unnamed note about kayaks.")
    assert auto == 1 and any(s.startswith("text:") for s in store.sources())
    with pytest.raises(EmptyDocument):
        store.add_texts(["  ", ""], source="blank")
    assert_consistent(store)


def test_delete_file_folder_and_unknown(store, notes):
    store.ingest(notes, progress=False)
    removed = store.delete(notes / "wifi.md")
    assert removed == 1
    assert all(Path(h.source).name != "wifi.md" for h in store.search("wifi password", k=10))
    assert store.delete(notes / "sub") == 1  # a folder: every file under it
    assert not any("car.md" in s for s in store.sources())
    store.add_texts("temporary note", source="tmp")
    assert store.delete("tmp") == 1
    with pytest.raises(UnknownSource):
        store.delete("no-such-source")
    assert_consistent(store)


def test_reingest_changed_file_replaces_its_passages(store, notes):
    store.ingest(notes, progress=False)
    (notes / "wifi.md").write_text("The home wifi password was changed to blueberry-77 in June.")
    report = store.ingest(notes, progress=False)
    assert [Path(p).name for p in report.updated] == ["wifi.md"] and report.passages_removed == 1
    texts = [t for (src, _, t) in content(store.path) if src.endswith("wifi.md")]
    assert texts == ["The home wifi password was changed to blueberry-77 in June."]
    assert "blueberry-77" in store.search("wifi password", k=1)[0].text
    assert_consistent(store)


def test_prune_removes_vanished_files(store, notes):
    store.ingest(notes, progress=False)
    (notes / "bread.txt").unlink()
    report = store.ingest(notes, progress=False, prune=True)
    assert [Path(p).name for p in report.removed] == ["bread.txt"]
    assert not any(s.endswith("bread.txt") for s in store.sources())
    assert_consistent(store)


# ------------------------------------------------------------------ bad inputs
def test_empty_and_missing_folders(store, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(EmptyFolder):
        store.ingest(empty)
    (empty / "photo.png").write_bytes(b"\x89PNG\r\n")
    (empty / ".hidden.txt").write_text("hidden files are skipped")
    with pytest.raises(EmptyFolder, match="1 other files"):
        store.ingest(empty)
    with pytest.raises(FolderNotFound):
        store.ingest(tmp_path / "nope")
    assert isinstance(EmptyFolder("x"), DragonError)


def test_unreadable_documents_are_skipped_with_reasons(store, notes, tmp_path):
    (notes / "binary.txt").write_bytes(b"\x00\x01\x02ELF\x00" * 50)
    (notes / "latin1.md").write_bytes("caf\xe9 cr\xe8me".encode("latin-1"))
    (notes / "empty.txt").write_text("   \n")
    report = store.ingest(notes, progress=False)
    reasons = {Path(p).name: why for p, why in report.skipped}
    assert set(reasons) == {"binary.txt", "latin1.md", "empty.txt"}
    assert "binary" in reasons["binary.txt"] and "UTF-8" in reasons["latin1.md"]
    assert len(report.added) == len(NOTES)
    with pytest.raises(UnreadableDocument):
        store.ingest(notes, progress=False, strict=True)
    with pytest.raises(UnreadableDocument, match="binary"):
        store.add_file(notes / "binary.txt")
    only_bad = tmp_path / "bad"
    only_bad.mkdir()
    shutil.copy(notes / "binary.txt", only_bad)
    with pytest.raises(EmptyFolder, match="could be read"):
        store.ingest(only_bad, progress=False)
    assert_consistent(store)


_INGEST_AS_CHILD = """
import json, sys
from dragon_edge.store import DocumentStore
with DocumentStore(sys.argv[1]) as store:
    report = store.ingest(sys.argv[2], progress=False)
    print(json.dumps({"skipped": report.skipped, "sources": sorted(store.sources())}))
"""


def test_permission_denied_document(notes):
    """An unreadable file is skipped with its reason and the rest is ingested. Root reads any
    file (CI runs as root), so there the ingest runs in a child process that keeps uid 0 but
    loses the capabilities that bypass file permissions (util-linux ``setpriv``)."""
    import json

    (notes / "secret.txt").write_text("locked")
    (notes / "secret.txt").chmod(0)
    store_dir = notes.parent / "store"
    if os.geteuid() != 0:
        with DocumentStore(store_dir) as store:
            report = store.ingest(notes, progress=False)
            skipped, sources = report.skipped, store.sources()
    else:
        no_bypass = ["setpriv", "--bounding-set", "-dac_override,-dac_read_search", "--"]
        out = subprocess.run([*no_bypass, sys.executable, "-c", _INGEST_AS_CHILD, str(store_dir), str(notes)],
                             env=dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1"),
                             capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr[-3000:]
        result = json.loads(out.stdout.strip().splitlines()[-1])
        skipped, sources = result["skipped"], result["sources"]
    assert [why for p, why in skipped if p.endswith("secret.txt")], skipped
    assert not any(str(s).endswith("secret.txt") for s in sources)
    assert any(str(s).endswith("bread.txt") for s in sources)


def _minimal_pdf(text: str) -> bytes:
    stream = b"BT /F1 12 Tf 72 720 Td (" + text.encode() + b") Tj ET"
    objs = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
        b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents 4 0 R "
        b"/Resources << /Font << /F1 5 0 R >> >> >>",
        b"<< /Length %d >>\nstream\n" % len(stream) + stream + b"\nendstream",
        b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>",
    ]
    out, offsets = b"%PDF-1.4\n", []
    for i, body in enumerate(objs, 1):
        offsets.append(len(out))
        out += b"%d 0 obj\n" % i + body + b"\nendobj\n"
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objs) + 1)
    out += b"".join(b"%010d 00000 n \n" % o for o in offsets)
    return out + b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (len(objs) + 1, xref)


@pytest.mark.skipif(not pdf_supported(), reason="pypdf not installed: PDFs are skipped")
def test_pdf_ingest(store, tmp_path):
    docs = tmp_path / "pdfs"
    docs.mkdir()
    (docs / "insurance.pdf").write_bytes(_minimal_pdf("The insurance policy number is ZK-5521 valid until 2030."))
    (docs / "broken.pdf").write_bytes(b"%PDF-1.4\nthis is not really a pdf")
    report = store.ingest(docs, progress=False)
    assert [Path(p).name for p in report.added] == ["insurance.pdf"]
    assert [Path(p).name for p, _ in report.skipped] == ["broken.pdf"]
    assert "ZK-5521" in store.search("insurance policy number", k=1)[0].text


def test_pdf_without_pypdf_is_skipped_with_reason(store, notes, monkeypatch):
    from dragon_edge.store import readers

    monkeypatch.setattr(readers, "pdf_supported", lambda: False)
    (notes / "scan.pdf").write_bytes(_minimal_pdf("hidden"))
    report = store.ingest(notes, progress=False)
    assert [(Path(p).name, why) for p, why in report.skipped] == [("scan.pdf", "PDF needs pypdf: pip install pypdf")]


def test_store_inside_ingested_folder_and_worker_threads(tmp_path, notes, embedder):
    from concurrent.futures import ThreadPoolExecutor

    with DocumentStore(notes / ".." / "notes" / "mystore", embedder) as s:
        report = s.ingest(notes, progress=False)
        assert report.skipped == []  # its own sqlite/faiss files are not "documents"
        with ThreadPoolExecutor(2) as pool:  # e.g. an async SDK calling through run_in_executor
            hits = list(pool.map(lambda q: s.search(q, k=1)[0].source, ["wifi password", "dentist"]))
        assert [Path(h).name for h in hits] == ["wifi.md", "dentist.txt"]
    with pytest.raises(StoreError, match="closed"):
        s.search("wifi")


# ------------------------------------------------------------------ damaged store files
@pytest.mark.parametrize("damage", ["garbage", "truncate", "flip", "delete"])
def test_damaged_faiss_file_is_rebuilt(tmp_path, notes, embedder, damage):
    with DocumentStore(tmp_path / "s", embedder) as s:
        s.ingest(notes, progress=False)
        expected = [h.id for h in s.search("wifi password", k=3)]
    f = tmp_path / "s" / INDEX_NAME
    blob = f.read_bytes()
    if damage == "garbage":
        f.write_bytes(os.urandom(len(blob)))
    elif damage == "truncate":
        f.write_bytes(blob[: len(blob) // 2])
    elif damage == "flip":
        f.write_bytes(blob[:-10] + bytes([blob[-10] ^ 0xFF]) + blob[-9:])
    else:
        f.unlink()
    with DocumentStore(tmp_path / "s", embedder) as s:
        assert s.recovered and "rebuilt" in s.recovered
        assert [h.id for h in s.search("wifi password", k=3)] == expected
        assert_consistent(s)


def test_stale_faiss_file_is_repaired(tmp_path, notes, embedder):
    with DocumentStore(tmp_path / "s", embedder) as s:
        s.ingest(notes, progress=False)
        old = (tmp_path / "s" / INDEX_NAME).read_bytes()
        s.delete(notes / "bread.txt")
        s.add_texts("The spare key is under the blue flowerpot.", source="key")
    (tmp_path / "s" / INDEX_NAME).write_bytes(old)  # a valid file from an older state
    with DocumentStore(tmp_path / "s", embedder) as s:
        assert s.recovered == "index repaired from SQLite (-1 +1 vectors)"
        assert s.search("where is the spare key", k=1)[0].source == "key"
        assert_consistent(s)


def test_corrupt_or_missing_sqlite_is_a_clear_error(tmp_path, notes, embedder):
    root = tmp_path / "s"
    with DocumentStore(root, embedder) as s:
        s.ingest(notes, progress=False)
    good = (root / DB_NAME).read_bytes()

    (root / DB_NAME).write_bytes(b"this is not sqlite" + good[18:])
    with pytest.raises(StoreCorrupt, match="not a readable store database"):
        DocumentStore(root, embedder)

    (root / DB_NAME).write_bytes(good[:4096] + os.urandom(len(good) - 4096))  # damaged pages
    with pytest.raises(StoreCorrupt):
        DocumentStore(root, embedder)

    (root / DB_NAME).unlink()
    with sqlite3.connect(root / DB_NAME) as c:
        c.execute("CREATE TABLE unrelated (x)")
    with pytest.raises(StoreCorrupt, match="not a document store"):
        DocumentStore(root, embedder)

    (root / DB_NAME).unlink()
    with pytest.raises(StoreCorrupt, match="missing"):
        DocumentStore(root, embedder)  # index.faiss alone: refuse rather than start empty

    with pytest.raises(StoreNotFound):
        DocumentStore(tmp_path / "nothing", embedder, create=False)
    assert issubclass(StoreCorrupt, StoreError) and issubclass(StoreError, DragonError)


def test_other_model_is_refused_or_reembedded(tmp_path, notes, embedder):
    root = tmp_path / "s"
    with DocumentStore(root, embedder) as s:
        s.ingest(notes, progress=False)
    with sqlite3.connect(root / DB_NAME) as c:
        c.execute("UPDATE meta SET value = 'other-model' WHERE key = 'model_fingerprint'")
        c.execute("UPDATE passages SET vector = zeroblob(1536)")  # as if from another model
    with pytest.raises(RetrieverMismatch):
        DocumentStore(root, embedder)
    with DocumentStore(root, embedder, reembed_on_mismatch=True) as s:
        assert top_source(s, "what is the wifi password?") == "wifi.md"
        assert s.search("wifi password", k=1)[0].score > 3.0
        assert_consistent(s)


def test_second_handle_sees_new_commits(tmp_path, notes, embedder):
    writer = DocumentStore(tmp_path / "s", embedder)
    reader = DocumentStore(tmp_path / "s", embedder)
    assert reader.search("wifi", k=1) == []
    writer.ingest(notes, progress=False)
    assert top_source(reader, "what is the wifi password?") == "wifi.md"
    writer.delete(notes / "wifi.md")
    assert all(not h.source.endswith("wifi.md") for h in reader.search("wifi password", k=10))
    writer.close()
    reader.close()


# ------------------------------------------------------------------ killed ingest
_INGEST = "import sys; from dragon_edge.store import DocumentStore; DocumentStore(sys.argv[1]).ingest(sys.argv[2], progress=False)"


def _ingest_killed_at(store: Path, folder: Path, pause: str) -> None:
    """Run an ingest in a subprocess, SIGKILL it when it reaches ``pause``."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", **{PAUSE_ENV: pause})
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    proc = subprocess.Popen([sys.executable, "-c", _INGEST, str(store), str(folder)],
                            env=env, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    try:
        for line in proc.stderr:
            if line.startswith("DRAGON_STORE_PAUSED"):
                break
            assert time.monotonic() < deadline, "ingest never reached the pause point"
        else:
            pytest.fail(f"ingest exited (rc={proc.wait()}) before the pause point {pause}")
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL


@pytest.mark.slow
@pytest.mark.parametrize("pause", ["in_txn:3:120", "index_write:1:120"])
def test_killed_ingest_leaves_store_consistent(tmp_path, notes, embedder, pause):
    root = tmp_path / "s"
    first = sorted(NOTES)[:3]  # bread.txt, dentist.txt, long.txt
    staged = tmp_path / "staged"
    shutil.copytree(notes, staged)
    for name in NOTES:
        if name not in first:
            (notes / name).unlink()
    with DocumentStore(root, embedder) as s:
        s.ingest(notes, progress=False)  # a saved, consistent store to start from
    shutil.copytree(staged, notes, dirs_exist_ok=True)
    (notes / "dentist.txt").write_text("The dentist moved my appointment to Friday at 9am.")
    (notes / "zz_last.txt").write_text("The storage unit number is 118 at Northside Storage.")
    # order of work (files, then subfolders): bread (unchanged), dentist (txn 1), long (unchanged),
    # wifi (txn 2), zz_last (txn 3), sub/car (txn 4); then the faiss file is written once.

    _ingest_killed_at(root, notes, pause)

    assert list(root.glob(f"{INDEX_NAME}.tmp-*")) or pause.startswith("in_txn")
    with DocumentStore(root, embedder) as s:
        assert s.recovered and "repaired" in s.recovered
        assert not list(root.glob(f"{INDEX_NAME}.tmp-*"))
        assert_consistent(s)
        names = {Path(x).name for x in s.sources()}
        if pause.startswith("in_txn"):  # txn 3 (zz_last) rolled back whole; txns 1-2 kept
            assert names == {"bread.txt", "dentist.txt", "long.txt", "wifi.md"}
        else:
            assert names == {Path(n).name for n in NOTES} | {"zz_last.txt"}
        dentist = [t for (src, _, t) in content(root) if src.endswith("dentist.txt")]
        assert dentist == ["The dentist moved my appointment to Friday at 9am."]
        assert top_source(s, "what is the wifi password?") == "wifi.md"
        s.ingest(notes, progress=False)  # finishing the interrupted ingest
        assert_consistent(s)
    with DocumentStore(tmp_path / "fresh", embedder) as fresh:
        fresh.ingest(notes, progress=False)
    assert content(root) == content(tmp_path / "fresh")


def test_the_runtime_searches_the_store_off_the_event_loop(store: DocumentStore, notes: Path):
    """An answer's private search (a MiniLM embedding: tens of ms on a CPU) runs on the store's
    own thread, so the event loop keeps serving other answers meanwhile; same passages."""
    import asyncio
    import threading

    from dragon_edge.runtime import EdgeRuntime

    store.ingest(notes, progress=False)
    threads: list[str] = []
    search = store.search

    def spy(query: str, k: int = 4):
        threads.append(threading.current_thread().name)
        return search(query, k)

    store.search = spy  # type: ignore[method-assign]
    runtime = EdgeRuntime(engine=None, tokenizer=None, identity=None, eos_ids=[0], store=store)
    try:
        found = asyncio.run(runtime.find_private("Where does Lena live?", 2))
    finally:
        runtime._store_worker.shutdown()
    assert [p.id for p in found] == [p.id for p in search("Where does Lena live?", 2)] and found
    assert threads and threads[0].startswith("private-store") and threads[0] != threading.main_thread().name
