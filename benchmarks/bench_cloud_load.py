"""Load on ONE real cloud: N simulated devices answer at once through the real link.

One ``dragon-cloud serve`` process (vLLM, the public index) is driven by N devices, each with
its own WebSocket (``dragon_edge.link.CloudLink``) and the real device runtime
(``EdgeRuntime.answer``: ``Open``, handshake, validation, the device ``Session`` and
``SessionDriver``, the codec), all starting their answers at the same instant, each on a
different question. Only the device's *compute* is replayed: a ``ReplayEngine`` returns
per-document distributions recorded at the start of this run from the real device engine
(llama.cpp, SmolLM2, the same question over the same private passages, kept as
top-``--record-top-k`` ``Dist``s), keyed by the generated prefix they were computed after.
``--record device`` (default): greedy device-only decoding, recorded while the cloud starts.
``--record dragon``: one real DRAGON answer per question through the cloud (every prefix the
device computed, rejected drafts included), then the cloud is restarted so that the levels
meet cold prefix caches. Replay is exact for a recorded prefix; for any other (the cloud
changed a token, or the instant replayed device drafted deeper than the recorded one did) it
gives the recorded distributions of the same step index whose prefix shares the most leading
tokens, which is approximate; per level the fraction of such off-path lookups and the answers
equal to the recorded one are reported. ``--replay-ms`` adds a per-step device decode time
(default 0: the devices cost the cloud nothing but their frames).

Per level N (``--levels``): answer tokens/s over all devices (committed tokens / wall time),
stream tokens/s (x cloud k), gaps between committed tokens and TTFT (p50/p99), the cloud's
acceptance and rollbacks, the cloud's own counters over the level (``/metrics`` and ``/health``
before and after: engine chunks, reopens, repairs, prefix-cache hit rate, peak open streams,
queued groups and reserved KV blocks) and the host CPU of the cloud's API process and of its
children (the vLLM engine core) per second of wall time. Then, in the same run, the cloud is
stopped and a plain vLLM ``AsyncLLM`` (no DRAGON scheduler or logits processor) decodes the
same k*N cloud prompts as ordinary requests (``max_tokens``, ``ignore_eos``, top-K log-probs on
one request in k): ``plain_stream_tokens_per_s`` and ``ratio`` = DRAGON's stream tokens/s over it.

    python -m benchmarks.bench_cloud_load --levels 1 8 --max-tokens 16 --device cpu
    python -m benchmarks.bench_cloud_load --device h200 --device-cores 0-3 --cloud-cores 4-15 \\
        --gpu-memory-utilization 0.85

Questions: ``--questions FILE`` / ``$DRAGON_QUESTIONS`` (NQ-open jsonl ``{"question": ...}``,
``question<TAB>answers`` lines, or plain lines), else ``../shared/data/nq_open/NQ-open.dev.jsonl``
next to the repository, else 32 built-in ones. Public index: ``--index DIR`` (built there from
``--passages`` if missing) or a temporary one built from ``--passages`` / ``$DRAGON_PASSAGES``
(default ``../shared/data/wiki_passages_sample/flashrag_wiki18_sample_1000.jsonl``). The
device's k private passages are the question's next k passages of the same index (ranks
cloud_k+1 .. cloud_k+k), so the two sides hold different documents.

Writes ``benchmarks/results/cloud_load_{device}.json`` and ``.png``.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

RESULTS = Path(__file__).parent / "results"
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
DEFAULT_QUESTIONS = SHARED_DATA / "nq_open" / "NQ-open.dev.jsonl"
DEFAULT_PASSAGES = SHARED_DATA / "wiki_passages_sample" / "flashrag_wiki18_sample_1000.jsonl"
TOKEN = "bench-load-token"
DEVICE_COMPUTE = "replayed from llama.cpp distributions recorded in this run"
WARM_UP_QUESTION = "what is the warm-up question of this benchmark"

BUILTIN_QUESTIONS = [
    "when was the last time anyone was on the moon", "who wrote the declaration of independence",
    "what is the capital of australia", "who painted the mona lisa", "how many bones are in the human body",
    "when did the berlin wall fall", "what is the largest planet in the solar system",
    "who discovered penicillin", "where is the great barrier reef", "what language is spoken in brazil",
    "who was the first president of the united states", "when did world war ii end",
    "what is the boiling point of water", "who wrote romeo and juliet", "what is the longest river in the world",
    "when was the eiffel tower built", "who invented the telephone", "what is the smallest country in the world",
    "where are the pyramids of giza", "who composed the brandenburg concertos", "what is photosynthesis",
    "when did the titanic sink", "who developed the theory of relativity", "what is the currency of japan",
    "where is mount everest", "who was cleopatra", "what causes the tides", "when was the printing press invented",
    "who is the author of harry potter", "what is the speed of light", "where does the amazon river flow",
    "who built the great wall of china",
]


# ============================================================================ replay (pure)
@dataclass
class Recording:
    """One question recorded from the real device engine: for every generated prefix the
    device computed (``dists[prefix]``), the k per-document distributions of the position after
    it. ``path`` is the recorded answer: the device-only greedy path (``--record device``: one
    prefix per step) or the committed tokens of a real DRAGON answer (``--record dragon``: also
    the prefixes of its rejected drafts)."""

    prompts_key: str
    path: list[int]
    dists: dict  # tuple(prefix) -> list (documents) of dragon_core.dist.Dist
    prefill_ms: float = 0.0
    step_ms: list[float] = field(default_factory=list)
    _by_len: dict | None = field(default=None, repr=False)

    @property
    def steps(self) -> int:
        return len(self.dists)

    def nearest(self, prefix: tuple) -> tuple[list, bool]:
        """The recorded distributions nearest to an unrecorded prefix: those of the same step
        index (the deepest recorded step past the end) whose prefix shares the most leading
        tokens with it, the recorded path first on ties. Also: whether it is past the end."""
        if self._by_len is None:
            by_len: dict[int, list[tuple]] = {}
            main = [tuple(self.path[:i]) for i in range(len(self.path) + 1)]
            for p in [p for p in main if p in self.dists] + [p for p in self.dists if p not in set(main)]:
                by_len.setdefault(len(p), []).append(p)
            self._by_len = by_len
        step = len(prefix)
        lengths = [n for n in self._by_len if n <= step] or [min(self._by_len)]
        at = max(lengths)
        best = max(self._by_len[at], key=lambda p: _common_prefix(p, prefix))  # first of the maxima
        return self.dists[best], step > max(self._by_len)


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def prompts_key(prompts: Sequence[Sequence[int]]) -> str:
    """A stream group's identity: the digest of its prompts' token ids (in order)."""
    h = hashlib.blake2b(digest_size=16)
    for p in prompts:
        h.update(np.asarray(list(p), dtype=np.int64).tobytes())
        h.update(b"|")
    return h.hexdigest()


def top_k_dist(dist, k: int):
    """The ``k`` most likely ids of a full ``Dist`` as a top-K ``Dist`` (order: descending
    log-prob, ties by id; ``argpartition`` first, so 49k-wide rows cost well under 1 ms)."""
    from dragon_core.dist import Dist

    if dist.ids is not None:
        return dist
    lp = np.asarray(dist.logprobs, dtype=np.float64)
    k = min(int(k), lp.size)
    idx = np.argpartition(-lp, k - 1)[:k] if k < lp.size else np.arange(lp.size)
    idx = idx[np.lexsort((idx, -lp[idx]))]
    return Dist.from_top_k(lp.size, idx.astype(np.int32), lp[idx])


def pack_recording(rec: Recording) -> dict:
    """A compact, picklable form (int32 ids, float16 log-probs) for the device processes."""
    first = next(iter(rec.dists.values()), None)
    return dict(prompts_key=rec.prompts_key, path=list(rec.path), prefill_ms=rec.prefill_ms, step_ms=rec.step_ms,
                vocab=first[0].vocab_size if first else 0,
                dists=[(prefix, [(d.ids, d.logprobs, d.tail_mass) for d in ds]) for prefix, ds in rec.dists.items()])


def unpack_recording(packed: dict) -> Recording:
    from dragon_core.dist import Dist

    dists = {tuple(prefix): [Dist(vocab_size=packed["vocab"], logprobs=lp, ids=ids, tail_mass=tail)
                             for ids, lp, tail in ds] for prefix, ds in packed["dists"]}
    return Recording(packed["prompts_key"], list(packed["path"]), dists, packed["prefill_ms"], packed["step_ms"])


@dataclass
class ReplayCounters:
    lookups: int = 0
    off_path: int = 0  # a prefix that was not recorded (the nearest recorded one's dists are used)
    past_end: int = 0  # of those: a step beyond every recorded one
    groups: int = 0

    def as_dict(self) -> dict:
        return dict(self.__dict__)

    def minus(self, other: "ReplayCounters") -> "ReplayCounters":
        return ReplayCounters(*(a - b for a, b in zip(self.__dict__.values(), other.__dict__.values())))


class ReplayStreamGroup:
    """``dragon_core.engine.StreamGroup`` over a ``Recording``: exact for a recorded prefix
    (the recorded path), the nearest recorded distributions of the same step index off it
    (``Recording.nearest``). Costs no compute beyond ``step_s``."""

    def __init__(self, rec: Recording, counters: ReplayCounters, num_streams: int, step_s: float = 0.0) -> None:
        if not rec.dists:
            raise ValueError("a recording needs at least one step")
        self.rec, self.counters, self.step_s = rec, counters, step_s
        self._num_streams = num_streams
        self._generated: list[int] = []
        self._closed = False

    @property
    def num_streams(self) -> int:
        return self._num_streams

    @property
    def length(self) -> int:
        return len(self._generated)

    @property
    def on_path(self) -> bool:
        return tuple(self._generated) in self.rec.dists

    async def next_dists(self) -> list:
        self._check_open()
        if self.step_s:
            await asyncio.sleep(self.step_s)
        prefix = tuple(self._generated)
        self.counters.lookups += 1
        dists = self.rec.dists.get(prefix)
        if dists is None:
            self.counters.off_path += 1
            dists, past_end = self.rec.nearest(prefix)
            self.counters.past_end += past_end
        return list(dists)

    async def append(self, tokens: Sequence[int]) -> None:
        self._check_open()
        self._generated.extend(int(t) for t in tokens)

    async def rollback(self, length: int) -> None:
        self._check_open()
        if not 0 <= length <= len(self._generated):
            raise ValueError(f"cannot roll back to {length}: the streams hold {len(self._generated)} tokens")
        del self._generated[length:]

    async def close(self) -> None:
        self._closed = True

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("the stream group is closed")


class ReplayEngine:
    """``dragon_core.engine.Engine`` that opens ``ReplayStreamGroup``s: a group's prompts
    select the recording (they must be the ones recorded: same passages, same query)."""

    def __init__(self, recordings: Sequence[Recording], vocab_size: int, step_ms: float = 0.0,
                 prefill_ms: float = 0.0) -> None:
        self.recordings = {r.prompts_key: r for r in recordings}
        self.paths = {i: r.path for i, r in enumerate(recordings)}  # by question index
        self._vocab = vocab_size
        self.step_s, self.prefill_s = step_ms / 1000, prefill_ms / 1000
        self.counters = ReplayCounters()

    @property
    def vocab_size(self) -> int:
        return self._vocab

    async def open_group(self, prompts: Sequence[Sequence[int]], temperature: float = 1.0) -> ReplayStreamGroup:
        key = prompts_key(prompts)
        rec = self.recordings.get(key)
        if rec is None:
            raise KeyError(f"no recording for these {len(prompts)} prompts (key {key}): replay needs the "
                           f"prompts that were recorded")
        streams = len(next(iter(rec.dists.values())))
        if streams != len(prompts):
            raise ValueError(f"recording has {streams} streams, the group {len(prompts)}")
        if self.prefill_s:
            await asyncio.sleep(self.prefill_s)
        self.counters.groups += 1
        return ReplayStreamGroup(rec, self.counters, streams, self.step_s)

    async def close(self) -> None:
        pass


class RecordingEngine:
    """Wraps the real device engine (``--record dragon``): every distribution the device
    computes during a real answer is kept under its prompts and generated prefix."""

    def __init__(self, engine, top_k: int) -> None:
        self.engine, self.top_k = engine, top_k
        self.recordings: dict[str, Recording] = {}

    @property
    def vocab_size(self) -> int:
        return self.engine.vocab_size

    async def open_group(self, prompts: Sequence[Sequence[int]], temperature: float = 1.0) -> "RecordingGroup":
        t0 = time.perf_counter()
        group = await self.engine.open_group(prompts, temperature)
        key = prompts_key(prompts)
        rec = self.recordings.setdefault(key, Recording(key, [], {}))
        rec.prefill_ms = (time.perf_counter() - t0) * 1000
        return RecordingGroup(group, rec, self.top_k)

    async def close(self) -> None:
        await self.engine.close()


class RecordingGroup:
    def __init__(self, group, rec: Recording, top_k: int) -> None:
        self.group, self.rec, self.top_k = group, rec, top_k
        self._generated: list[int] = []

    @property
    def num_streams(self) -> int:
        return self.group.num_streams

    @property
    def length(self) -> int:
        return self.group.length

    async def next_dists(self) -> list:
        t0 = time.perf_counter()
        dists = await self.group.next_dists()
        prefix = tuple(self._generated)
        if prefix:
            self.rec.step_ms.append((time.perf_counter() - t0) * 1000)
        if prefix not in self.rec.dists:
            self.rec.dists[prefix] = [top_k_dist(d, self.top_k) for d in dists]
        return dists

    async def append(self, tokens: Sequence[int]) -> None:
        await self.group.append(tokens)
        self._generated.extend(int(t) for t in tokens)

    async def rollback(self, length: int) -> None:
        await self.group.rollback(length)
        del self._generated[length:]

    async def close(self) -> None:
        await self.group.close()


# ============================================================================ statistics (pure)
def percentile(values: Sequence[float], q: float) -> float | None:
    """The q-th percentile (linear interpolation, numpy's default); None for no values."""
    vals = [float(v) for v in values if v is not None]
    return float(np.percentile(vals, q)) if vals else None


def _r(x: float | None, nd: int = 2) -> float | None:
    return None if x is None else round(float(x), nd)


def parse_prometheus(text: str) -> dict[str, float]:
    """Prometheus text -> ``{'name{label="v",...}': value}`` (labels sorted; no braces without labels)."""
    from prometheus_client.parser import text_string_to_metric_families

    out = {}
    for fam in text_string_to_metric_families(text):
        for smp in fam.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(smp.labels.items()))
            out[smp.name + (f"{{{labels}}}" if labels else "")] = float(smp.value)
    return out


