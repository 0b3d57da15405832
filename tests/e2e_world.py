"""The end-to-end world every e2e test file shares: one real ``dragon-cloud serve`` process
(vLLM, SmolLM2, the demo's public index), the device runtime (llama.cpp over the demo's private
notes), netem proxies at RTT 0 / 50 / 300 ms, and the cloud's engine loaded in this process as
the centralized reference. Session-scoped, so the suite pays for one cloud start-up, not one
per file; ``conftest.py`` re-exports the fixtures.

A test that kills the cloud is marked ``kills_shared_cloud`` and runs after every other test
(conftest.py), so no test needs it restarted.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from subprocess import Popen

import pytest

from benchmarks.netem import Shape, spawn_proxy, stop_proxy
from dragon_core import messages as m
from dragon_core import session as s
from dragon_core.testing.reference import centralized_generate
from dragon_core.prompt import passage_prompts
from dragon_edge.link import CloudLink
from dragon_edge.runtime import AnswerOptions

TOKEN = "e2e-token"
QUESTION = "Where does my sister Lena live, and what is that city famous for?"
# The private note dominates the first question (its score is ~3.7 above Lyon's, so the public
# passages weigh ~2% and DRCG/Text answers as device-only does); the second needs the public text.
PUBLIC_QUESTION = "What is Lyon famous for?"
# For tests that act while an answer is still being decoded (a cut, a disconnect): SmolLM2-135M
# answers it up to the token limit (60 tokens, no EOS) with the KV-block padding in each place
# dragon_core.prompt has used and unpadded, device-only and DRAGON alike. QUESTION is no such
# question: its answer ends by EOS after 11 tokens with the padding between the turns ("My
# sister Lena lives in Lyon, France."), after 40 with it after "Document:".
LONG_QUESTION = ("Tell me about my sister Lena: where does she live, what does she do there, "
                 "and what is her city famous for?")
MAX_TOKENS = 20
# answers at a time on the link (each waits on the other side's draft). The cloud holds a
# request's streams until a round trip after the device is done, and admits 16 streams per
# identity (k = 2: 8 requests): with 8 at a time, an answer that started as soon as the one before
# it ended (the device's prefill is ~free with llama.cpp's prefix reuse) found the quota full and
# was answered degraded (`quota_exceeded`). 4 leaves a whole generation of closing requests room.
SAMPLING_CONCURRENCY = 4  # test_e2e's sampling; the runtime keeps as many idle llama.cpp contexts
RTTS = (0, 50, 300)


def run(loop: asyncio.AbstractEventLoop, coro, timeout: float = 600):
    return loop.run_until_complete(asyncio.wait_for(coro, timeout))


@dataclass
class CloudProcess:
    """The shared cloud: its port and its process."""

    root: Path
    port: int
    proc: Popen

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        from dragon_demo import start_cloud, stop, wait_healthy

        self.proc, self.port = start_cloud(self.root / "index", TOKEN, self.root / "cloud.log")
        try:
            wait_healthy(self.url, self.proc, timeout_s=300)
        except BaseException:
            stop(self.proc)
            print((self.root / "cloud.log").read_text()[-4000:])
            raise

    def health(self) -> dict:
        with urllib.request.urlopen(f"{self.url}/health", timeout=5) as r:
            return json.loads(r.read())

    def wait_idle(self, timeout_s: float = 60.0) -> None:
        """Until no link request and no engine stream is open: an earlier test's answer that the
        cloud is still closing (it closes a round trip after the device) would share the engine's
        batches, and vLLM's CPU kernels are not batch-invariant, so a near-tie could flip."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            h = self.health()
            if not h.get("link_requests") and not (h.get("engine") or {}).get("open_streams"):
                return
            time.sleep(0.1)
        raise AssertionError(f"the cloud did not go idle within {timeout_s:.0f} s: {self.health()}")


# ---------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="session")
def e2e_loop():
    """One event loop for the session: the in-process reference engine is bound to it."""
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


@pytest.fixture(scope="session")
def world(tmp_path_factory, smollm2):
    """``(root, public index, private store)`` of the demo, built once."""
    from dragon_demo import build_demo_world

    root = tmp_path_factory.mktemp("e2e")
    index, store = build_demo_world(root)
    return root, index, store


@pytest.fixture(scope="session")
def cloud(world):
    from dragon_demo import stop

    os.environ["DRAGON_TOKEN"] = TOKEN
    handle = CloudProcess(world[0], 0, None)  # type: ignore[arg-type]
    handle.start()
    yield handle
    stop(handle.proc)


