"""The device on its own: the OpenAI-shaped SDK and the `dragon-edge` CLI, with the real SmolLM2
model through llama.cpp and a real private store (device-only: no cloud)."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dragon_demo import PRIVATE_NOTES

pytestmark = pytest.mark.slow

NOTES = dict(PRIVATE_NOTES, **{
    "bike.md": "My bicycle lock combination is 7314. The bike is parked behind the bakery.",
})


@pytest.fixture(scope="module")
def notes(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("notes")
    for name, text in NOTES.items():
        (folder / name).write_text(text + "\n")
    return folder


@pytest.fixture(scope="module")
def store_dir(tmp_path_factory, notes, smollm2) -> Path:
    from dragon_edge.store import DocumentStore

    path = tmp_path_factory.mktemp("store") / "store"
    DocumentStore(path).ingest(notes, progress=False)
    return path


def test_sdk_device_only_answer_contains_a_fact_only_in_the_private_notes(store_dir):
    from dragon_edge import sdk

    with sdk.DragonClient(store=store_dir) as client:
        reply = client.chat.completions.create(
            messages=[{"role": "user", "content": "Where does my sister Lena live?"}], max_tokens=32)
        hits = client.documents.search("bicycle lock", k=1)
    answer = reply.choices[0].message.content
    assert "Lyon" in answer, answer  # only the private note family.md says so
    stats = reply.dragon
    assert stats["device_only"] and not stats["degraded"] and stats["tokens"] >= 1
    assert stats["bytes_sent"] == stats["bytes_received"] == 0  # nothing left the device
    assert hits[0].source.endswith("bike.md")


def test_async_sdk_streams_the_same_text(store_dir):
    from dragon_edge.sdk import AsyncDragonClient

    async def main():
        async with AsyncDragonClient(store=store_dir) as client:
            msgs = [{"role": "user", "content": "Where is the router?"}]
            whole = await client.chat.completions.create(messages=msgs, max_tokens=24)
            stream = await client.chat.completions.create(messages=msgs, max_tokens=24, stream=True)
            pieces = [c async for c in stream]
        return whole, pieces

    whole, pieces = asyncio.run(main())
    assert "".join(p.choices[0].delta.content or "" for p in pieces) == whole.choices[0].message.content
    assert pieces[-1].choices[0].finish_reason in ("stop", "length")
    assert "dragon" in pieces[-1].model_extra


def test_sdk_cloud_unreachable_answers_degraded(store_dir):
    from dragon_edge import sdk

    with sdk.DragonClient(cloud_url="http://127.0.0.1:9", store=store_dir) as client:
        reply = client.chat.completions.create(
            messages=[{"role": "user", "content": "What is my bicycle lock combination?"}], max_tokens=16)
    assert reply.dragon["degraded"] and reply.choices[0].message.content


def _cli(*args: str, env_extra: dict | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", **(env_extra or {}))
    return subprocess.run([sys.executable, "-m", "dragon_edge.cli", *args], capture_output=True, text=True,
                          timeout=600, env=env, stdin=subprocess.DEVNULL)  # never a terminal: no prompt waits


def test_cli_help_ingest_search_ask(tmp_path, notes):
    help_ = _cli("--help")
    assert help_.returncode == 0 and "ingest" in help_.stdout and "ask" in help_.stdout
    store = str(tmp_path / "store")
    ing = _cli("ingest", str(notes), "--store", store)
    assert ing.returncode == 0, ing.stderr
    found = _cli("search", "wifi password", "--store", store, "-k", "1")
    assert found.returncode == 0 and "wifi.md" in found.stdout
    ans = _cli("ask", "What is the home wifi password?", "--store", store, "-n", "24")
    assert ans.returncode == 0, ans.stderr
    assert "plum-tiger-42" in ans.stdout.replace(" ", ""), ans.stdout
    assert "device-only" in ans.stderr  # the stats line says where it ran


def test_cli_errors_are_clear(tmp_path):
    missing = _cli("search", "x", "--store", str(tmp_path / "nope"))
    assert missing.returncode != 0
    assert "nope" in (missing.stderr + missing.stdout)


def test_cli_errors_are_one_line_and_debug_shows_the_traceback(tmp_path):
    missing = _cli("search", "x", "--store", str(tmp_path / "nope"))
    assert missing.returncode == 1 and missing.stdout == ""
    assert missing.stderr.splitlines() == [f"error: no document store at {tmp_path / 'nope'}"]
    for debug in (_cli("search", "x", "--store", str(tmp_path / "nope"), "--debug"),
                  _cli("search", "x", "--store", str(tmp_path / "nope"), env_extra={"DRAGON_DEBUG": "1"})):
        assert debug.returncode == 1 and "StoreNotFound" in debug.stderr
        assert len(debug.stderr.splitlines()) > 5  # the whole traceback
    empty = tmp_path / "empty"
    empty.mkdir()
    nothing = _cli("ingest", str(empty), "--store", str(tmp_path / "s"))
    assert nothing.returncode == 1 and [ln for ln in nothing.stderr.splitlines() if "error" in ln] == [
        f"error: {empty}: no documents to ingest (.markdown, .md, .pdf, .txt); 0 other files"]
    assert "Traceback" not in nothing.stderr


@pytest.mark.timeout(300)
def test_cli_ingest_of_a_hostile_folder_lists_what_it_skipped(tmp_path, notes):
    folder = tmp_path / "hostile"
    folder.mkdir()
    (folder / "note.md").write_text("The attic key hangs behind the calendar.")
    (folder / "big.txt").write_text("lorem ipsum " * 100_000)  # 1.1 MiB
    os.mkfifo(folder / "pipe.txt")
    (folder / "zero.txt").symlink_to("/dev/zero")
    (folder / "loop.md").symlink_to(folder / "loop.md")
    (folder / os.fsdecode(b"r\xe9sum\xe9.txt")).write_text("The CV lists five years at the bakery.")
    out = _cli("ingest", str(folder), "--store", str(tmp_path / "s"), "--max-file-mb", "1")
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("added 2, updated 0, unchanged 0, removed 0, skipped 4;")
    lines = out.stdout.splitlines()
    assert f"skipped {folder}/pipe.txt: a FIFO (named pipe), not a regular file" in lines
    assert f"skipped {folder}/loop.md: a symbolic link loop" in lines
    assert any(ln.startswith(f"skipped {folder}/zero.txt: a symbolic link out of the folder") for ln in lines)
    assert any(ln.startswith(f"skipped {folder}/big.txt: 1.1 MiB, over the 1 MiB cap") for ln in lines)
    found = _cli("search", "bakery CV", "--store", str(tmp_path / "s"), "-k", "1")
    assert "r\\xe9sum\\xe9.txt" in found.stdout  # the undecodable name, printable
    bad = _cli("ingest", str(folder), "--store", str(tmp_path / "s"), "--max-file-mb", "0")
    assert bad.returncode == 2 and "--max-file-mb" in bad.stderr


def test_cli_delete_asks_for_a_folder_and_needs_all_to_empty_the_store(tmp_path, notes):
    import shutil

    from dragon_edge.store import DocumentStore

    folder = tmp_path / "mine"
    shutil.copytree(notes, folder)
    (folder / "trips").mkdir()
    (folder / "trips" / "rome.md").write_text("Rome in May: the hotel is near Campo de' Fiori.")
    (folder / "trips" / "oslo.md").write_text("Oslo in June: the ferry leaves at 8.")
    store = tmp_path / "store"
    with DocumentStore(store) as st:
        st.ingest(folder, progress=False)
        before = st.sources()

    def run(*args):
        return _cli("delete", *args, "--store", str(store))

    def remaining():
        with DocumentStore(store) as st:
            return st.sources()

    everything = run("/")  # used to empty the store without a word
    assert everything.returncode == 1 and "dragon-edge delete --all" in everything.stderr
    assert len(everything.stderr.splitlines()) == 1 and remaining() == before
    asked = run(str(folder / "trips"))  # a folder, not a source, and no terminal to ask on
    assert asked.returncode == 2 and "holding 2 sources" in asked.stderr and "--yes" in asked.stderr
    assert remaining() == before
    yes = run(str(folder / "trips"), "--yes")
    assert yes.returncode == 0 and yes.stdout.startswith("deleted 2 sources (2 passages)")
    one = run(str(folder / "bike.md"))  # a source: no question
    assert one.returncode == 0 and one.stdout.startswith("deleted 1 source (1 passages)")
    unknown = run("no-such-note")
    assert unknown.returncode == 1 and unknown.stderr.startswith("error: no source no-such-note")
    left = remaining()
    assert len(left) == len(before) - 3
    both = run(str(folder), "--all")
    assert both.returncode == 2 and "or --all" in both.stderr and remaining() == left
    assert run("--all").returncode == 0 and remaining() == []


def test_modes_pass_through_the_sdk_and_the_cli_and_unknown_ones_are_typed(store_dir):
    import json

    from dragon_edge.baselines import ANSWER_MODES, UnknownMode
    from dragon_edge.sdk import answer_options

    for mode in ANSWER_MODES:
        assert answer_options(None, None, None, None, {"mode": mode}).mode == mode
    with pytest.raises(UnknownMode, match="dragon | vdrag | sw | cloud | text | device"):
        answer_options(None, None, None, None, {"mode": "drcg"})
    help_ = _cli("ask", "--help")
    assert all(word in help_.stdout for word in ("cloud-only", "DRCG/Text", "device-only"))
    bad = _cli("ask", "x", "--mode", "drcg", "--store", str(store_dir))
    assert bad.returncode != 0 and "unknown mode 'drcg'" in bad.stdout + bad.stderr
    ans = _cli("ask", "What is the home wifi password?", "--store", str(store_dir), "-n", "8", "--mode", "device",
               "--json")
    assert ans.returncode == 0, ans.stderr
    stats = json.loads(ans.stdout)["dragon"]
    assert stats["mode"] == "device" and stats["device_only"] and not stats["degraded"]
