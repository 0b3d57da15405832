"""CONCORD end to end (issue 14; docs/CONCORD.md): the device runtime (llama.cpp, the private
store) and the shared real ``dragon-cloud serve`` (vLLM) over the netem proxies of
e2e_world.py, in ``mode="concord"``.

* exactness over the real link: with ``concord_debt_max = inf`` every step consults the cloud,
  and the answer equals dense greedy DRAGON token for token: the independent centralized formula
  (full vectors, RTT 50 and 300 ms, on the question the public passages decide) and the same
  question answered in mode ``dragon`` over the same link (top-32);
* the settings' two extremes and the default: ``-inf`` is the device-only answer with no
  evidence request; the counters add up (certified + dense + local = tokens, consulted =
  certified + dense) in every run, and the link's bytes per token are reported;
* sampling is refused with a typed ``InvalidOptions`` before anything starts (SDK runtime and
  the SDK client), the cloud sees no request;
* privacy on the captured bytes (test_privacy_e2e.py's capture, parser and needles): up go only
  ``Hello``/``Open``/``Tokens``/``EvidenceRequest``/``Ping``/``Pong``/``Cancel``; no private text,
  token window, embedding or file name in either direction; the device's ``log h`` and its
  mixture's values never go up;
* a link cut mid-answer: the device finishes locally, flagged degraded, its first tokens the
  uncut answer's.
"""

from __future__ import annotations

import math
import struct

import numpy as np
import pytest

from benchmarks.netem import Shape, cut_proxy, spawn_proxy, stop_proxy
from dragon_core import codec
from dragon_core import messages as m
from dragon_core.errors import InvalidOptions
from e2e_world import LONG_QUESTION, MAX_TOKENS, PUBLIC_QUESTION, ask, options, run
from test_e2e import close_sides, open_sides
from test_privacy_e2e import Row, capture, leaks, private  # noqa: F401 (fixtures)
import independent

pytestmark = pytest.mark.slow
INF = math.inf


@pytest.fixture(scope="module")
def loop(e2e_loop):
    return e2e_loop


@pytest.fixture(scope="module")
def dense_answers(loop, runtime, world, reference_engine):
    """PUBLIC_QUESTION's centralized greedy answer from the independent formula (full vectors),
    and the device-only answer (so that equality with the reference means the cloud counted)."""
    async def build():
        opts = options(dist_top_k=0)
        groups = await open_sides(runtime, world[1], reference_engine, opts, PUBLIC_QUESTION)
        try:
            want = await independent.greedy(groups, 0, MAX_TOKENS, runtime.eos_ids)
        finally:
            await close_sides(groups)
        alone, _ = await ask(runtime, None, opts, question=PUBLIC_QUESTION)
        return want, alone

    return run(loop, build())


def check_counts(stats, ids, consulted: bool = True) -> None:
    """``consulted``: the answer waited on the cloud at least once, so frames came down for it
    (one that never waits may finish before the cloud's first frame arrives)."""
    assert stats.mode == "concord"
    assert stats.steps_certified + stats.steps_dense + stats.steps_local == stats.tokens == len(ids), stats
    assert stats.steps_consulted == stats.steps_certified + stats.steps_dense
    assert 0 <= stats.steps_supplemented <= stats.steps_consulted
    assert stats.evidence_requests >= stats.steps_supplemented
    assert stats.waited_ms >= 0 and stats.bytes_sent > 0 and (stats.bytes_received > 0 or not consulted)
    assert stats.as_dict()["bytes_per_token"] == (stats.bytes_sent + stats.bytes_received) / len(ids)
    assert stats.aggregator_steps == {"device": len(ids)} and stats.rollbacks == 0


