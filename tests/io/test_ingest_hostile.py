"""Ingest survives any folder (issue 11, item 4), with real FIFOs, devices, sockets, symlinks,
undecodable names, real SIGKILLs and a real full disk (a tiny tmpfs), plus SQLite's own
SQLITE_FULL (max_page_count) and an injected ENOSPC on the index file for the fast checks.

Every ingest that could hang on a bad entry runs under a pytest timeout, so a regression fails
instead of blocking the suite.
"""

from __future__ import annotations

import errno
import logging
import os
import random
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from dragon_core.retrieval import chunk_words
from dragon_host.embedder import default_embedder
from dragon_edge.store import DocumentStore, FileTooLarge, NotARegularFile, StoreFull
from dragon_edge.store import index as ix
from dragon_edge.store import readers
from dragon_edge.store.document_store import DB_NAME, INDEX_NAME, PAUSE_ENV
from dragon_edge.store.passages import count_passages, iter_passages

os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = Path(__file__).resolve().parents[2]
LATIN1_NAME = os.fsdecode(b"caf\xe9-notes.txt")  # not UTF-8: a lone surrogate in Python

NOTES = {
    "wifi.md": "The home wifi password is tangerine-42. The router sits in the hallway closet.",
    "dentist.txt": "My dentist appointment is on Tuesday at 3pm with Dr. Alvarez on Elm Street.",
    "sub/car.md": "The car's next oil change is due at 92,000 kilometres; the mechanic is Jorge's garage.",
}


@pytest.fixture(scope="module")
def embedder():
    return default_embedder()


def write_notes(root: Path, notes: dict[str, str] = NOTES) -> Path:
    for name, text in notes.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root


def hostile_folder(tmp_path: Path) -> tuple[Path, Path]:
    """A folder of good notes plus every kind of entry that used to break or hang an ingest."""
    root = write_notes(tmp_path / "notes")
    outside = tmp_path / "outside.txt"
    outside.write_text("The safe deposit box is number 77 at the harbour branch.")
    os.mkfifo(root / "pipe.txt")  # blocked the ingest forever
    (root / "zero.txt").symlink_to("/dev/zero")  # grew to 3 GB in 13 s
    (root / "loop.txt").symlink_to(root / "loop.txt")
    (root / "dangling.md").symlink_to(root / "gone.md")
    (root / "escape.txt").symlink_to(outside)
    (root / "wifi-again.md").symlink_to(root / "wifi.md")  # inside: read once, as wifi.md
    (root / "self").symlink_to(root)  # a folder loop
    here = os.getcwd()
    os.chdir(root)  # bind by a relative name: socket paths are limited to 108 bytes
    try:
        with socket.socket(socket.AF_UNIX) as sock:
            sock.bind("socket.txt")
    finally:
        os.chdir(here)
    (root / LATIN1_NAME).write_text("The bike shed combination is 5150.")  # aborted the whole folder
    if os.geteuid() == 0:
        os.mknod(root / "device.txt", 0o600 | 0o020000, os.makedev(1, 5))  # a /dev/zero of its own
    return root, outside


def reasons(report) -> dict[str, str]:
    return {Path(p).name: why for p, why in report.skipped}


def sources(store: DocumentStore) -> set[str]:
    return {Path(s).name for s in store.sources()}


def db_content(root: Path) -> set[tuple[str, int, str]]:
    with sqlite3.connect(root / DB_NAME) as c:
        return set(c.execute("SELECT s.source, p.ordinal, p.text FROM passages p JOIN sources s ON p.source_id = s.id"))


def assert_consistent(store: DocumentStore) -> None:
    st = store.stats()
    assert st.passages == st.index_vectors
    with sqlite3.connect(store.path / DB_NAME) as c:
        in_db = [r[0] for r in c.execute("SELECT id FROM passages ORDER BY id")]
    assert sorted(ix.index_ids(store._index).tolist()) == in_db


# ------------------------------------------------------------------ hostile entries
@pytest.mark.timeout(180)
def test_hostile_folder_reads_only_regular_files_and_says_why_for_the_rest(tmp_path, embedder):
    root, _ = hostile_folder(tmp_path)
    with DocumentStore(tmp_path / "store", embedder) as store:
        report = store.ingest(root, progress=False)
        why = reasons(report)
        assert "FIFO" in why["pipe.txt"]
        assert "out of the folder" in why["zero.txt"] and "/dev/zero" in why["zero.txt"]
        assert "loop" in why["loop.txt"]
        assert "dangling" in why["dangling.md"]
        assert "out of the folder" in why["escape.txt"] and "--follow-symlinks" in why["escape.txt"]
        assert "socket" in why["socket.txt"]
        assert "linked folders are not followed" in why["self"]
        if os.geteuid() == 0:
            assert "character device" in why["device.txt"]
        assert sources(store) == {"wifi.md", "dentist.txt", "car.md", "caf\\xe9-notes.txt"}
        assert len(report.added) == 4 and "wifi-again.md" not in why  # the inside link: read once
        hit = store.search("bike shed combination", k=1)[0]
        assert hit.source.endswith("caf\\xe9-notes.txt") and "5150" in hit.text
        assert store.delete(root / LATIN1_NAME) == 1  # the path as the shell passes it
        assert_consistent(store)