def cloud_delta(before: dict, after: dict) -> dict:
    """What the cloud did over one level, from two snapshots ``{"metrics": parsed /metrics,
    "health": /health JSON}``: its counters' differences and the prefix-cache hit rate."""
    mb, ma = before.get("metrics", {}), after.get("metrics", {})
    eb = before.get("health", {}).get("engine", {}) or {}
    ea = after.get("health", {}).get("engine", {}) or {}

    def dm(name: str) -> float:
        return ma.get(name, 0.0) - mb.get(name, 0.0)

    def de(name: str) -> float | None:
        return (ea[name] - eb.get(name, 0)) if isinstance(ea.get(name), (int, float)) else None

    link_requests = sum(v - mb.get(k, 0.0) for k, v in ma.items()
                        if k.startswith("dragon_requests_total{") and 'kind="link"' in k)
    verified, accepted = dm("dragon_verified_steps_total"), dm("dragon_cloud_drafts_accepted_total")
    prompt, cached = de("prompt_tokens"), de("cached_tokens")
    return dict(
        link_requests_finished=link_requests,
        tokens_link=dm('dragon_tokens_total{kind="link"}'),
        verified_steps=verified, cloud_drafts_accepted=accepted,
        acceptance_cloud=(accepted / verified) if verified else None,
        rollbacks=dm("dragon_rollbacks_total"), handovers=dm("dragon_handovers_total"),
        link_bytes_sent=dm('dragon_link_bytes_total{direction="sent"}'),
        link_bytes_received=dm('dragon_link_bytes_total{direction="received"}'),
        engine_groups=de("groups"), engine_chunks=de("chunks"), engine_reopens=de("reopens"),
        engine_repairs=de("repairs"), prompt_tokens=prompt, cached_tokens=cached,
        prefix_cache_hit_rate=(cached / prompt) if prompt else None,
        kv_blocks_capacity=ea.get("kv_blocks_capacity"), max_streams=ea.get("max_streams"),
    )


