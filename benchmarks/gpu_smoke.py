"""Smoke test of the whole system on the GPU machine (vLLM 0.26): the model converted there, its
fingerprints equal to the GGUF's, ``dragon-cloud serve`` started on the GPU, and a device
(llama.cpp on the CPU) answering the demo question through the real link with the cloud.

Run there after staging (../shared/gpu/README.md, ``prepare.sh --models --server``):

    python -m benchmarks.gpu_smoke --out $OUT/gpu_smoke.json

Writes one JSON record (versions, GPU, fingerprints, special tokens, the answer and its DRAGON
stats, the cloud log's tail on failure) and exits non-zero if any step failed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import sys
import tempfile
import time
import traceback
from pathlib import Path


def versions() -> dict:
    import torch
    import transformers
    import vllm

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"python": platform.python_version(), "vllm": vllm.__version__, "torch": torch.__version__,
            "transformers": transformers.__version__, "gpu": gpu}


def model_checks() -> dict:
    from dragon_host import models
    from dragon_host.models.fingerprint import gguf_tokenizer, hf_tokenizer

    spec = models.get_model("smollm2-135m")
    folder = models.prepare("smollm2-135m")
    gguf, hf = models.fingerprints("smollm2-135m", "gguf"), models.fingerprints("smollm2-135m", "hf")
    meta = models.read_gguf_metadata(spec.gguf_path())
    return {"folder": str(folder), "gguf": gguf.__dict__, "hf": hf.__dict__, "equal": gguf == hf,
            "special_gguf": gguf_tokenizer(meta)["special"], "special_hf": hf_tokenizer(folder)["special"]}


def demo_answer(work: Path) -> dict:
    from dragon_demo import QUESTION, ask, build_demo_world, start_cloud, stop, wait_healthy

    build_demo_world(work)
    token = "gpu-smoke"
    t0 = time.monotonic()
    cloud, port = start_cloud(work / "index", token, work / "cloud.log")
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, cloud, timeout_s=600)
        ready_s = time.monotonic() - t0
        answers = [asyncio.run(ask(url, work / "store", token, QUESTION, 32)) for _ in range(2)]
    finally:
        stop(cloud)
    last = answers[-1]
    return {"cloud_ready_s": round(ready_s, 1), "answer": last["answer"], "dragon": last["dragon"],
            "first_ttft_s": answers[0]["dragon"].get("ttft_s"), "cloud_exit": cloud.returncode}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True, help="JSON file to write")
    args = ap.parse_args(argv)
    record: dict = {"when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    ok = True
    with tempfile.TemporaryDirectory(prefix="dragon-gpu-smoke-") as tmp:
        for name, step in (("versions", versions), ("model", model_checks), ("demo", lambda: demo_answer(Path(tmp)))):
            try:
                record[name] = step()
            except Exception:  # record the failure and go on: the JSON says what broke
                ok = False
                record[name] = {"error": traceback.format_exc()[-3000:]}
                log = Path(tmp) / "cloud.log"
                if name == "demo" and log.exists():
                    record[name]["cloud_log_tail"] = log.read_text()[-6000:]
    demo = record.get("demo", {})
    ok = ok and record["model"].get("equal") and "answer" in demo and not demo["dragon"].get("degraded") \
        and not demo["dragon"].get("device_only")
    record["ok"] = bool(ok)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2, default=str) + "\n")
    print(json.dumps(record, indent=2, default=str)[-4000:])
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
