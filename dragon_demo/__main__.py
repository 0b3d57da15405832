"""``make demo`` / ``python -m dragon_demo``: DRAGON end to end on loopback with the real SmolLM2 model.

Starts ``dragon-cloud serve`` (vLLM) in its own process over a small public corpus written for
the demo, builds a private store from a few personal notes (they never leave this process),
asks a question that needs both, and prints the answer, where each fact came from and
DRAGON's stats. Everything is shut down cleanly at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path

from dragon_demo.ask import ask
from dragon_demo.procs import start_cloud, stop, wait_healthy
from dragon_demo.world import QUESTION, build_private_store, build_public_index


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m dragon_demo", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
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