@pytest.mark.timeout(180)
def test_follow_symlinks_reads_files_outside_but_never_devices(tmp_path, embedder):
    root, outside = hostile_folder(tmp_path)
    with DocumentStore(tmp_path / "store", embedder) as store:
        report = store.ingest(root, progress=False, follow_symlinks=True)
        why = reasons(report)
        assert "character device" in why["zero.txt"] and "FIFO" in why["pipe.txt"]
        assert str(outside) in store.sources()
        assert "77" in store.search("safe deposit box number", k=1)[0].text


@pytest.mark.timeout(30)
def test_a_fifo_that_appears_after_the_listing_is_refused_at_once(tmp_path):
    os.mkfifo(tmp_path / "late.txt")  # read_document is what runs after the walk
    with pytest.raises(NotARegularFile, match="FIFO"):
        readers.read_document(tmp_path / "late.txt")
    with pytest.raises(NotARegularFile, match="character device"):
        readers.read_document(Path("/dev/zero"))


def test_size_cap_skips_with_the_reason_and_is_configurable(tmp_path, embedder):
    root = write_notes(tmp_path / "notes")
    (root / "big.txt").write_text("lorem ipsum " * 50_000)  # 600 kB
    with DocumentStore(tmp_path / "store", embedder) as store:
        report = store.ingest(root, progress=False, max_file_bytes=100_000)
        assert "over the 0.0953674 MiB cap" in reasons(report)["big.txt"]
        assert "--max-file-mb" in reasons(report)["big.txt"]
        assert "big.txt" not in sources(store) and len(report.added) == 3
        with pytest.raises(FileTooLarge):
            store.add_file(root / "big.txt", max_file_bytes=100_000)
    assert readers.DEFAULT_MAX_FILE_BYTES == 64 * 2**20


def test_streamed_passages_equal_chunk_words():
    rng = random.Random(7)
    spaces = [" ", "\t", "\n", "\r\n", "\u00a0", "\u2003", "\u3000", "\x1c", "\x0b"]
    words = ["a", "bé", "日本", "x1", "--", "ß"]
    for _ in range(300):
        text = "".join(rng.choice(words) + rng.choice(spaces) * rng.randint(1, 3) for _ in range(rng.randint(0, 300)))
        text = rng.choice(spaces) * rng.randint(0, 2) + text
        n = rng.choice([1, 3, 64])
        assert list(iter_passages(text, n)) == chunk_words(text, n)
        assert count_passages(text, n) == len(chunk_words(text, n))


# ------------------------------------------------------------------ large documents in chunks
def big_text(label: str, passages: int) -> str:
    return " ".join(f"{label} line {i} of the long travel diary, with words to fill a passage." for i in range(passages * 4))


_INGEST_CHUNKED = """
import sys
from dragon_edge.store import DocumentStore
store = DocumentStore(sys.argv[1])
store.large_text_chars, store.chunk_passages = 2000, 8
store.ingest(sys.argv[2], progress=False)
"""