def level_row(n: int, answers: Sequence[dict], wall_s: float, cloud_k: int, *, cloud: dict | None = None,
              peaks: dict | None = None, cpu: dict | None = None, replay: dict | None = None,
              questions: int | None = None) -> dict:
    """One JSON row for level ``n`` from the devices' answers (each: ``tokens``, ``ttft_s``,
    ``gaps_ms`` = gaps between commits after the first, ``acceptance_cloud``, ``rollbacks``,
    ``degraded``, ``error``) and the wall time from the common start to the last answer."""
    ok = [a for a in answers if not a.get("error")]
    tokens = sum(a["tokens"] for a in ok)
    gaps = [g for a in ok for g in a.get("gaps_ms", ())]
    ttft = [a["ttft_s"] * 1000 for a in ok if a.get("ttft_s") is not None]
    tpot = [sum(a["gaps_ms"]) / (a["tokens"] - a["first_commit_tokens"])
            for a in ok if a.get("gaps_ms") and a["tokens"] > a.get("first_commit_tokens", 1)]
    commits = sum(len(a.get("gaps_ms", ())) + 1 for a in ok if a["tokens"])
    acc = [a["acceptance_cloud"] for a in ok if a.get("acceptance_cloud") is not None]
    tps = tokens / wall_s if wall_s > 0 else 0.0
    row = dict(
        devices=n, questions_distinct=questions, answers_ok=len(ok), errors=len(answers) - len(ok),
        degraded=sum(bool(a.get("degraded")) for a in ok),
        wall_s=_r(wall_s, 3), answer_tokens=tokens, answer_tokens_per_device_mean=_r(tokens / max(1, len(ok))),
        answer_tokens_per_s=_r(tps), stream_tokens_per_s=_r(tps * cloud_k),
        ttft_ms_p50=_r(percentile(ttft, 50)), ttft_ms_p99=_r(percentile(ttft, 99)),
        token_gap_ms_p50=_r(percentile(gaps, 50)), token_gap_ms_p99=_r(percentile(gaps, 99)),
        tpot_ms_p50=_r(percentile(tpot, 50)), tpot_ms_p99=_r(percentile(tpot, 99)),
        tokens_per_commit=_r(tokens / commits if commits else None, 3),
        acceptance_cloud_mean=_r(statistics.mean(acc) if acc else None, 4),
        acceptance_device_mean=_r(statistics.mean(a["acceptance_device"] for a in ok
                                                  if a.get("acceptance_device") is not None)
                                  if any(a.get("acceptance_device") is not None for a in ok) else None, 4),
        answers_matching_recording=sum(bool(a.get("matches_recording")) for a in ok),
        rollbacks=sum(a.get("rollbacks", 0) for a in ok),
        rollbacks_per_answer=_r(sum(a.get("rollbacks", 0) for a in ok) / max(1, len(ok)), 3),
        final_aggregator={side: sum(a.get("final_aggregator") == side for a in ok) for side in ("device", "cloud")},
    )
    if replay is not None:
        row["replay"] = dict(replay, off_path_fraction=_r(replay["off_path"] / replay["lookups"], 4)
                             if replay.get("lookups") else None)
    if cloud is not None:
        row["cloud"] = cloud
    if peaks is not None:
        row["cloud_peaks"] = peaks
    if cpu is not None:
        row["cpu"] = cpu
    row["error_messages"] = sorted({a["error"] for a in answers if a.get("error")})[:5]
    return row


def parse_cores(spec: str | None) -> list[int] | None:
    """``"0-3"`` / ``"0,2,4-7"`` -> core ids; None for None/empty."""
    if not spec:
        return None
    cores: list[int] = []
    for part in spec.split(","):
        lo, _, hi = part.strip().partition("-")
        cores += list(range(int(lo), int(hi or lo) + 1))
    return sorted(set(cores))


def load_questions(path: str | Path | None, n: int) -> tuple[list[str], str]:
    """Up to ``n`` distinct questions and where they came from."""
    if path and Path(path).exists():
        out: list[str] = []
        seen = set()
        for line in Path(path).read_text().splitlines():
            line = line.strip()
            if not line:
                continue
            if line.startswith("{"):
                q = str(json.loads(line).get("question", "")).strip()
            else:
                q = line.split("\t")[0].strip()
            if q and q not in seen:
                seen.add(q)
                out.append(q)
            if len(out) >= n:
                break
        return out, str(path)
    return BUILTIN_QUESTIONS[:n], "built-in"


# ============================================================================ the cloud process
class CloudProc:
    """``dragon-cloud serve --port 0 --port-file F`` in its own session (under ``taskset`` when
    cloud cores are given); /metrics, /health and the CPU of the API process and its children."""

    def __init__(self, args, index_dir: Path, workdir: Path) -> None:
        self.log_path = workdir / "cloud.log"
        port_file = workdir / "cloud.port"
        port_file.unlink(missing_ok=True)
        cmd = [sys.executable, "-m", "dragon_vllm.cli", "serve", "--model", args.model, "--index", str(index_dir),
               "--port", "0", "--port-file", str(port_file), "--auth-token", TOKEN,
               "--top-k", str(args.dist_top_k), "--max-num-seqs", str(args.max_num_seqs),
               "--max-model-len", str(args.max_model_len),
               "--max-k", str(max(16, args.cloud_k)), "--max-tokens", str(max(1024, args.max_tokens)),
               # every simulated device connects from this host with one token: one identity, no quota
               "--max-requests-per-identity", "0", "--max-streams-per-identity", "0"]
        if args.chunk_tokens is not None:
            cmd += ["--chunk-tokens", str(args.chunk_tokens)]
        if args.gpu_memory_utilization is not None:
            cmd += ["--gpu-memory-utilization", str(args.gpu_memory_utilization)]
        if args.kv_cache_gib is not None:
            cmd += ["--kv-cache-gib", str(args.kv_cache_gib)]
        if args.api_servers > 1:
            cmd += ["--api-servers", str(args.api_servers)]
        cmd += shlex.split(args.cloud_args or "")
        self.api_servers = _api_servers(cmd)
        if args.cloud_cores:
            if shutil.which("taskset") is None:
                raise SystemExit("--cloud-cores needs taskset (util-linux)")
            cmd = ["taskset", "-c", args.cloud_cores, *cmd]
        self.cmd = cmd
        env = dict(os.environ, HF_HUB_OFFLINE="1", DRAGON_TOKEN=TOKEN)
        if args.kv_cache_gib is not None:
            env["VLLM_CPU_KVCACHE_SPACE"] = str(int(args.kv_cache_gib))
        self.t0 = time.monotonic()
        self.proc = subprocess.Popen(cmd, env=env, stdout=self.log_path.open("w"), stderr=subprocess.STDOUT,
                                     start_new_session=True)
        deadline = time.monotonic() + 300
        while not (port_file.exists() and port_file.read_text().endswith("\n")):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the cloud did not bind a port:\n{self.log_tail()}")
            time.sleep(0.05)
        self.port = int(port_file.read_text())
        self.url = f"http://127.0.0.1:{self.port}"
        self.healthy_s: float | None = None

    def wait_healthy(self, timeout_s: float) -> None:
        from dragon_demo import wait_healthy

        try:
            wait_healthy(self.url, self.proc, timeout_s)
        except BaseException:
            print(self.log_tail(), file=sys.stderr)
            raise
        self.healthy_s = time.monotonic() - self.t0

    def log_tail(self, n: int = 4000) -> str:
        return self.log_path.read_text(errors="replace")[-n:] if self.log_path.exists() else ""

    def _get(self, route: str) -> bytes:
        with urllib.request.urlopen(self.url + route, timeout=10) as r:
            return r.read()

    def health(self) -> dict:
        return json.loads(self._get("/health"))

    def snapshot(self) -> dict:
        if self.api_servers > 1:
            return merged_snapshot(self._get, self.api_servers)
        return dict(metrics=parse_prometheus(self._get("/metrics").decode()), health=self.health())

    def cpu_seconds(self) -> dict[str, float]:
        """Seconds of CPU (user + system) of the API process (``api``) and of each live child
        (``child:<pid>``: the vLLM engine core and its helpers)."""
        out = {}
        try:
            import psutil

            p = psutil.Process(self.proc.pid)
            t = p.cpu_times()
            out["api"] = t.user + t.system
            for c in p.children(recursive=True):
                try:
                    ct = c.cpu_times()
                    out[f"{_child_kind(c.pid)}:{c.pid}"] = ct.user + ct.system
                except psutil.Error:
                    pass
        except ImportError:
            out["api"] = _proc_cpu_seconds(self.proc.pid)
            for pid in _proc_children(self.proc.pid):
                out[f"{_child_kind(pid)}:{pid}"] = _proc_cpu_seconds(pid)
        return out

    def wait_idle(self, timeout_s: float = 30.0) -> None:
        """Until no link request and no stream is open (the cloud closes its sessions a round trip
        after the device): the counters read next include the whole level."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            h = self.snapshot()["health"] if self.api_servers > 1 else self.health()  # every process idle
            if not h.get("link_requests") and not (h.get("engine") or {}).get("open_streams"):
                return
            time.sleep(0.1)

    def stop(self) -> None:
        from dragon_demo import stop

        stop(self.proc)


def _proc_cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime


def _proc_children(pid: int) -> list[int]:
    out: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            kids = [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            continue
        for k in kids:
            out += [k, *_proc_children(k)]
    return out


def _child_kind(pid: int) -> str:
    """``api`` for an API server process of ``--api-servers N`` (its process title), else ``child``."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return "child"
    return "api" if cmdline.startswith(b"dragon-cloud::api_server_") else "child"


