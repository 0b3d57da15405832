"""Ingest of a hostile folder (issue 11's goal): names, FIFOs, devices, loops, a 50 MB file, a full disk.

Everything runs through the real ``dragon-edge`` CLI in subprocesses, killed with a real SIGKILL:

1. **hostile**: a folder of notes plus undecodable / newline / 255-byte / dash names, a FIFO and
   a character device named ``.txt``, a socket, a ``.txt`` link to ``/dev/zero``, link loops (a
   file and a folder), a link out of the folder, a dangling link, a binary ``.txt`` and a 50 MB
   text file. The ingest is SIGKILLed ``--run-s`` seconds after the 50 MB file's first chunk
   commits; recorded: what was kept, every skipped entry with its logged reason, the staged
   passages, throughput, the ingest's peak memory.
2. **resume**: the same command again, SIGKILLed after as long: nothing staged before is lost,
   the staged passages are exactly the file's first passages, and it went on from there.
   Embedding all of the 50 MB file takes far longer than a benchmark on 2 shared cores should
   (the projection is recorded), so completion is shown on a smaller large file:
3. **complete**: a ~256 kB file, SIGKILLed mid-way, resumed to the end; its passages equal
   ``chunk_words`` of the file in order and a sample of vectors equals a fresh embedding.
4. **full_disk**: the store on a 1 MB tmpfs in a private mount namespace (``unshare``): the ingest
   fails with one line, ``search`` works while the disk is still full, and after the tmpfs
   grows the same ingest finishes with every document.

Run: ``python -m benchmarks.bench_ingest_hostile [--run-s 45] [--big-mb 50]``; writes
``benchmarks/results/ingest_hostile.json``. About 5 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import importlib.metadata as md
import json
import os
import platform
import random
import re
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
NOTES = {
    "wifi.md": "The home wifi password is tangerine-42. The router sits in the hallway closet.",
    "dentist.txt": "My dentist appointment is on Tuesday at 3pm with Dr. Alvarez on Elm Street.",
    "sub/car.md": "The car's next oil change is due at 92,000 kilometres; the mechanic is Jorge's garage.",
}
ODD_NAMES = {  # file name (bytes) -> text
    b"caf\xe9-latin1.txt": "The bike shed combination is 5150.",
    b"line\nbreak.md": "The spare key is under the blue flowerpot.",
    b"-rf.txt": "A note whose name starts with a dash: the attic is full of boxes.",
    b"x" * 251 + b".txt": "A note with a 255-byte name: the boiler is serviced in October.",
    "émoji 🌻 note.md".encode(): "Sunflowers grow fastest in July.",
}


# ------------------------------------------------------------------ the folder
def words_text(n_bytes: int, seed: int) -> str:
    """Plain prose-like text of about ``n_bytes`` (random words from a fixed vocabulary)."""
    rng = random.Random(seed)
    vocab = ("the a of river mountain letter garden winter summer city train bridge market evening "
             "morning window kitchen story travel journey friend house light road sea island").split()
    words, size = [], 0
    while size < n_bytes:
        w = rng.choice(vocab)
        words.append(w)
        size += len(w) + 1
    return " ".join(words)


def build_hostile(root: Path, outside: Path, big_mb: float) -> dict:
    """Make the folder; return what each entry is, for the record."""
    for name, text in NOTES.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    for name, text in ODD_NAMES.items():
        with open(os.path.join(os.fsencode(root), name), "w") as f:
            f.write(text)
    outside.write_text("The safe deposit box is number 77 at the harbour branch.")
    (root / "binary.txt").write_bytes(b"\x7fELF\x00\x01" * 100)
    os.mkfifo(root / "pipe.txt")
    (root / "zero.txt").symlink_to("/dev/zero")
    (root / "loop.txt").symlink_to(root / "loop.txt")
    (root / "self").symlink_to(root)
    (root / "escape.txt").symlink_to(outside)
    (root / "dangling.md").symlink_to(root / "gone.md")
    _make_socket(root, "socket.txt")
    device = _make_device(root / "device.txt")
    big = root / "zz-archive" / "big.txt"  # walked last, so the notes are in before it starts
    big.parent.mkdir()
    big.write_text(words_text(int(big_mb * 2**20), seed=1))
    return dict(notes=len(NOTES) + len(ODD_NAMES), big_file_bytes=big.stat().st_size, device_node=device,
                entries_at_top=len(os.listdir(root)))


def _make_socket(root: Path, name: str) -> None:
    here = os.getcwd()
    os.chdir(root)  # socket paths are limited to 108 bytes: bind by a relative name
    try:
        with socket.socket(socket.AF_UNIX) as sock:
            sock.bind(name)
    finally:
        os.chdir(here)


def _make_device(path: Path) -> str:
    try:
        os.mknod(path, 0o600 | 0o020000, os.makedev(1, 5))  # a character device like /dev/zero
        return "character device 1:5 (a copy of /dev/zero)"
    except PermissionError:
        return "not made (mknod needs root)"


# ------------------------------------------------------------------ running the CLI
def cli_env() -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return env


def cli(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dragon_edge.cli", *args], capture_output=True, text=True,
                          env=cli_env(), timeout=timeout, stdin=subprocess.DEVNULL)


def staged(store: Path) -> int:
    """Staged passages, read from the database by a read-only connection (as another process would)."""
    db = store / "store.sqlite3"
    if not db.exists():
        return 0
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5) as c:
            return c.execute("SELECT COUNT(*) FROM staged_passages").fetchone()[0]
    except sqlite3.Error:
        return 0  # schema not there yet


def ingest_then_kill(store: Path, folder: Path, run_s: float, log: Path) -> dict:
    """Start an ingest, wait until the large file's first chunk is committed, let it run
    ``run_s`` more seconds, then SIGKILL it. Returns timings, progress and peak memory."""
    t0 = time.monotonic()
    with open(log, "w") as err:
        proc = subprocess.Popen([sys.executable, "-m", "dragon_edge.cli", "ingest", str(folder), "--store", str(store),
                                 "-v"], stdout=subprocess.DEVNULL, stderr=err, env=cli_env())
        start = staged(store)
        while staged(store) <= start and proc.poll() is None:
            time.sleep(0.5)
        first_chunk_s = time.monotonic() - t0
        commits = _watch_commits(store, proc, run_s)
        peak_kb = _peak_rss_kb(proc.pid) if proc.poll() is None else 0
        last = staged(store)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    (t_a, n_a), (t_b, n_b) = commits[0], commits[-1]
    return dict(rc=proc.returncode, staged_before=start, first_chunk_after_s=round(first_chunk_s, 1),
                staged_at_kill=last, chunks_committed_while_watched=len(commits) - 1,
                passages_per_s=round((n_b - n_a) / (t_b - t_a), 1) if t_b > t_a else None,
                peak_rss_mb=round(peak_kb / 1024, 1), wall_s=round(time.monotonic() - t0, 1))


def _watch_commits(store: Path, proc: subprocess.Popen, seconds: float) -> list[tuple[float, int]]:
    """(time, staged passages) at each chunk commit seen in ``seconds``: the embedding rate is
    measured between commits, not diluted by the half-finished chunk at the kill."""
    seen, end = [(time.monotonic(), staged(store))], time.monotonic() + seconds
    while time.monotonic() < end and proc.poll() is None:
        time.sleep(0.25)
        n = staged(store)
        if n != seen[-1][1]:
            seen.append((time.monotonic(), n))
    return seen


def _peak_rss_kb(pid: int) -> int:
    text = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmHWM:\s+(\d+)", text).group(1))


def skipped_reasons(log: Path) -> dict[str, str]:
    """The reasons the ingest logged, by entry name (``skipped PATH: why``)."""
    out = {}
    for line in log.read_text(errors="replace").splitlines():
        m = re.search(r"INFO dragon_edge\.store\.document_store: skipped (.*?): (.*)$", line)
        if m:
            out[m.group(1).rsplit("/", 1)[-1]] = m.group(2)
    return out


def store_sources(store: Path) -> list[str]:
    with sqlite3.connect(f"file:{store / 'store.sqlite3'}?mode=ro", uri=True) as c:
        return sorted(r[0].rsplit("/", 1)[-1] for r in c.execute("SELECT source FROM sources"))


# ------------------------------------------------------------------ phases
def phase_hostile_and_resume(work: Path, run_s: float, big_mb: float) -> dict:
    from dragon_core.retrieval import DEFAULT_PASSAGE_WORDS
    from dragon_edge.store.passages import count_passages, iter_passages

    folder, store = work / "hostile", work / "store"
    folder.mkdir()
    built = build_hostile(folder, work / "outside.txt", big_mb)
    first = ingest_then_kill(store, folder, run_s, work / "run1.log")
    second = ingest_then_kill(store, folder, run_s, work / "run2.log")
    text = (folder / "zz-archive" / "big.txt").read_text()
    total = count_passages(text, DEFAULT_PASSAGE_WORDS)
    expected = list(_take(iter_passages(text, DEFAULT_PASSAGE_WORDS), second["staged_at_kill"]))
    with sqlite3.connect(store / "store.sqlite3") as c:
        got = [r[0] for r in c.execute("SELECT text FROM staged_passages ORDER BY ordinal")]
    rate = second["passages_per_s"] or first["passages_per_s"]
    return dict(
        folder=built, kept=store_sources(store), skipped=skipped_reasons(work / "run1.log"),
        run1=first, run2=second, big_file_passages=total,
        resume_lost_nothing=second["staged_before"] >= first["staged_at_kill"],
        resume_went_on=second["staged_at_kill"] > second["staged_before"],
        staged_equal_the_files_first_passages=got == expected,
        projected_full_embed_min=round(total / rate / 60, 1) if rate else None,
        log_says_resuming=("resuming at passage" in (work / "run2.log").read_text()),
    )


def _take(it, n: int):
    for i, x in enumerate(it):
        if i >= n:
            return
        yield x


def phase_complete(work: Path) -> dict:
    """A ~256 kB file: killed mid-way, resumed to the end, checked against a fresh embedding."""
    import numpy as np

    from dragon_core.retrieval import chunk_words
    from dragon_host.embedder import default_embedder

    folder, store = work / "mid", work / "store-mid"
    folder.mkdir()
    (folder / "diary.txt").write_text(words_text(256 * 1024, seed=2))
    killed = ingest_then_kill(store, folder, 6.0, work / "mid1.log")
    t0 = time.monotonic()
    resumed = cli("ingest", str(folder), "--store", str(store))
    passages = chunk_words((folder / "diary.txt").read_text())
    with sqlite3.connect(store / "store.sqlite3") as c:
        rows = c.execute("SELECT p.ordinal, p.text, p.vector FROM passages p ORDER BY p.ordinal").fetchall()
        left = c.execute("SELECT COUNT(*) FROM staged_passages").fetchone()[0]
    sample = random.Random(0).sample(range(len(rows)), 20)
    fresh = default_embedder().embed([passages[i] for i in sample])
    stored = np.stack([np.frombuffer(rows[i][2], dtype="<f4") for i in sample])
    return dict(passages=len(passages), killed_at=killed["staged_at_kill"], resume_rc=resumed.returncode,
                resume_s=round(time.monotonic() - t0, 1), resume_summary=resumed.stdout.splitlines()[:1],
                texts_equal_chunk_words=[r[1] for r in rows] == passages and [r[0] for r in rows] == list(range(len(rows))),
                sample_vectors_max_abs_diff=float(np.abs(stored - fresh).max()), staged_left=left)


_FULL_DISK = r"""
mount -t tmpfs -o size=1m tmpfs "$FS" || exit 97
cli() { "$PY" -m dragon_edge.cli "$@"; }
cli ingest "$NOTES" --store "$FS/s" > "$OUT/i1.out" 2> "$OUT/i1.err"; echo $? > "$OUT/i1.rc"
df -k "$FS" | tail -1 > "$OUT/df"
cli search "dentist appointment" --store "$FS/s" -k 1 > "$OUT/s1.out" 2> "$OUT/s1.err"; echo $? > "$OUT/s1.rc"
mount -o remount,size=64m "$FS"
cli ingest "$NOTES" --store "$FS/s" > "$OUT/i2.out" 2> "$OUT/i2.err"; echo $? > "$OUT/i2.rc"
"""


def phase_full_disk(work: Path) -> dict:
    folder, fs, out = work / "disk-notes", work / "fs", work / "disk-out"
    for d in (folder, fs, out):
        d.mkdir()
    for name, text in NOTES.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(text)
    for i in range(20):
        (folder / f"trip{i:02d}.txt").write_text(words_text(6000, seed=10 + i))
    prefix = ["unshare", "--mount", "--propagation", "private"] if os.geteuid() == 0 else \
        ["unshare", "--user", "--map-root-user", "--mount"]
    env = dict(cli_env(), PY=sys.executable, NOTES=str(folder), FS=str(fs), OUT=str(out))
    done = subprocess.run([*prefix, "bash", "-c", _FULL_DISK], env=env, capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        return dict(ran=False, why=(done.stderr or f"rc {done.returncode}")[-300:])
    read = lambda name: (out / name).read_text()  # noqa: E731
    errors = [ln for ln in read("i1.err").splitlines() if ln.startswith("error:")]
    return dict(ran=True, how="real ENOSPC: store on a 1 MB tmpfs in a private mount namespace",
                ingest_rc=int(read("i1.rc")), ingest_error_lines=errors,
                traceback_printed="Traceback" in read("i1.err"), df_after=read("df").split(),
                search_while_full_rc=int(read("s1.rc")), search_found=read("s1.out").strip()[:120],
                resume_after_space_rc=int(read("i2.rc")), resume_summary=read("i2.out").splitlines())


# ------------------------------------------------------------------ the run
def environment() -> dict:
    env = dict(cpu_count=os.cpu_count(), affinity=len(os.sched_getaffinity(0)), machine=platform.machine(),
               python=platform.python_version(), platform=platform.platform(), loadavg_at_start=os.getloadavg(),
               euid=os.geteuid())
    for dist in ("torch", "sentence-transformers", "faiss-cpu", "tqdm"):
        try:
            env[dist] = md.version(dist)
        except md.PackageNotFoundError:
            pass
    commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    env["commit"] = commit.stdout.strip()
    return env


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run-s", type=float, default=45.0, help="Seconds each killed run ingests the big file.")
    ap.add_argument("--big-mb", type=float, default=50.0, help="Size of the large text file (MiB).")
    ap.add_argument("--out", type=Path, default=RESULTS / "ingest_hostile.json")
    args = ap.parse_args(argv)
    result = dict(benchmark="ingest_hostile", environment=environment(), flags=dict(run_s=args.run_s, big_mb=args.big_mb))
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="dragon-hostile-") as tmp:
        work = Path(tmp)
        for name, phase in (("hostile", lambda: phase_hostile_and_resume(work, args.run_s, args.big_mb)),
                            ("complete", lambda: phase_complete(work)), ("full_disk", lambda: phase_full_disk(work))):
            t = time.monotonic()
            result[name] = phase()
            result[name]["phase_s"] = round(time.monotonic() - t, 1)
            print(f"== {name}: {json.dumps(result[name], ensure_ascii=False)[:600]}", flush=True)
        shutil.rmtree(work, ignore_errors=True)
    result["total_s"] = round(time.monotonic() - t0, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    print(f"wrote {args.out} ({result['total_s']} s)")
    return result


if __name__ == "__main__":
    main()