def ingest_killed_at(store: Path, folder: Path, pause: str) -> None:
    """Run a chunked ingest in a subprocess and SIGKILL it when it reaches ``pause``."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", **{PAUSE_ENV: pause})
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    proc = subprocess.Popen([sys.executable, "-c", _INGEST_CHUNKED, str(store), str(folder)],
                            env=env, stderr=subprocess.PIPE, text=True)
    try:
        for line in proc.stderr:
            if line.startswith("DRAGON_STORE_PAUSED"):
                proc.send_signal(signal.SIGKILL)
                break
        else:
            pytest.fail(f"ingest exited (rc={proc.wait()}) before the pause point {pause}")
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL


class CountingEmbedder:
    """The real embedder, counting the passages it is asked to embed."""

    def __init__(self, inner) -> None:
        self.inner, self.embedded = inner, 0

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def embed(self, texts, **kw):
        self.embedded += len(texts)
        return self.inner.embed(texts, **kw)


@pytest.mark.timeout(400)
def test_large_file_commits_in_chunks_and_resumes_after_sigkill(tmp_path, embedder):
    root = write_notes(tmp_path / "notes")
    (root / "diary.txt").write_text(big_text("v1", 40))  # 35 passages: 5 chunks of 8 or fewer
    total = len(chunk_words((root / "diary.txt").read_text()))
    ingest_killed_at(tmp_path / "s", root, "chunk:3:120")  # killed after its 3rd chunk committed

    counting = CountingEmbedder(embedder)
    with DocumentStore(tmp_path / "s", counting) as store:
        store.large_text_chars, store.chunk_passages = 2000, 8
        stats = store.stats()
        assert (stats.staged_documents, stats.staged_passages) == (1, 24)  # the 3 chunks are kept
        assert "diary.txt" not in sources(store)  # never half a document in search
        assert "Alvarez" in store.search("dentist appointment", k=1)[0].text  # committed before it: kept
        report = store.ingest(root, progress=False)
        assert [Path(p).name for p in report.resumed] == ["diary.txt"]
        assert counting.embedded == (total - 24) + 2  # the diary's missing passages, then wifi.md, car.md
        assert store.stats().staged_passages == 0 and "diary.txt" in sources(store)
        assert_consistent(store)
    with DocumentStore(tmp_path / "fresh", embedder) as fresh:
        fresh.ingest(root, progress=False)
    assert db_content(tmp_path / "s") == db_content(tmp_path / "fresh")


@pytest.mark.timeout(400)
def test_changed_large_file_keeps_the_old_version_until_the_new_one_is_whole(tmp_path, embedder):
    root = write_notes(tmp_path / "notes")
    (root / "diary.txt").write_text(big_text("first", 24))
    with DocumentStore(tmp_path / "s", embedder) as store:
        store.large_text_chars, store.chunk_passages = 2000, 8
        store.ingest(root, progress=False)
    (root / "diary.txt").write_text(big_text("second", 24))
    ingest_killed_at(tmp_path / "s", root, "chunk:2:120")
    with DocumentStore(tmp_path / "s", embedder) as store:
        diary = [t for s, _, t in db_content(tmp_path / "s") if s.endswith("diary.txt")]
        assert diary and all("first" in t and "second" not in t for t in diary)  # old version whole
        assert store.stats().staged_passages == 16
        (root / "diary.txt").write_text(big_text("third", 24))  # changed again: starts over
        store.large_text_chars, store.chunk_passages = 2000, 8
        report = store.ingest(root, progress=False)
        assert report.resumed == [] and [Path(p).name for p in report.updated] == ["diary.txt"]
        diary = [t for s, _, t in db_content(tmp_path / "s") if s.endswith("diary.txt")]
        assert diary and all("third" in t and "second" not in t for t in diary)
        assert store.stats().staged_passages == 0
        assert_consistent(store)


def test_a_vanished_files_staged_chunks_are_dropped(tmp_path, embedder):
    root = write_notes(tmp_path / "notes")
    (root / "diary.txt").write_text(big_text("v1", 24))
    with DocumentStore(tmp_path / "s", embedder) as store:
        store.large_text_chars, store.chunk_passages = 2000, 8

        def interrupt(point):  # as if Ctrl-C arrived after the first chunk
            if point == "chunk":
                raise KeyboardInterrupt

        store._pause = interrupt
        with pytest.raises(KeyboardInterrupt):
            store.ingest(root, progress=False)
        assert store.stats().staged_passages == 8
        (root / "diary.txt").unlink()
        store._pause = lambda point: None
        store.ingest(root, progress=False)
        assert store.stats().staged_documents == 0


# ------------------------------------------------------------------ full disk
def test_sqlite_full_is_a_typed_error_and_search_still_works(tmp_path, embedder):
    """SQLite's own SQLITE_FULL (its page limit), on the real connection: no mock."""
    root = write_notes(tmp_path / "notes")
    more = write_notes(tmp_path / "more", {f"trip{i}.txt": big_text(f"trip{i}", 3) for i in range(6)})
    with DocumentStore(tmp_path / "s", embedder) as store:
        store.ingest(root, progress=False)
        pages = store._db.execute("PRAGMA page_count").fetchone()[0]
        store._db.execute(f"PRAGMA max_page_count = {pages + 4}")  # room for ~1 more file
        with pytest.raises(StoreFull, match="disk is full.*search still works"):
            store.ingest(more, progress=False)
        assert not store._db.in_transaction  # nothing left open to block later statements
        assert "tangerine-42" in store.search("wifi password", k=1)[0].text
        assert_consistent(store)
        store._db.execute("PRAGMA max_page_count = 1073741823")  # space freed
        report = store.ingest(more, progress=False)
        assert len(report.added) + len(report.unchanged) == 6
        assert_consistent(store)
    with DocumentStore(tmp_path / "fresh", embedder) as fresh:
        fresh.ingest(root, progress=False)
        fresh.ingest(more, progress=False)
    assert db_content(tmp_path / "s") == db_content(tmp_path / "fresh")