def cpu_row(before: dict[str, float], after: dict[str, float], wall_s: float) -> dict:
    """Cores used over the level: CPU seconds / wall seconds, API process(es) and children apart
    (``--api-servers N``: the supervisor and the N API servers are all ``api``; the busiest
    one is ``cloud_api_cores_busiest``)."""
    api_each = {k: v - before.get(k, 0.0) for k, v in after.items() if k == "api" or k.startswith("api:")}
    kids = sum(v - before.get(k, 0.0) for k, v in after.items() if k.startswith("child:"))
    api = sum(api_each.values())
    w = max(wall_s, 1e-9)
    row = dict(cloud_api_cores=_r(api / w, 3), cloud_children_cores=_r(kids / w, 3),
               cloud_total_cores=_r((api + kids) / w, 3))
    if len(api_each) > 1:
        row["cloud_api_cores_busiest"] = _r(max(api_each.values()) / w, 3)
    return row


def _api_servers(cmd: list[str]) -> int:
    """The ``--api-servers`` the cloud command asks for (also through ``--cloud-args``; last wins)."""
    n = 1
    for i, word in enumerate(cmd):
        if word == "--api-servers" and i + 1 < len(cmd):
            n = int(cmd[i + 1])
        elif word.startswith("--api-servers="):
            n = int(word.split("=", 1)[1])
    return n


def merged_snapshot(get, count: int, tries: int = 400) -> dict:
    """``--api-servers N``: each process answers /metrics and /health for itself, and a connection
    reaches one of them (SO_REUSEPORT hash). Scrape on fresh connections until every process has
    answered, then sum them: counters and engine counts add up (the ``api_server`` label dropped),
    as ``snapshot`` reads one process."""
    metrics: dict[str, dict[str, float]] = {}
    health: dict[str, dict] = {}
    for _ in range(tries):
        if len(metrics) >= count and len(health) >= count:
            break
        if len(metrics) < count:
            index, parsed = _without_api_server(parse_prometheus(get("/metrics").decode()))
            metrics.setdefault(index, parsed)
        if len(health) < count:
            h = json.loads(get("/health"))
            health.setdefault(str(h.get("api_server")), h)
    else:
        raise RuntimeError(f"scraped {len(metrics)} /metrics and {len(health)} /health of {count} API servers")
    summed: dict[str, float] = {}
    for parsed in metrics.values():
        for key, value in parsed.items():
            summed[key] = summed.get(key, 0.0) + value
    merged = dict(next(iter(health.values())))
    for key in ("device_links", "link_requests"):
        merged[key] = sum(h.get(key) or 0 for h in health.values())
    engine = dict(merged.get("engine") or {})
    for key, value in engine.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool) and key not in ("chunk_tokens", "logprobs_k",
                                                                                              "block_size"):
            engine[key] = sum((h.get("engine") or {}).get(key) or 0 for h in health.values())
    merged["engine"] = engine
    return dict(metrics=summed, health=merged)


def _without_api_server(parsed: dict[str, float]) -> tuple[str, dict[str, float]]:
    """(the process's index, its metrics with the ``api_server`` label taken out of every key)."""
    import re

    index, out = "?", {}
    for key, value in parsed.items():
        m = re.search(r'api_server="(\d+)",?', key)
        if m:
            index = m.group(1)
            key = key.replace(m.group(0), "").replace(",}", "}").replace("{}", "")
        out[key] = value
    return index, out


class HealthPoller(threading.Thread):
    """Peaks of the cloud's open streams, queued groups, reserved KV blocks and link requests
    during a level (``/health`` every ``interval_s``). With ``--api-servers N`` each poll reads
    one process (whichever the connection reaches): the peaks are per process, not the sum."""

    KEYS = ("open_streams", "queued_groups", "reserved_blocks")

    def __init__(self, cloud: CloudProc, interval_s: float = 0.25) -> None:
        super().__init__(daemon=True)
        self.cloud, self.interval_s = cloud, interval_s
        self.peaks = {k: 0 for k in (*self.KEYS, "link_requests", "device_links")}
        self.samples = 0
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.wait(self.interval_s):
            try:
                h = self.cloud.health()
            except OSError:
                continue
            self.samples += 1
            eng = h.get("engine") or {}
            for k in self.KEYS:
                self.peaks[k] = max(self.peaks[k], int(eng.get(k) or 0))
            for k in ("link_requests", "device_links"):
                self.peaks[k] = max(self.peaks[k], int(h.get(k) or 0))

    def stop(self) -> dict:
        self._halt.set()
        self.join()
        return dict(self.peaks, samples=self.samples)


# ============================================================================ recording
async def record_device(questions: Sequence[str], passages: Sequence[Sequence[tuple[str, float, str]]], tokenizer,
                        eos_ids, *, model: str, max_tokens: int, dist_top_k: int, record_top_k: int,
                        n_threads: int | None) -> list[Recording]:
    """``--record device``: greedy device-only decoding of every question on the real llama.cpp
    engine over the question's private passages, laid out as ``EdgeRuntime`` lays them out: per
    step the k full distributions (kept as top-``record_top_k``), then the argmax of the side's
    canonical mixture appended. Needs no cloud (it runs while the cloud starts)."""
    from dragon_core.aggregate import canonical_side_dist
    from dragon_core.prompt import passage_prompts
    from dragon_edge.engines import load_engine

    engine = load_engine("llamacpp", model, n_threads=n_threads)
    eos = frozenset(eos_ids)
    out = []
    try:
        for q, ps in zip(questions, passages):
            prompts, scores = passage_prompts(tokenizer, q, [p[0] for p in ps], [p[1] for p in ps])
            t0 = time.perf_counter()
            group = await engine.open_group(prompts, 1.0)
            rec = Recording(prompts_key(prompts), [], {})
            try:
                for _ in range(max_tokens):
                    t1 = time.perf_counter()
                    dists = await group.next_dists()
                    ms = (time.perf_counter() - t1) * 1000
                    if rec.dists:
                        rec.step_ms.append(ms)
                    else:
                        rec.prefill_ms = (time.perf_counter() - t0) * 1000
                    rec.dists[tuple(rec.path)] = [top_k_dist(d, record_top_k) for d in dists]
                    token = canonical_side_dist(dists, scores, dist_top_k).argmax()
                    rec.path.append(token)
                    if token in eos:
                        break
                    await group.append([token])
            finally:
                await group.close()
            out.append(rec)
    finally:
        await engine.close()
    return out


