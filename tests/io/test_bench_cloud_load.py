"""The machine-independent parts of ``benchmarks/bench_cloud_load.py``: the replay engine (the
recorded distributions on the recorded path, the same step's off it, off-path lookups counted),
the row assembly and its percentiles, the cloud counters' deltas. No cloud, no model."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from benchmarks import bench_cloud_load as b
from dragon_core.dist import Dist
from dragon_core.engine import Engine, StreamGroup

V = 50


def dist(seed: int) -> Dist:
    return Dist.full(np.random.default_rng(seed).normal(size=V) * 3)


def recording(prompts, path, k=2) -> b.Recording:
    """Step s (prefix path[:s]), document d holds a distinct top-8 Dist (seed 100 s + d)."""
    dists = {tuple(path[:s]): [b.top_k_dist(dist(100 * s + d), 8) for d in range(k)] for s in range(len(path))}
    return b.Recording(b.prompts_key(prompts), list(path), dists)


def run(coro):
    return asyncio.new_event_loop().run_until_complete(coro)


PROMPTS = [[1, 2, 3], [1, 2, 4]]
PATH = [7, 8, 9, 10]


def same(got, want) -> bool:
    return len(got) == len(want) and all(x is y for x, y in zip(got, want))


def test_replay_is_exact_on_the_recorded_path_and_counts_nothing_off_it():
    rec = recording(PROMPTS, PATH)
    engine = b.ReplayEngine([rec], V)
    assert isinstance(engine, Engine)

    async def go():
        g = await engine.open_group(PROMPTS)
        assert isinstance(g, StreamGroup) and g.num_streams == 2
        for step, tok in enumerate(PATH):
            assert g.on_path
            assert same(await g.next_dists(), rec.dists[tuple(PATH[:step])])
            await g.append([tok])
        return g

    g = run(go())
    assert g.length == len(PATH)
    assert engine.counters.lookups == 4 and engine.counters.off_path == 0 and engine.counters.groups == 1


def test_off_path_gets_the_same_step_and_is_counted_until_a_rollback_returns_to_the_path():
    rec = recording(PROMPTS, PATH)
    engine = b.ReplayEngine([rec], V)
    step = [rec.dists[tuple(PATH[:s])] for s in range(len(PATH))]

    async def go():
        g = await engine.open_group(PROMPTS)
        await g.append([7, 99])  # step 1 differs from the recording
        assert not g.on_path
        assert same(await g.next_dists(), step[2])  # step 2, off the path: the recorded step 2
        assert engine.counters.off_path == 1 and engine.counters.past_end == 0
        await g.append([9, 10, 11])  # past the recording's end: its last step
        assert same(await g.next_dists(), step[-1])
        assert engine.counters.past_end == 1 and engine.counters.off_path == 2
        await g.rollback(1)  # back on the path: [7]
        assert same(await g.next_dists(), step[1])
        await g.append([8])
        assert same(await g.next_dists(), step[2])
        assert engine.counters.off_path == 2 and engine.counters.lookups == 4
        await g.rollback(0)
        await g.append([5])  # a different first token: everything after is off the path
        await g.next_dists()
        await g.append([8])  # matching the path again later does not put it back on it
        await g.next_dists()
        assert engine.counters.off_path == 4
        with pytest.raises(ValueError):
            await g.rollback(5)
        await g.close()
        with pytest.raises(RuntimeError):
            await g.next_dists()

    run(go())


def test_a_recorded_branch_is_exact_and_off_path_takes_the_longest_common_prefix_at_that_step():
    rec = recording(PROMPTS, PATH)
    branch = [b.top_k_dist(dist(999 + d), 8) for d in range(2)]
    rec.dists[(7, 50)] = branch  # a rejected draft's prefix, recorded in a DRAGON answer
    engine = b.ReplayEngine([rec], V)

    async def go():
        g = await engine.open_group(PROMPTS)
        await g.append([7, 50])
        assert same(await g.next_dists(), branch) and engine.counters.off_path == 0
        await g.rollback(0)
        await g.append([3, 50])  # unrecorded; at step 2 the path's (7, 8) and the branch (7, 50) share 0
        assert same(await g.next_dists(), rec.dists[(7, 8)])  # ties: the recorded path
        await g.rollback(0)
        await g.append([7, 51])  # shares 1 with both: the path again
        assert same(await g.next_dists(), rec.dists[(7, 8)])
        assert engine.counters.off_path == 2

    run(go())
    assert same(rec.nearest((9, 50))[0], rec.dists[(7, 8)])
    rec2 = recording(PROMPTS, PATH)
    rec2.dists[(7, 50)] = branch
    assert same(rec2.nearest((7, 50, 1))[0], rec2.dists[(7, 8, 9)])  # step 3: only the path has it


class FakeGroup:
    """A deterministic 'real' engine for the recording wrapper: dists depend on the prefix."""

    def __init__(self, k):
        self.k, self.gen = k, []

    num_streams = property(lambda self: self.k)
    length = property(lambda self: len(self.gen))

    async def next_dists(self):
        return [dist(sum(self.gen) * 10 + d) for d in range(self.k)]

    async def append(self, tokens):
        self.gen += list(tokens)

    async def rollback(self, length):
        del self.gen[length:]

    async def close(self):
        pass


class FakeEngine:
    vocab_size = V

    async def open_group(self, prompts, temperature=1.0):
        return FakeGroup(len(prompts))

    async def close(self):
        pass


def test_recording_engine_keeps_every_prefix_the_device_computed_and_replays_it():
    rec_engine = b.RecordingEngine(FakeEngine(), top_k=8)

    async def go():
        g = await rec_engine.open_group(PROMPTS)
        first = await g.next_dists()
        await g.append([7, 8])
        await g.next_dists()
        await g.rollback(1)
        await g.append([9])
        await g.next_dists()
        await g.close()
        return first

    first = run(go())
    rec = rec_engine.recordings[b.prompts_key(PROMPTS)]
    assert set(rec.dists) == {(), (7, 8), (7, 9)}
    assert np.array_equal(rec.dists[()][0].ids, b.top_k_dist(first[0], 8).ids)
    rec.path = [7, 9]
    replay = b.ReplayEngine([b.unpack_recording(b.pack_recording(rec))], V)

    async def again():
        g = await replay.open_group(PROMPTS)
        await g.append([7, 8])
        got = await g.next_dists()
        return got

    got = run(again())
    assert np.array_equal(got[1].ids, rec.dists[(7, 8)][1].ids) and replay.counters.off_path == 0


def test_a_group_finds_its_recording_by_its_prompts_and_unknown_prompts_are_refused():
    other = [[5, 6], [5, 7]]
    r1, r2 = recording(PROMPTS, PATH), recording(other, [3, 4])
    engine = b.ReplayEngine([r1, r2], V)

    async def go():
        g = await engine.open_group(other)
        assert g.rec is r2
        with pytest.raises(KeyError):
            await engine.open_group([[1, 2, 3]])

    run(go())


def test_replay_step_time_is_emulated():
    engine = b.ReplayEngine([recording(PROMPTS, PATH)], V, step_ms=30)

    async def go():
        g = await engine.open_group(PROMPTS)
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        await g.next_dists()
        return loop.time() - t0

    assert run(go()) >= 0.028


def test_pack_round_trip_and_top_k_of_a_full_dist():
    full = dist(3)
    top = b.top_k_dist(full, 8)
    ref = Dist.top_k(full.logprobs, 8)  # the library's own top-K (lexsort over the whole row)
    assert np.array_equal(top.ids, ref.ids) and np.array_equal(top.logprobs, ref.logprobs)
    assert top.tail_mass == pytest.approx(ref.tail_mass)
    rec = recording(PROMPTS, PATH)
    back = b.unpack_recording(b.pack_recording(rec))
    assert back.path == rec.path and back.prompts_key == rec.prompts_key
    assert list(back.dists) == list(rec.dists)
    for prefix in rec.dists:
        for x, y in zip(back.dists[prefix], rec.dists[prefix]):
            assert np.array_equal(x.ids, y.ids) and np.array_equal(x.logprobs, y.logprobs)
            assert x.tail_mass == y.tail_mass and np.allclose(x.probs(), y.probs())


def test_percentile():
    assert b.percentile([], 50) is None
    assert b.percentile([5.0], 99) == 5.0
    assert b.percentile([1, 2, 3, 4], 50) == 2.5
    assert b.percentile(list(range(101)), 99) == pytest.approx(99.0)


def test_level_row():
    answers = [
        dict(tokens=10, ttft_s=0.5, gaps_ms=[10.0] * 8, first_commit_tokens=2, acceptance_cloud=0.5,
             acceptance_device=1.0, rollbacks=2, degraded=False, final_aggregator="device"),
        dict(tokens=6, ttft_s=1.5, gaps_ms=[20.0, 40.0], first_commit_tokens=1, acceptance_cloud=1.0,
             acceptance_device=0.5, rollbacks=0, degraded=True, final_aggregator="device"),
        dict(tokens=0, error="connect: LinkUnavailable: nope"),
    ]
    row = b.level_row(3, answers, wall_s=2.0, cloud_k=4, replay=dict(lookups=20, off_path=5, past_end=1, groups=2),
                      questions=3)
    assert row["answers_ok"] == 2 and row["errors"] == 1 and row["degraded"] == 1
    assert row["answer_tokens"] == 16 and row["answer_tokens_per_s"] == 8.0 and row["stream_tokens_per_s"] == 32.0
    assert row["ttft_ms_p50"] == 1000.0 and row["ttft_ms_p99"] == pytest.approx(1490.0)
    assert row["token_gap_ms_p50"] == 10.0 and row["token_gap_ms_p99"] == pytest.approx(20 + 0.91 * 20)  # 10 gaps: rank 8.91
    # mean gap per token after the first commit: 80 / 8 and 60 / 5
    assert row["tpot_ms_p50"] == pytest.approx(11.0)
    assert row["tokens_per_commit"] == pytest.approx(16 / 12, abs=1e-3)
    assert row["acceptance_cloud_mean"] == 0.75 and row["rollbacks"] == 2 and row["rollbacks_per_answer"] == 1.0
    assert row["replay"]["off_path_fraction"] == 0.25
    assert row["final_aggregator"] == {"device": 2, "cloud": 0}
    assert row["error_messages"] == ["connect: LinkUnavailable: nope"]


def test_cloud_delta_from_two_scrapes():
    text0 = ('dragon_tokens_total{kind="link"} 5\ndragon_verified_steps_total 4\n'
             'dragon_cloud_drafts_accepted_total 2\ndragon_requests_total{kind="link",outcome="length"} 1\n')
    text1 = ('dragon_tokens_total{kind="link"} 25\ndragon_verified_steps_total 14\n'
             'dragon_cloud_drafts_accepted_total 7\ndragon_requests_total{kind="link",outcome="length"} 3\n'
             'dragon_requests_total{kind="link",outcome="eos"} 1\ndragon_rollbacks_total 3\n')
    m0, m1 = b.parse_prometheus(text0), b.parse_prometheus(text1)
    assert m1['dragon_tokens_total{kind="link"}'] == 25.0
    h0 = dict(engine=dict(prompt_tokens=100, cached_tokens=10, chunks=3))
    h1 = dict(engine=dict(prompt_tokens=300, cached_tokens=160, chunks=9, kv_blocks_capacity=900))
    d = b.cloud_delta(dict(metrics=m0, health=h0), dict(metrics=m1, health=h1))
    assert d["tokens_link"] == 20 and d["verified_steps"] == 10 and d["acceptance_cloud"] == 0.5
    assert d["link_requests_finished"] == 3 and d["rollbacks"] == 3
    assert d["prefix_cache_hit_rate"] == 0.75 and d["engine_chunks"] == 6 and d["kv_blocks_capacity"] == 900
    assert d["engine_reopens"] is None  # not exported by that engine: unknown, not zero


def test_cpu_row_and_cores_and_question_levels():
    cpu = b.cpu_row({"api": 1.0, "child:7": 10.0}, {"api": 3.0, "child:7": 14.0, "child:9": 1.0}, 2.0)
    assert cpu == dict(cloud_api_cores=1.0, cloud_children_cores=2.5, cloud_total_cores=3.5)
    assert b.parse_cores("0-3") == [0, 1, 2, 3] and b.parse_cores("4,6-7") == [4, 6, 7]
    assert b.parse_cores(None) is None
    assert b.level_questions([1, 2, 3], 4) == [[0], [1, 2], [3, 0, 1]]


def test_questions_from_nq_jsonl_tsv_and_builtin(tmp_path):
    f = tmp_path / "q.jsonl"
    f.write_text('{"question": "a?", "answer": ["x"]}\n{"question": "b?"}\n{"question": "a?"}\n')
    assert b.load_questions(f, 5) == (["a?", "b?"], str(f))
    t = tmp_path / "q.tsv"
    t.write_text("who? \t['y']\nwhat?\t['z']\n")
    assert b.load_questions(t, 1)[0] == ["who?"]
    qs, src = b.load_questions(tmp_path / "missing", 40)
    assert src == "built-in" and len(qs) == len(set(qs)) == 32


def test_the_cloud_exports_its_engine_stats_in_metrics_and_health():
    """What the benchmark reads from ``/metrics`` and ``/health``: the engine's counters, its
    admission capacity and settings (a stand-in engine: no vLLM)."""
    from types import SimpleNamespace

    from prometheus_client import generate_latest

    from dragon_vllm.metrics import CloudMetrics, engine_stats

    counters = dict(groups=3, reopens=1, prompt_tokens=100, cached_tokens=40, chunks=9, repairs=0, open_streams=4,
                    queued_groups=1, reserved_blocks=12)
    engine = SimpleNamespace(stats=lambda: dict(counters), admission=SimpleNamespace(max_blocks=900, max_slots=48),
                             mixing=True, chunk_tokens=16, logprobs_k=20, block_size=32)
    read = engine_stats(engine)
    assert read() == dict(counters, kv_blocks_capacity=900, max_streams=48, mixing=True, chunk_tokens=16, logprobs_k=20,
                          block_size=32)
    assert engine_stats(SimpleNamespace()) is None
    metrics = b.parse_prometheus(generate_latest(CloudMetrics(read).registry).decode())
    assert metrics["dragon_engine_chunks_total"] == 9 and metrics["dragon_engine_cached_tokens_total"] == 40
    assert metrics["dragon_engine_reserved_blocks"] == 12 and metrics["dragon_engine_kv_blocks_capacity"] == 900
    assert "dragon_engine_mixing" not in metrics
    counters["chunks"] = 11  # read at scrape time
    assert b.parse_prometheus(generate_latest(CloudMetrics(read).registry).decode())["dragon_engine_chunks_total"] == 11


def test_api_servers_snapshots_are_summed_over_every_process():
    """--api-servers N: each scrape reaches one process; the snapshot sums them all."""
    import itertools
    import json

    pages = {"0": ('dragon_tokens_total{api_server="0",kind="link"} 3.0\n',
                   {"api_server": 0, "link_requests": 1, "engine": {"open_streams": 2, "block_size": 32}}),
             "1": ('dragon_tokens_total{api_server="1",kind="link"} 4.0\n',
                   {"api_server": 1, "link_requests": 0, "engine": {"open_streams": 3, "block_size": 32}})}
    turn = itertools.cycle("0011")

    def get(route: str) -> bytes:
        text, health = pages[next(turn)]
        return text.encode() if route == "/metrics" else json.dumps(health).encode()

    snap = b.merged_snapshot(get, 2)
    assert snap["metrics"] == {'dragon_tokens_total{kind="link"}': 7.0}
    assert snap["health"]["link_requests"] == 1 and snap["health"]["engine"] == {"open_streams": 5, "block_size": 32}
    assert b._api_servers(["serve", "--api-servers", "4"]) == 4 and b._api_servers(["serve"]) == 1
    cpu = b.cpu_row({"api": 1.0, "api:5": 0.0, "api:6": 0.0}, {"api": 1.0, "api:5": 2.0, "api:6": 4.0}, 2.0)
    assert cpu["cloud_api_cores"] == 3.0 and cpu["cloud_api_cores_busiest"] == 2.0