@pytest.fixture(scope="session")
def runtime(world):
    from dragon_edge.loader import load_runtime

    # idle llama.cpp contexts kept for prefix reuse: as many as the sampling tests run answers at
    # once, so each answer of the same question starts from the KV of one before it instead of
    # prefilling its passages again (~94 MB each at n_ctx 2048, k 2)
    return load_runtime("smollm2-135m", "llamacpp", store=world[2], max_idle_contexts=SAMPLING_CONCURRENCY)


@pytest.fixture(scope="session")
def reference_engine(e2e_loop, smollm2):
    """The cloud's engine, in this process, with the server's settings (for the references)."""
    from dragon_vllm.engine import make_engine

    async def start():
        # max_logprobs=-1: the independent references read each document's whole vocabulary.
        # On a GPU (benchmarks/gpu_run.sh): eager and a third of the memory, since this engine's
        # start once hung there at its CUDA graphs / memory profile (results/tests_h200_hang.log)
        import torch

        gpu = dict(enforce_eager=True, gpu_memory_utilization=0.35) if torch.cuda.is_available() else {}
        return make_engine(str(smollm2.hf_dir()), top_k=20, max_num_seqs=32, max_model_len=1024, max_logprobs=-1,
                           **gpu)

    eng = run(e2e_loop, start())
    yield eng
    run(e2e_loop, eng.close())


@pytest.fixture(scope="session")
def proxies(cloud):
    """One netem proxy process per emulated RTT (jitter = latency / 5, as in the paper)."""
    procs = {}
    for rtt in RTTS:
        one_way = Shape(latency_ms=rtt / 2, jitter_ms=rtt / 10)
        procs[rtt] = spawn_proxy(("127.0.0.1", cloud.port), up=one_way, down=one_way, seed=rtt)
    yield {rtt: f"http://127.0.0.1:{p}" for rtt, (_, p) in procs.items()}
    for proc, _ in procs.values():
        stop_proxy(proc)


# ---------------------------------------------------------------------------- helpers
def options(**kw) -> AnswerOptions:
    base = dict(max_tokens=MAX_TOKENS, k=2, cloud_k=2, dist_top_k=0, scheduling=False, seed=0)
    base.update(kw)
    return AnswerOptions(**base)


async def ask(runtime, url: str | None, opts: AnswerOptions, frames: list | None = None, hook=None,
              question: str = QUESTION, arrivals: list | None = None):
    """One answer through the SDK runtime; returns (token ids, stats). ``hook`` runs once, after
    the second committed token (to inject a fault mid-answer). ``frames`` collects the link's
    frames as the device's link code sees them (direction, bytes). ``arrivals`` collects
    (time.monotonic(), tokens so far) for every piece."""
    runtime.link = CloudLink(url, runtime.identity, TOKEN) if url else None
    if frames is not None and runtime.link is not None:
        runtime.link.tap = lambda direction, frame: frames.append((direction, bytes(frame)))
    ids, stats = [], None
    try:
        async for piece in runtime.answer(question, opts):
            ids.extend(piece.token_ids)
            stats = piece.finished or stats
            if arrivals is not None:
                arrivals.append((time.monotonic(), len(ids)))
            if hook is not None and len(ids) >= 2:
                hook()
                hook = None
    finally:
        if runtime.link is not None:
            await runtime.link.close()
    return ids, stats


async def side_prompts(runtime, index, question: str, opts: AnswerOptions):
    """Both sides' retrieved passages as prompts + scores: ``((dev_prompts, dev_scores),
    (pub_prompts, pub_scores))``, as the device and the cloud build them."""
    dev = runtime.private_passages(question, opts.k)
    pub = index.search(question, opts.cloud_k)
    return (passage_prompts(runtime.tokenizer, question, [p.text for p in dev], [p.score for p in dev]),
            passage_prompts(runtime.tokenizer, question, [p.text for p in pub], [p.score for p in pub]))


async def reference(runtime, index, reference_engine, opts: AnswerOptions, question: str = QUESTION) -> list[int]:
    """Centralized output aggregation over the union of both sides' documents, each side's
    passages on its own engine (llama.cpp for the private ones, vLLM for the public ones)."""
    (dp, ds), (pp, ps) = await side_prompts(runtime, index, question, opts)
    temperature = 1.0 if opts.greedy else opts.temperature
    g_dev = await runtime.engine.open_group(dp, temperature)
    g_pub = await reference_engine.open_group(pp, temperature, ps, opts.max_tokens)  # a gang, as on the server
    config = s.SessionConfig(request_id=0, max_tokens=opts.max_tokens, seed=opts.seed, eos_ids=runtime.eos_ids,
                             sampling=m.Sampling(opts.greedy, opts.temperature, opts.top_k, opts.top_p),
                             dist_top_k=opts.dist_top_k)
    try:
        return await centralized_generate(config, [(g_dev, ds), (g_pub, ps)])
    finally:
        await g_dev.close()
        await g_pub.close()