async def record_dragon(questions: Sequence[str], passages, tokenizer, eos_ids, identity, url: str, opts_kw: dict,
                        *, model: str, record_top_k: int, n_threads: int | None, concurrency: int,
                        peer_timeout_s: float) -> tuple[list[Recording], list[dict]]:
    """``--record dragon``: one real DRAGON answer per question (the real llama.cpp device
    runtime, its own link to the running cloud, ``concurrency`` answers at a time), keeping
    every distribution the device computed, rejected drafts' prefixes included; the recorded
    path is the committed answer. Replay then stays on recorded prefixes wherever the cloud
    under load decides as it did here."""
    from dragon_edge.engines import load_engine
    from dragon_edge.link import CloudLink, LinkOptions
    from dragon_edge.runtime import AnswerOptions, EdgeRuntime

    engine = RecordingEngine(load_engine("llamacpp", model, n_threads=n_threads), record_top_k)
    opts = AnswerOptions(**opts_kw)
    sem = asyncio.Semaphore(max(1, concurrency))
    stats: list[dict] = [{} for _ in questions]

    async def one(i: int) -> list[int]:
        async with sem:
            link = CloudLink(url, identity, TOKEN, LinkOptions(peer_timeout_s=peer_timeout_s), client_name="bench-rec")
            rt = EdgeRuntime(engine, tokenizer, identity, eos_ids, store=FixedStore(passages[i]), link=link)
            ids: list[int] = []
            try:
                async for piece in rt.answer(questions[i], opts):
                    ids.extend(piece.token_ids)
                    if piece.finished is not None:
                        st = piece.finished
                        stats[i] = dict(tokens=st.tokens, degraded=st.degraded, rollbacks=st.rollbacks,
                                        acceptance_cloud=st.acceptance_cloud, acceptance_device=st.acceptance_device)
            finally:
                await link.close()
            return ids

    try:
        paths = await asyncio.gather(*(one(i) for i in range(len(questions))))
    finally:
        await engine.close()
    keys = [prompts_key(passage_prompts_of(tokenizer, q, ps)) for q, ps in zip(questions, passages)]
    recs = []
    for key, path in zip(keys, paths):
        rec = engine.recordings[key]
        rec.path = list(path)
        recs.append(rec)
    return recs, stats


def passage_prompts_of(tokenizer, question: str, passages) -> list[list[int]]:
    from dragon_core.prompt import passage_prompts

    return passage_prompts(tokenizer, question, [p[0] for p in passages], [p[1] for p in passages])[0]


# ============================================================================ device processes
@dataclass
class FixedPassage:
    text: str
    score: float
    source: str


class FixedStore:
    """A device's private store for the benchmark: the passages chosen for its question."""

    def __init__(self, passages: Sequence[tuple[str, float, str]]) -> None:
        self.passages = [FixedPassage(*p) for p in passages]
        self.path = "<bench>"

    def search(self, query: str, k: int):
        return self.passages[:k]


async def one_device(runtime, link, question: str, opts, start_at: float) -> dict:
    """One device's answer from ``start_at`` (monotonic): its stats as ``level_row`` reads them."""
    delay = start_at - time.monotonic()
    if delay > 0:
        await asyncio.sleep(delay)
    t0 = time.monotonic()
    stats, first_commit, ids = None, 0, []
    try:
        async for piece in runtime.answer(question, opts):
            if piece.token_ids and not first_commit:
                first_commit = len(piece.token_ids)
            ids.extend(piece.token_ids)
            stats = piece.finished or stats
    except Exception as exc:  # one device failing is a result, not the end of the level
        return dict(error=f"{type(exc).__name__}: {exc}"[:300], t_start=t0, t_end=time.monotonic(), tokens=0)
    t_end = time.monotonic()
    lat = list(stats.per_token_latency_ms)
    return dict(tokens=stats.tokens, ttft_s=stats.ttft_s, gaps_ms=lat[1:],
                first_commit_tokens=first_commit or 1, acceptance_cloud=stats.acceptance_cloud,
                acceptance_device=stats.acceptance_device, rollbacks=stats.rollbacks, handovers=stats.handovers,
                degraded=stats.degraded, finish_reason=stats.finish_reason, final_aggregator=stats.final_aggregator,
                bytes_sent=stats.bytes_sent, bytes_received=stats.bytes_received, t_start=t0, t_end=t_end,
                token_ids=ids)


async def run_devices(engine, tokenizer, identity, eos_ids, url: str, assignments, passages, questions,
                      opts_kw: dict, start_at: float, peer_timeout_s: float) -> dict:
    """Connect one link per device (handshake included), then all answer from ``start_at``."""
    from dragon_edge.link import CloudLink, LinkOptions
    from dragon_edge.runtime import AnswerOptions, EdgeRuntime

    runtimes = []
    for _, qi in assignments:
        link = CloudLink(url, identity, TOKEN, LinkOptions(peer_timeout_s=peer_timeout_s), client_name="bench-load")
        runtimes.append(EdgeRuntime(engine, tokenizer, identity, eos_ids, store=FixedStore(passages[qi]), link=link))
    t0 = time.monotonic()
    connected = await asyncio.gather(*(rt.link.connect() for rt in runtimes), return_exceptions=True)
    connect_s = time.monotonic() - t0
    late = time.monotonic() > start_at
    opts = AnswerOptions(**opts_kw)
    before = ReplayCounters(**engine.counters.as_dict())
    try:
        answers = await asyncio.gather(*(
            one_device(rt, rt.link, questions[qi], opts, start_at) if not isinstance(c, BaseException)
            else _failed(c) for rt, (_, qi), c in zip(runtimes, assignments, connected)))
    finally:
        await asyncio.gather(*(rt.link.close() for rt in runtimes), return_exceptions=True)
    for (dev, qi), a in zip(assignments, answers):
        a.update(device=dev, question=qi)
        if "token_ids" in a:  # the same answer as the recording's (device-only or DRAGON) path
            a["matches_recording"] = a.pop("token_ids") == list(engine.paths.get(qi, ()))
    return dict(answers=answers, connect_s=connect_s, late=late, replay=engine.counters.minus(before).as_dict())


async def _failed(exc: BaseException) -> dict:
    now = time.monotonic()
    return dict(error=f"connect: {type(exc).__name__}: {exc}"[:300], t_start=now, t_end=now, tokens=0)