@pytest.mark.parametrize("rtt", [50, 300])
def test_concord_at_infinite_debt_equals_dense_greedy_over_the_real_link(loop, runtime, proxies, dense_answers, rtt):
    want, alone = dense_answers
    frames: list = []
    ids, stats = run(loop, ask(runtime, proxies[rtt], options(mode="concord", concord_debt_max=INF, dist_top_k=0),
                               frames, question=PUBLIC_QUESTION))
    assert not stats.degraded and not stats.device_only
    assert ids == want, f"concord at RTT {rtt} ms diverged from dense greedy"
    assert ids != alone  # the cloud's evidence changed the answer
    check_counts(stats, ids)
    assert stats.steps_local == 0 and stats.steps_consulted == len(ids)
    up = [codec.decode(f) for d, f in frames if d == "up"]
    assert [t for x in up if isinstance(x, m.Tokens) for t in x.tokens] == ids  # every commit went up
    assert all(isinstance(x, (m.Hello, m.Open, m.Tokens, m.EvidenceRequest, m.Ping, m.Pong, m.Cancel)) for x in up), \
        sorted({type(x).__name__ for x in up})
    down = [codec.decode(f) for d, f in frames if d == "down"]
    assert any(isinstance(x, m.Evidence) for x in down)


def test_concord_at_infinite_debt_equals_dragon_mode_top32(loop, runtime, proxies):
    """The same question answered in mode dragon and in mode concord (top-32 canonical
    mixtures, the default wire form) over the same link: the same tokens."""
    dragon, dstats = run(loop, ask(runtime, proxies[50], options(mode="dragon", aggregator="device", dist_top_k=32),
                                   question=PUBLIC_QUESTION))
    concord, cstats = run(loop, ask(runtime, proxies[50], options(mode="concord", concord_debt_max=INF, dist_top_k=32),
                                    question=PUBLIC_QUESTION))
    assert not dstats.degraded and not cstats.degraded
    assert concord == dragon
    check_counts(cstats, concord)
    assert cstats.steps_local == 0
    assert dstats.steps_certified is None  # the counters are CONCORD's only
    # CONCORD's bytes per token are far below DRAGON's top-32 drafts
    assert cstats.bytes_per_token < dstats.bytes_per_token / 3, (cstats.bytes_per_token, dstats.bytes_per_token)


def test_concord_never_waiting_is_the_device_only_answer(loop, runtime, proxies, dense_answers):
    _, alone = dense_answers
    frames: list = []
    ids, stats = run(loop, ask(runtime, proxies[50], options(mode="concord", concord_debt_max=-INF, dist_top_k=0),
                               frames, question=PUBLIC_QUESTION))
    assert ids == alone and not stats.degraded
    check_counts(stats, ids, consulted=False)
    assert stats.steps_local == len(ids) and stats.evidence_requests == 0
    assert not any(isinstance(codec.decode(f), m.EvidenceRequest) for d, f in frames if d == "up")


def test_concord_default_debt_counts_add_up(loop, runtime, proxies):
    ids, stats = run(loop, ask(runtime, proxies[50], options(mode="concord", dist_top_k=32), question=PUBLIC_QUESTION))
    assert not stats.degraded and ids
    check_counts(stats, ids)
    assert stats.steps_consulted >= 1  # the debt starts at 0: the first step waits


def test_concord_with_sampling_is_refused_before_anything_starts(loop, runtime, cloud):
    from dragon_edge.link import CloudLink
    from dragon_edge.sdk import AsyncDragonClient
    from e2e_world import TOKEN

    before = cloud.health().get("link_requests")
    opts = options(mode="concord", greedy=False, temperature=0.7)

    link = CloudLink(cloud.url, runtime.identity, TOKEN)

    async def answer():
        runtime.link = link
        try:
            async for _ in runtime.answer(PUBLIC_QUESTION, opts):
                pass
        finally:
            await link.close()

    with pytest.raises(InvalidOptions) as exc:
        run(loop, answer())
    assert exc.value.param == "temperature" and "greedy" in str(exc.value)
    assert link.welcome is None  # refused before the link was even connected

    async def sdk():
        client = AsyncDragonClient(cloud_url=cloud.url, auth_token=TOKEN)
        try:
            await client.chat.completions.create(messages=[{"role": "user", "content": "hi"}], temperature=0.7,
                                                 mode="concord")
        finally:
            await client.close()

    with pytest.raises(InvalidOptions):
        run(loop, sdk())
    assert cloud.health().get("link_requests") == before