def test_enospc_on_the_index_file_is_a_warning_and_leaves_no_tmp(tmp_path, embedder, monkeypatch, caplog):
    """An injected ENOSPC at the file layer (the faiss cache's write)."""
    with DocumentStore(tmp_path / "s", embedder) as store:
        store.add_texts("The spare key is under the blue flowerpot.", source="key")

        def full(*_):
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(ix.os, "fsync", full)
        with caplog.at_level(logging.WARNING):
            store.add_texts("The boiler is serviced every October.", source="boiler")
        assert "index cache was not written" in caplog.text
        assert not list((tmp_path / "s").glob(f"{INDEX_NAME}.tmp-*"))
        assert store.search("when is the boiler serviced", k=1)[0].source == "boiler"
        monkeypatch.undo()
    with DocumentStore(tmp_path / "s", embedder) as store:
        assert store.recovered and "repaired" in store.recovered
        assert store.search("when is the boiler serviced", k=1)[0].source == "boiler"


_FULL_DISK = r"""
set -u
mount -t tmpfs -o size=512k tmpfs "$STORE_FS"
cli() { "$PY" -m dragon_edge.cli "$@"; }
cli ingest "$NOTES" --store "$STORE_FS/s" > "$OUT/ingest1.out" 2> "$OUT/ingest1.err"; echo $? > "$OUT/ingest1.rc"
cli search "dentist appointment" --store "$STORE_FS/s" -k 1 > "$OUT/search.out" 2> "$OUT/search.err"; echo $? > "$OUT/search.rc"
mount -o remount,size=64m "$STORE_FS"
cli ingest "$NOTES" --store "$STORE_FS/s" > "$OUT/ingest2.out" 2> "$OUT/ingest2.err"; echo $? > "$OUT/ingest2.rc"
cli search "trip9 travel diary" --store "$STORE_FS/s" -k 1 > "$OUT/search2.out" 2>&1
cp "$STORE_FS/s/store.sqlite3" "$OUT/"
"""


def _unshare_prefix() -> list[str]:
    """A private mount namespace (as root directly, else as a mapped root user)."""
    base = ["unshare", "--mount", "--propagation", "private"]
    return base if os.geteuid() == 0 else ["unshare", "--user", "--map-root-user", "--mount"]


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_real_full_disk_on_a_tiny_tmpfs(tmp_path, embedder):
    """A real ENOSPC: the store on a 512 kB tmpfs, the real CLI. The ingest fails with one line,
    search works while the disk is still full, and after the tmpfs grows the same ingest
    finishes and holds what a fresh ingest holds."""
    if shutil.which("unshare") is None or subprocess.run(
            [*_unshare_prefix(), "true"], capture_output=True).returncode != 0:
        pytest.skip("no mount namespace here (unshare refused): the SQLITE_FULL test above still runs")
    notes = write_notes(tmp_path / "notes", dict(NOTES, **{f"trip{i}.txt": big_text(f"trip{i}", 12) for i in range(10)}))
    out, fs = tmp_path / "out", tmp_path / "fs"
    out.mkdir()
    fs.mkdir()
    env = dict(os.environ, HF_HUB_OFFLINE="1", PY=sys.executable, NOTES=str(notes), STORE_FS=str(fs), OUT=str(out))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    subprocess.run([*_unshare_prefix(), "bash", "-c", _FULL_DISK], env=env, check=True, timeout=540)
    read = lambda name: (out / name).read_text()  # noqa: E731

    assert read("ingest1.rc").strip() == "1", read("ingest1.err")
    err = [line for line in read("ingest1.err").splitlines() if line.startswith("error:")]
    assert len(err) == 1 and "disk is full" in err[0], read("ingest1.err")
    assert "Traceback" not in read("ingest1.err")
    assert read("search.rc").strip() == "0", read("search.err")
    assert "dentist.txt" in read("search.out") and "Traceback" not in read("search.err")
    assert read("ingest2.rc").strip() == "0", read("ingest2.err")
    assert "trip9.txt" in read("search2.out")
    with DocumentStore(tmp_path / "fresh", embedder) as fresh:
        fresh.ingest(notes, progress=False)
    with sqlite3.connect(out / DB_NAME) as c:
        got = set(c.execute("SELECT s.source, p.ordinal, p.text FROM passages p JOIN sources s ON p.source_id = s.id"))
    assert got == db_content(tmp_path / "fresh")