def device_worker(conn, init: dict) -> None:
    """A device process: loads the tokenizer and the recordings once, then runs levels on
    command (``("level", assignments, opts, start_at)``) until ``("stop",)``."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if init.get("cores"):
        os.sched_setaffinity(0, init["cores"])
    from dragon_edge.loader import load_tokenizer

    tokenizer = load_tokenizer(init["model"])
    recordings = [unpack_recording(p) for p in init["recordings"]]
    engine = ReplayEngine(recordings, init["vocab_size"], init["replay_ms"], init["replay_prefill_ms"])
    loop = asyncio.new_event_loop()
    conn.send(("ready", os.getpid()))
    try:
        while True:
            cmd = conn.recv()
            if cmd[0] == "stop":
                break
            _, assignments, opts_kw, start_at = cmd
            try:
                res = loop.run_until_complete(run_devices(
                    engine, tokenizer, init["identity"], init["eos_ids"], init["url"], assignments,
                    init["passages"], init["questions"], opts_kw, start_at, init["peer_timeout_s"]))
            except Exception as exc:
                res = dict(answers=[], connect_s=0.0, replay=ReplayCounters().as_dict(),
                           fatal=f"{type(exc).__name__}: {exc}")
            conn.send(res)
    finally:
        loop.close()
        conn.close()


class DevicePool:
    """``procs`` device processes (spawned: vLLM/torch state of the parent is not inherited)."""

    def __init__(self, procs: int, init: dict) -> None:
        import multiprocessing as mp

        ctx = mp.get_context("spawn")
        self.workers = []
        for _ in range(procs):
            parent, child = ctx.Pipe()
            p = ctx.Process(target=device_worker, args=(child, init), daemon=True)
            p.start()
            self.workers.append((p, parent))
        self.pids = [conn.recv()[1] for _, conn in self.workers]

    def run(self, assignments: list[tuple[int, int]], opts_kw: dict, start_at: float,
            timeout_s: float | None = None) -> list[dict]:
        """Devices dealt round-robin over the processes; each process's result. ``TimeoutError``
        if a process has not answered ``timeout_s`` after the start (the pool is then unusable)."""
        used = self.workers[:max(1, min(len(self.workers), len(assignments)))]
        shares = [assignments[i::len(used)] for i in range(len(used))]
        for (_, conn), share in zip(used, shares):
            conn.send(("level", share, opts_kw, start_at))
        out = []
        for _, conn in used:
            left = None if timeout_s is None else max(0.0, start_at + timeout_s - time.monotonic())
            if not conn.poll(left):
                raise TimeoutError(f"the devices did not finish within {timeout_s:.0f} s of the start")
            out.append(conn.recv())
        return out

    def cpu_seconds(self) -> float:
        total = 0.0
        for pid in self.pids:
            try:
                total += _proc_cpu_seconds(pid)
            except OSError:
                pass
        return total

    def close(self) -> None:
        for p, conn in self.workers:
            try:
                conn.send(("stop",))
            except OSError:
                pass
        for p, _ in self.workers:
            p.join(timeout=10)
            if p.is_alive():
                p.terminate()


# ============================================================================ plain vLLM ceiling
async def plain_levels(args, hf_dir: str, level_prompts: list[tuple[int, list[list[int]]]],
                       warm_prompts: list[list[int]]) -> dict:
    """Plain vLLM (``mixing=False``: no gang scheduler, no logits processor) decoding each level's
    k*N cloud prompts as ordinary requests: ``max_tokens``, ``ignore_eos``, greedy, top-K
    log-probs on one request in k."""
    from vllm import SamplingParams
    from vllm.inputs.engine import tokens_input

    from dragon_vllm.engine import make_engine, vllm_version

    # this process may have touched CUDA already (the llama.cpp recording, the GPU name); a forked
    # engine core then fails with "CUDA error: initialization error" (seen on the H200)
    os.environ["VLLM_WORKER_MULTIPROC_METHOD"] = "spawn"
    t0 = time.monotonic()
    engine = make_engine(hf_dir, mixing=False, top_k=args.dist_top_k, max_num_seqs=args.max_num_seqs,
                         max_model_len=args.max_model_len, gpu_memory_utilization=args.gpu_memory_utilization,
                         kv_cache_gib=args.kv_cache_gib)
    start_s = time.monotonic() - t0
    out = dict(vllm=".".join(map(str, vllm_version())), start_s=round(start_s, 1), levels={})
    try:
        sched = engine.llm.vllm_config.scheduler_config
        out["async_scheduling"] = bool(getattr(sched, "async_scheduling", False))
        with_lp = SamplingParams(max_tokens=args.max_tokens, ignore_eos=True, temperature=0.0,
                                 logprobs=args.dist_top_k, flat_logprobs=True, detokenize=False)
        without = SamplingParams(max_tokens=args.max_tokens, ignore_eos=True, temperature=0.0, detokenize=False)

        async def one(tag: str, i: int, ids: list[int]) -> int:
            n = 0
            params = with_lp if i % args.cloud_k == 0 else without
            async for o in engine.llm.generate(tokens_input(list(ids)), params, f"plain-{tag}-{i}"):
                n = len(o.outputs[0].token_ids)
            return n

        # warm-up, as the cloud does before it reports healthy: first batches, lazy initialisation
        await asyncio.gather(*(one("warm-up", i, p) for i, p in enumerate(warm_prompts)))
        for n, prompts in level_prompts:
            t1 = time.perf_counter()
            toks = sum(await asyncio.gather(*(one(f"{n}-{time.time_ns()}", i, p) for i, p in enumerate(prompts))))
            wall = time.perf_counter() - t1
            out["levels"][n] = dict(requests=len(prompts), tokens=toks, wall_s=round(wall, 3),
                                    plain_stream_tokens_per_s=round(toks / wall, 2))
            print(f"plain N={n}: {len(prompts)} requests, {toks / wall:.1f} stream tok/s", flush=True)
    finally:
        await engine.close()
    return out


# ============================================================================ the run
def level_questions(levels: Sequence[int], q: int) -> list[list[int]]:
    """Question indices per level: each level starts where the previous one ended (mod ``q``),
    so a question repeats only once all ``q`` have been used."""
    out, off = [], 0
    for n in levels:
        out.append([(off + i) % q for i in range(n)])
        off = (off + n) % q
    return out


def environment(args) -> dict:
    from benchmarks.environment import describe

    env = describe(("vllm", "vllm-cpu", "llama_cpp_python", "torch"))
    env["gpu"] = gpu_name()
    return env


def code_version() -> dict:
    """The commit the code came from and whether the engine-side code differed from it."""
    root = Path(__file__).resolve().parents[1]
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, timeout=10)
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--", "dragon_core", "dragon_vllm",
                                "dragon_edge"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return {}
    if head.returncode != 0:
        return {}
    return dict(git_commit=head.stdout.strip(), code_modified=sorted(line[3:] for line in dirty.stdout.splitlines()))


def gpu_name() -> str | None:
    """The GPU's name from ``nvidia-smi`` (no CUDA context in this process: the device processes
    and vLLM's engine core start later), else None."""
    if shutil.which("nvidia-smi") is None:
        return None
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return None
    names = [line.strip() for line in out.stdout.splitlines() if line.strip()]
    return ", ".join(names) or None


def build_index(args, workdir: Path) -> Path:
    from dragon_vllm.corpus import PublicIndex

    if args.index and (Path(args.index) / "manifest.json").exists():
        return Path(args.index)
    passages = Path(args.passages)
    if not passages.exists():
        raise SystemExit(f"no public passages at {passages}: pass --passages FILE or --index DIR")
    out = Path(args.index) if args.index else workdir / "index"
    t0 = time.monotonic()
    PublicIndex.build([passages], out, progress=False, overwrite=True, limit=args.index_limit)
    print(f"built the public index {out} in {time.monotonic() - t0:.0f} s", flush=True)
    return out


