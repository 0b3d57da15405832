"""``make demo``: DRAGON end to end on loopback with the real SmolLM2 model.

Starts ``dragon-cloud serve`` (vLLM) in its own process over a small public corpus written for
the demo, builds a private store from a few personal notes (they never leave this process),
asks a question that needs both, and prints the answer, where each fact came from and
DRAGON's stats. Everything is shut down cleanly at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

PUBLIC_CORPUS = {
    "lyon.txt": "Lyon is a city in France. Lyon is the capital of the Auvergne-Rhone-Alpes region. "
                "Lyon is famous for its food, its silk history and the Festival of Lights held every December.",
    "paris.txt": "Paris is the capital of France. The Eiffel Tower in Paris was completed in 1889 "
                 "for the World's Fair.",
    "rome.txt": "Rome is the capital of Italy. The Colosseum in Rome is an ancient amphitheatre.",
    "berlin.txt": "Berlin is the capital of Germany. The Berlin Wall fell in 1989.",
}
PRIVATE_NOTES = {
    "family.md": "My sister Lena moved to Lyon last spring. She works as a nurse at a hospital there.",
    "dentist.md": "Dentist appointment with Dr. Alvarez on Thursday at 10am. Bring the insurance card.",
    "wifi.md": "The home wifi password is plum-tiger-42. The router is in the hallway closet.",
}
QUESTION = "Where does my sister Lena live, and what is that city famous for?"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url: str, proc: subprocess.Popen, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the cloud exited during start-up (code {proc.returncode})")
        try:
            with urllib.request.urlopen(url + "/health", timeout=1) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"the cloud did not become healthy within {timeout_s:.0f} s")


def start_cloud(index_dir: Path, token: str, log_path: Path, extra_args: tuple[str, ...] = (), port: int = 0,
                timeout_s: float = 120.0) -> tuple[subprocess.Popen, int]:
    """Spawn ``dragon-cloud serve``; returns the process and the port it bound (``port=0``: a
    free one, bound by the server itself before its model loads, so no other process can take
    it in between). ``wait_healthy`` then waits for the model."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", VLLM_CPU_KVCACHE_SPACE=os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"),
               DRAGON_TOKEN=token)
    port_file = log_path.with_suffix(".port")
    port_file.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "dragon_vllm.cli", "serve", "--index", str(index_dir), "--port", str(port),
           "--port-file", str(port_file), "--max-num-seqs", "32", "--max-model-len", "1024", *extra_args]
    proc = subprocess.Popen(cmd, env=env, stdout=log_path.open("w"), stderr=subprocess.STDOUT,
                            start_new_session=True)
    deadline = time.monotonic() + timeout_s
    while not (port_file.exists() and port_file.read_text().endswith("\n")):
        if proc.poll() is not None or time.monotonic() > deadline:
            stop(proc)
            raise RuntimeError(f"the cloud did not bind a port (exit {proc.returncode}); see {log_path}:\n"
                               + log_path.read_text()[-2000:])
        time.sleep(0.05)
    return proc, int(port_file.read_text())


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


async def ask(cloud_url: str, store_dir: Path, token: str, question: str, max_tokens: int) -> dict:
    from dragon_edge.sdk import AsyncDragonClient

    async with AsyncDragonClient(cloud_url=cloud_url, store=store_dir, auth_token=token) as client:
        reply = await client.chat.completions.create(
            messages=[{"role": "user", "content": question}], max_tokens=max_tokens, k=2, cloud_k=2)
    return {"answer": reply.choices[0].message.content, "dragon": reply.dragon}


def _write(folder: Path, files: dict[str, str]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (folder / name).write_text(text + "\n")
    return folder


def build_public_index(root: Path):
    """The cloud's side of the demo: ``PUBLIC_CORPUS`` indexed under ``root/index``."""
    from dragon_vllm.corpus import PublicIndex

    public = _write(root / "public", PUBLIC_CORPUS)
    return PublicIndex.build(sorted(public.glob("*.txt")), root / "index", progress=False, overwrite=True)


def build_private_store(root: Path):
    """The device's side of the demo: ``PRIVATE_NOTES`` ingested into ``root/store``."""
    from dragon_edge.store import DocumentStore

    store = DocumentStore(root / "store")
    store.ingest(_write(root / "notes", PRIVATE_NOTES), progress=False)
    return store


def build_demo_world(root: Path):
    """Both sides of the demo under ``root`` (used by the demo, the e2e tests and benchmarks):
    returns ``(public index, private store)``; the cloud serves ``root/index``."""
    return build_public_index(root), build_private_store(root)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--question", default=QUESTION)
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--workdir", type=Path, default=None, help="keep the demo's files here (default: a temp dir)")
    args = ap.parse_args(argv)
    from dragon_edge.cli import format_stats

    with tempfile.TemporaryDirectory(prefix="dragon-demo-") as tmp:
        work = args.workdir or Path(tmp)
        t0 = time.monotonic()
        print("[1/4] building the cloud's public index ...", flush=True)
        build_public_index(work)
        print("[2/4] ingesting the device's private notes ...", flush=True)
        build_private_store(work)
        token = "demo-token"
        cloud, port = start_cloud(work / "index", token, work / "cloud.log")
        url = f"http://127.0.0.1:{port}"
        print(f"[3/4] starting the cloud (vLLM) on {url} ...", flush=True)
        try:
            wait_healthy(url, cloud, timeout_s=300)
            print(f"[4/4] asking: {args.question}", flush=True)
            result = asyncio.run(ask(url, work / "store", token, args.question, args.max_tokens))
        except BaseException:
            print((work / "cloud.log").read_text()[-3000:], file=sys.stderr)
            raise
        finally:
            stop(cloud)
        print("\nANSWER:", result["answer"].strip())
        print(format_stats(result["dragon"]))
        print(f"\n(demo finished in {time.monotonic() - t0:.1f} s; cloud stopped cleanly, exit "
              f"{cloud.returncode})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