# ---------------------------------------------------------------------------- privacy on the bytes
CONCORD_ROW = Row("concord", dict(mode="concord", concord_debt_max=INF))
CONCORD_DEFAULT_ROW = Row("concord-default", dict(mode="concord"))


@pytest.mark.parametrize("row", [CONCORD_ROW, CONCORD_DEFAULT_ROW], ids=lambda r: r.id)
def test_concord_privacy_on_the_captured_bytes(capture, private, runtime, row):
    cap = capture(row)
    assert not cap.stats.degraded and cap.stats.steps_consulted >= 1
    up = cap.up_messages()
    assert all(isinstance(x, (m.Hello, m.Open, m.Tokens, m.EvidenceRequest, m.Ping, m.Pong, m.Cancel)) for x in up), \
        sorted({type(x).__name__ for x in up})
    assert [t for x in up if isinstance(x, m.Tokens) for t in x.tokens] == cap.ids
    up_payloads = b"".join(c["up"].payloads for c in cap.conns.values())
    up_raw = b"".join(c["up"].raw for c in cap.conns.values())
    assert row.question.encode() in up_payloads and row.question.encode() not in up_raw  # positive control
    _, needles = private
    # The Tokens frames carry the committed answer, which this mode sends up by design (the
    # cloud computes on it; asserted above to be exactly the answer's ids): an answer quoting a
    # private note shows that quote, as DRAGON's drafts do. Everything else is searched.
    answer_frames = tuple(f for c in cap.conns.values() for f in c["up"].binary if isinstance(codec.decode(f), m.Tokens))
    found = leaks(cap, needles, without=answer_frames)
    assert not found, f"{len(found)} private needles on the wire in {row.id}:\n" + "\n".join(found[:40])
    # the device's mixture values and its log h never go up: every per-document distribution the
    # device's engine computed, and the side's retrieval mass, as f16/f32/f64 in both byte orders
    down_ev = [codec.decode(f) for c in cap.conns.values() for f in c["down"].binary]
    assert any(isinstance(x, m.Evidence) for x in down_ev)  # the evidence came down (the control side)
    values = set()
    for doc in cap.per_doc:
        p = doc.probs()
        for v in np.sort(p)[-4:]:
            if v > 1e-3:
                values.add(float(v))
    passages = runtime.private_passages(row.question, 2)
    log_h = float(np.log(np.sum(np.exp([p.score for p in passages]))))
    needles_bin = set()
    for v in [*values, log_h]:
        for fmt in ("<e", ">e", "<f", ">f", "<d", ">d"):
            try:
                b = struct.pack(fmt, v)
            except OverflowError:
                continue
            if len(b) >= 4:  # a 2-byte float16 would match random payload bytes by chance
                needles_bin.add(b)
    assert values and not any(b in up_payloads for b in needles_bin)


# ---------------------------------------------------------------------------- a lost cloud
def test_concord_link_cut_mid_answer_finishes_locally_degraded(loop, runtime, cloud):
    opts = options(mode="concord", concord_debt_max=INF, dist_top_k=32, max_tokens=40)
    proc, port = spawn_proxy(("127.0.0.1", cloud.port), up=Shape(latency_ms=25), down=Shape(latency_ms=25))
    try:
        full, fstats = run(loop, ask(runtime, f"http://127.0.0.1:{port}", opts, question=LONG_QUESTION))
    finally:
        stop_proxy(proc)
    assert not fstats.degraded and fstats.finish_reason == "length"  # still decoding when the cut comes
    cloud.wait_idle()
    proc, port = spawn_proxy(("127.0.0.1", cloud.port), up=Shape(latency_ms=25), down=Shape(latency_ms=25))
    try:
        ids, stats = run(loop, ask(runtime, f"http://127.0.0.1:{port}", opts, question=LONG_QUESTION,
                                   hook=lambda: cut_proxy(proc)))
    finally:
        stop_proxy(proc)
    assert stats.degraded and stats.finish_reason in ("eos", "length")
    check_counts(stats, ids)
    assert stats.steps_consulted >= 2 and stats.steps_local >= 1
    n = stats.steps_consulted  # the consulted steps come first (the cloud is never back): dense greedy
    assert ids[:n] == full[:n]