def run(args, save=None) -> dict:
    """The whole benchmark; ``save(result)`` is called after every level (a run cut short by a
    time limit still leaves its finished levels on disk)."""
    from dragon_host.identity import local_identity
    from dragon_host.models import get_model
    from dragon_core.prompt import eos_token_ids
    from dragon_edge.loader import load_tokenizer
    from dragon_vllm.corpus import PublicIndex

    save = save or (lambda result: None)
    original_affinity = os.sched_getaffinity(0)
    device_cores = parse_cores(args.device_cores)
    if device_cores:
        os.sched_setaffinity(0, device_cores)  # this process (recording) and the device processes
    result: dict = dict(benchmark="cloud_load", device=args.device, device_compute=DEVICE_COMPUTE,
                        env=environment(args), flags=vars(args), levels=[])
    t_run = time.monotonic()
    opts_kw = dict(max_tokens=args.max_tokens, k=args.k, cloud_k=args.cloud_k, greedy=True, mode="dragon",
                   aggregator=args.aggregator, scheduling=args.scheduling, dist_top_k=args.dist_top_k)
    with tempfile.TemporaryDirectory(prefix="dragon-load-") as tmp:
        workdir = Path(tmp)
        index_dir = build_index(args, workdir)
        cloud = CloudProc(args, index_dir, workdir)  # loads while the questions are prepared (and recorded)
        pool = None
        try:
            # ---- questions, both sides' passages
            n_q = min(max(args.levels), args.max_questions)
            questions, q_source = load_questions(args.questions, n_q)
            questions = [q for q in questions if q != WARM_UP_QUESTION] + [WARM_UP_QUESTION]
            tokenizer = load_tokenizer(args.model)
            eos = eos_token_ids(tokenizer)
            identity = local_identity(args.model, "gguf")
            index = PublicIndex.load(index_dir)
            hits = index.search_many(questions, args.cloud_k + args.k)
            private = [[(p.text, float(p.score), f"{p.title or 'passage'}#{p.id}") for p in h[args.cloud_k:]]
                       for h in hits]
            public = [[(p.text, float(p.score)) for p in h[:args.cloud_k]] for h in hits]
            threads = len(os.sched_getaffinity(0))

            # ---- the recording: device-only while the cloud starts, or real DRAGON answers once it is up
            t0 = time.monotonic()
            rec_stats: list[dict] = []
            if args.record == "device":
                recs = asyncio.run(record_device(questions, private, tokenizer, eos, model=args.model,
                                                 max_tokens=args.max_tokens, dist_top_k=args.dist_top_k,
                                                 record_top_k=args.record_top_k, n_threads=threads))
                record_s = time.monotonic() - t0
            cloud.wait_healthy(args.cloud_timeout_s)
            result["cloud"] = dict(cmd=cloud.cmd, healthy_after_s=round(cloud.healthy_s, 1), url=cloud.url,
                                   engine_at_start=cloud.health().get("engine"))
            print(f"cloud healthy after {cloud.healthy_s:.0f} s at {cloud.url}", flush=True)
            if args.record == "dragon":
                t0 = time.monotonic()
                recs, rec_stats = asyncio.run(record_dragon(
                    questions, private, tokenizer, eos, identity, cloud.url, opts_kw, model=args.model,
                    record_top_k=args.record_top_k, n_threads=threads, concurrency=args.record_concurrency,
                    peer_timeout_s=args.peer_timeout_s))
                record_s = time.monotonic() - t0
                cloud.wait_idle()
                if not args.keep_warm_cache:  # a fresh cloud: the levels meet their questions cold, as in device mode
                    cloud.stop()
                    cloud = CloudProc(args, index_dir, workdir)
                    cloud.wait_healthy(args.cloud_timeout_s)
                    result["cloud"].update(restarted_after_recording=True, healthy_after_s=round(cloud.healthy_s, 1),
                                           url=cloud.url)
            steps = [ms for r in recs for ms in r.step_ms]
            result["replay"] = dict(
                engine="llama.cpp (llama-cpp-python), the GGUF as shipped", record=args.record,
                questions_recorded=len(recs) - 1, questions_source=q_source, record_top_k=args.record_top_k,
                record_s=round(record_s, 1), recorded_tokens_mean=round(statistics.mean(len(r.path) for r in recs), 2),
                recorded_prefixes_mean=round(statistics.mean(r.steps for r in recs), 2),
                device_prefill_ms_mean=round(statistics.mean(r.prefill_ms for r in recs), 1),
                device_step_ms_mean=round(statistics.mean(steps), 2) if steps else None,
                replay_ms=args.replay_ms, replay_prefill_ms=args.replay_prefill_ms,
                rule="exact for a recorded generated prefix; off them, the recorded distributions of the same "
                     "step index whose prefix shares the most leading tokens (the deepest recorded step past "
                     "the end)")
            if args.record == "dragon":
                result["replay"]["recording_answers"] = dict(
                    concurrency=args.record_concurrency,
                    degraded=sum(bool(s.get("degraded")) for s in rec_stats),
                    acceptance_cloud_mean=_r(statistics.mean(s["acceptance_cloud"] for s in rec_stats
                                                             if s.get("acceptance_cloud") is not None), 4)
                    if any(s.get("acceptance_cloud") is not None for s in rec_stats) else None,
                    note="the cloud was restarted after the recording (cold prefix cache)" if not args.keep_warm_cache
                    else "the cloud answered every question once before the levels: its prefix cache holds their "
                         "prompts (if it has room)")
            print(f"recorded {len(recs)} questions ({args.record}) in {record_s:.0f} s "
                  f"(llama.cpp: prefill {result['replay']['device_prefill_ms_mean']} ms, "
                  f"step {result['replay']['device_step_ms_mean']} ms)", flush=True)

            # ---- device processes, a warm-up answer each
            procs = max(1, min(args.device_procs or threads, max(args.levels)))
            first = next(iter(recs[0].dists.values()))
            init = dict(model=args.model, identity=identity, eos_ids=tuple(eos), url=cloud.url,
                        recordings=[pack_recording(r) for r in recs], vocab_size=first[0].vocab_size,
                        passages=private, questions=questions, replay_ms=args.replay_ms,
                        replay_prefill_ms=args.replay_prefill_ms, peer_timeout_s=args.peer_timeout_s,
                        cores=device_cores)
            pool = DevicePool(procs, init)
            warm = pool.run([(i, len(questions) - 1) for i in range(procs)], dict(opts_kw, max_tokens=4),
                            time.monotonic() + 0.5, args.level_timeout_s)
            warm_errors = [a["error"] for r in warm for a in r["answers"] if a.get("error")]
            if warm_errors:
                raise RuntimeError(f"warm-up answers failed: {warm_errors[:3]}\n{cloud.log_tail()}")
            cloud.wait_idle()
            result["device_procs"] = procs

            # ---- the levels
            per_level = level_questions(args.levels, len(questions) - 1)
            for n, qs in zip(args.levels, per_level):
                before = cloud.snapshot()
                start_at = time.monotonic() + args.start_delay_s + 0.02 * n  # time for the links to connect
                t_pre, cpu_pre = time.monotonic(), cloud.cpu_seconds()
                at_start: dict = {}  # CPU counters read at the common start, from a timer thread
                timer = threading.Timer(max(0.0, start_at - time.monotonic()), lambda: at_start.update(
                    t=time.monotonic(), cloud=cloud.cpu_seconds(), devices=pool.cpu_seconds()))
                timer.start()
                poller = HealthPoller(cloud)
                poller.start()
                try:
                    results = pool.run(list(enumerate(qs)), opts_kw, start_at, args.level_timeout_s)
                except TimeoutError as exc:
                    poller.stop()
                    timer.join()
                    result["levels"].append(dict(devices=n, fatal=[str(exc)], health=cloud.health()))
                    save(result)
                    raise
                answers = [a for r in results for a in r["answers"]]
                wall = max(a["t_end"] for a in answers) - start_at if answers else 0.0
                t_end, cpu1, dev_cpu1 = time.monotonic(), cloud.cpu_seconds(), pool.cpu_seconds()
                peaks = poller.stop()
                timer.join()
                cloud.wait_idle()
                after = cloud.snapshot()
                replay = {k: sum(r["replay"][k] for r in results) for k in ReplayCounters().__dict__}
                cpu = cpu_row(at_start["cloud"], cpu1, t_end - at_start["t"])
                cpu["device_procs_cores"] = _r((dev_cpu1 - at_start["devices"]) / max(t_end - at_start["t"], 1e-9), 3)
                # the same cloud while the devices connect (handshakes, pings; vLLM idle): a baseline
                cpu["cloud_before_start_cores"] = cpu_row(cpu_pre, at_start["cloud"],
                                                          at_start["t"] - t_pre)["cloud_total_cores"]
                row = level_row(n, answers, wall, args.cloud_k, cloud=cloud_delta(before, after), peaks=peaks,
                                cpu=cpu, replay=replay, questions=len(set(qs)))
                row["connect_s_max"] = _r(max(r["connect_s"] for r in results), 3)
                row["late_start"] = any(r.get("late") for r in results)  # links still connecting at the start
                fatal = [r["fatal"] for r in results if r.get("fatal")]
                if fatal:
                    row["fatal"] = fatal
                result["levels"].append(row)
                save(result)
                print(f"N={n:4d}: {row['answer_tokens_per_s']} answer tok/s, {row['stream_tokens_per_s']} stream "
                      f"tok/s, gap p50/p99 {row['token_gap_ms_p50']}/{row['token_gap_ms_p99']} ms, TTFT p50/p99 "
                      f"{row['ttft_ms_p50']}/{row['ttft_ms_p99']} ms, acceptance {row['acceptance_cloud_mean']}, "
                      f"off-path {row.get('replay', {}).get('off_path_fraction')}, "
                      f"errors {row['errors']}, degraded {row['degraded']}", flush=True)
        finally:
            if pool is not None:
                pool.close()
            cloud.stop()
        result["cloud_log_tail"] = cloud.log_tail(1500)

        # ---- the plain vLLM ceiling, in this process, on the cloud's cores
        if not args.no_plain:
            os.sched_setaffinity(0, parse_cores(args.cloud_cores) or original_affinity)
            level_prompts = [(n, [p for qi in qs for p in passage_prompts_of(tokenizer, questions[qi], public[qi])])
                             for n, qs in zip(args.levels, per_level)]
            warm_prompts = passage_prompts_of(tokenizer, questions[-1], public[-1])  # the warm-up question's
            plain = asyncio.run(plain_levels(args, str(get_model(args.model).hf_dir()), level_prompts, warm_prompts))
            result["plain"] = {k: v for k, v in plain.items() if k != "levels"}
            for row in result["levels"]:
                p = plain["levels"].get(row["devices"])
                if p:
                    row["plain_stream_tokens_per_s"] = p["plain_stream_tokens_per_s"]
                    row["plain"] = p
                    row["ratio"] = _r(row["stream_tokens_per_s"] / p["plain_stream_tokens_per_s"], 4) \
                        if p["plain_stream_tokens_per_s"] else None
    result["env"]["loadavg_at_end"] = os.getloadavg()
    result["total_s"] = round(time.monotonic() - t_run, 1)
    save(result)
    return result


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in result["levels"] if r.get("stream_tokens_per_s") is not None]  # not a failed level
    if not rows:
        return
    ns = [r["devices"] for r in rows]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(12, 4.2))
    a1.plot(ns, [r["stream_tokens_per_s"] for r in rows], "o-", label="DRAGON over the link (stream tok/s)")
    a1.plot(ns, [r["answer_tokens_per_s"] for r in rows], "s--", label="DRAGON answer tok/s")
    if any(r.get("plain_stream_tokens_per_s") for r in rows):
        a1.plot(ns, [r.get("plain_stream_tokens_per_s") for r in rows], "^-", label="plain vLLM (stream tok/s)")
    for ax in (a1, a2):
        ax.set_xscale("log", base=2)
        ax.set_xticks(ns, [str(n) for n in ns])
        ax.minorticks_off()
    a1.set_yscale("log")
    a1.set_xlabel("simulated devices N")
    a1.set_ylabel("tokens / s")
    a1.legend(fontsize=8)
    a1.grid(True, which="both", alpha=0.3)
    for key, style, label in (("token_gap_ms_p50", "o-", "gap between commits p50"),
                              ("token_gap_ms_p99", "o--", "gap between commits p99"),
                              ("ttft_ms_p50", "s-", "TTFT p50"), ("ttft_ms_p99", "s--", "TTFT p99")):
        a2.plot(ns, [r.get(key) for r in rows], style, label=label)
    a2.set_yscale("log")
    a2.set_xlabel("simulated devices N")
    a2.set_ylabel("ms")
    a2.legend(fontsize=8)
    a2.grid(True, which="both", alpha=0.3)
    env = result.get("env", {})
    fig.suptitle(f"one dragon-cloud under N devices ({result['device']}, {env.get('gpu') or env.get('machine')}; "
                 f"k={result['flags']['k']}+{result['flags']['cloud_k']}, {result['flags']['max_tokens']} tokens, "
                 f"aggregator {result['flags']['aggregator']}; device compute replayed)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _default_max_num_seqs(args) -> int:
    return args.cloud_k * max(args.levels) + 16


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--levels", type=int, nargs="+", default=[1, 8, 32, 64, 128, 256], help="simulated devices N")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--k", type=int, default=4, help="private passages per device")
    ap.add_argument("--cloud-k", type=int, default=4, help="public passages (cloud streams) per request")
    ap.add_argument("--aggregator", choices=("device", "cloud"), default="device")
    ap.add_argument("--scheduling", action="store_true", help="let Greedy Scheduling move the aggregator "
                                                              "(default: pinned where --aggregator says)")
    ap.add_argument("--dist-top-k", type=int, default=20, help="the wire's top-K (and the cloud's --top-k)")
    ap.add_argument("--questions", default=os.environ.get("DRAGON_QUESTIONS") or str(DEFAULT_QUESTIONS))
    ap.add_argument("--max-questions", type=int, default=256,
                    help="distinct questions recorded (devices beyond that reuse them; recording costs one "
                         "llama.cpp answer each)")
    ap.add_argument("--index", default=None, help="public index folder (built there from --passages if missing)")
    ap.add_argument("--passages", default=os.environ.get("DRAGON_PASSAGES") or str(DEFAULT_PASSAGES))
    ap.add_argument("--index-limit", type=int, default=None, help="index only the first N passages")
    ap.add_argument("--record", choices=("device", "dragon"), default="device", help=(
        "device: greedy device-only answers on llama.cpp, recorded while the cloud starts; dragon: one real "
        "DRAGON answer per question through the cloud, then the cloud is restarted (replay stays on recorded "
        "prefixes far more often; costs the recording answers and a second cloud start)"))
    ap.add_argument("--record-concurrency", type=int, default=4, help="--record dragon: answers at a time")
    ap.add_argument("--keep-warm-cache", action="store_true",
                    help="--record dragon: do not restart the cloud after the recording (its prefix cache then "
                         "holds every question's prompts)")
    ap.add_argument("--record-top-k", type=int, default=64, help="per-document top-K kept from the recording")
    ap.add_argument("--replay-ms", type=float, default=0.0, help="emulated device decode time per step")
    ap.add_argument("--replay-prefill-ms", type=float, default=0.0, help="emulated device prefill per answer")
    ap.add_argument("--device-cores", default=None, help="pin this process and the devices, e.g. 0-3")
    ap.add_argument("--cloud-cores", default=None, help="start the cloud under taskset -c, e.g. 4-15")
    ap.add_argument("--device-procs", type=int, default=None,
                    help="device processes (default: one per device core); devices are dealt round-robin")
    ap.add_argument("--peer-timeout-s", type=float, default=3.0, help="the devices' dead-cloud deadline")
    ap.add_argument("--start-delay-s", type=float, default=1.0,
                    help="common start this long after the command (+20 ms per device: links connect first)")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--max-num-seqs", type=int, default=None, help="cloud's vLLM max_num_seqs "
                                                                   "(default cloud_k * max(levels) + 16)")
    ap.add_argument("--chunk-tokens", type=int, default=None, help="cloud's in-engine draft chunk (default: the "
                                                                    "server's)")
    ap.add_argument("--gpu-memory-utilization", type=float, default=None)
    ap.add_argument("--max-model-len", type=int, default=1024)
    ap.add_argument("--kv-cache-gib", type=float, default=None, help="CPU KV cache (VLLM_CPU_KVCACHE_SPACE)")
    ap.add_argument("--cloud-args", default="", help="more dragon-cloud serve options (one shell string)")
    ap.add_argument("--api-servers", type=int, default=1, help="the cloud's API server processes on one engine "
                                                               "core (dragon-cloud serve --api-servers; also "
                                                               "through --cloud-args)")
    ap.add_argument("--cloud-timeout-s", type=float, default=600.0)
    ap.add_argument("--level-timeout-s", type=float, default=600.0,
                    help="give up (and stop the cloud) when a level's devices have not finished this long after "
                         "their start")
    ap.add_argument("--no-plain", action="store_true", help="skip the plain vLLM ceiling")
    ap.add_argument("--device", default="cpu", help="label of the result files")
    ap.add_argument("--out", default=None, help="JSON path (default benchmarks/results/cloud_load_{device}.json)")
    args = ap.parse_args(argv)
    args.levels = sorted(set(args.levels))
    if args.max_num_seqs is None:
        args.max_num_seqs = _default_max_num_seqs(args)
    if args.cloud_k * max(args.levels) > args.max_num_seqs:
        print(f"note: {max(args.levels)} requests x {args.cloud_k} streams exceed --max-num-seqs "
              f"{args.max_num_seqs}: the cloud's admission control queues the excess", file=sys.stderr)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    # a time limit's SIGTERM unwinds like Ctrl-C: the cloud and the device processes are stopped
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    out = Path(args.out) if args.out else RESULTS / f"cloud_load_{args.device}.json"
    out.parent.mkdir(parents=True, exist_ok=True)

    def save(result: dict) -> None:
        tmp = out.with_name(out.name + ".tmp")
        tmp.write_text(json.dumps(result, indent=1) + "\n")
        tmp.replace(out)
        try:
            plot(result, out.with_suffix(".png"))
        except Exception as exc:  # a plot is no reason to lose the numbers
            print(f"plot failed: {exc!r}", file=sys.stderr)

    result = run(args, save)
    print(f"wrote {out} and {out.with_suffix('.png')} ({result['total_s']:.0f} s)")
    return result


if __name__ == "__main__":
    main()
