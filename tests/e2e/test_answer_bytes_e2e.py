"""Two answers at once on one real link (the shared e2e world: a real ``dragon-cloud serve`` and
the llama.cpp device): each answer's ``bytes_sent`` / ``bytes_received`` are its own frames.

The device's link tap sees every frame; a frame belongs to the answer whose request id it
carries. When an answer releases its request, the tap's count for that id so far is what the
answer's stats must say, exactly. Counting the link's traffic while an answer ran (the old way)
gives each answer the other's frames and the pings too, and fails this test.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict

import pytest

from dragon_core import codec
from dragon_core import messages as m
from dragon_core.connection import Traffic
from dragon_edge.link import CloudLink
from e2e_world import PUBLIC_QUESTION, QUESTION, TOKEN, options, run

pytestmark = pytest.mark.slow


async def answer(runtime, question: str, opts):
    ids, stats = [], None
    async for piece in runtime.answer(question, opts):
        ids.extend(piece.token_ids)
        stats = piece.finished or stats
    return ids, stats


def by_request(frames: list[tuple[str, bytes]]) -> dict[int | None, Traffic]:
    """The tap's frames counted by the request id they carry (None: pings, the Hello, ...)."""
    counts: dict[int | None, Traffic] = defaultdict(Traffic)
    for direction, frame in frames:
        rid = getattr(codec.decode(frame), "request_id", None)
        if direction == "up":
            counts[rid].sent += len(frame)
        else:
            counts[rid].received += len(frame)
    return counts


def test_two_concurrent_answers_on_one_link_each_count_only_their_own_frames(e2e_loop, runtime, cloud):
    async def main():
        link = CloudLink(cloud.url, runtime.identity, TOKEN)
        frames: list[tuple[str, bytes]] = []
        link.tap = lambda direction, frame: frames.append((direction, bytes(frame)))
        at_release: dict[int, Traffic] = {}
        real_release = link.release

        def release(rid: int) -> Traffic:  # what the wire carried for this request when it let go
            at_release[rid] = by_request(frames)[rid]
            return real_release(rid)

        link.release = release
        before, runtime.link = runtime.link, link
        try:
            # one answer aggregates on the device, the other on the cloud: drafts go both ways
            results = await asyncio.gather(
                answer(runtime, QUESTION, options(dist_top_k=32, aggregator="device")),
                answer(runtime, PUBLIC_QUESTION, options(dist_top_k=32, aggregator="cloud")))
        finally:
            await link.close()
            runtime.link = before
        return results, at_release, frames

    ((ids_a, a), (ids_b, b)), at_release, frames = run(e2e_loop, main())
    for ids, stats in ((ids_a, a), (ids_b, b)):
        assert ids and not stats.degraded and not stats.device_only, stats
    opens = [msg for d, f in frames if d == "up" and isinstance(msg := codec.decode(f), m.Open)]
    queries = {msg.query: msg.request_id for msg in opens}
    rid_a, rid_b = queries[QUESTION], queries[PUBLIC_QUESTION]
    # the two answers really shared the link: their frames interleave on the wire
    order = [getattr(codec.decode(f), "request_id", None) for _, f in frames]
    order = [rid for rid in order if rid in (rid_a, rid_b)]
    switches = sum(x != y for x, y in zip(order, order[1:]))
    assert switches >= 3, f"the answers did not overlap ({switches} switches)"
    # each answer's stats are exactly its own frames, both ways
    assert (a.bytes_sent, a.bytes_received) == (at_release[rid_a].sent, at_release[rid_a].received) != (0, 0)
    assert (b.bytes_sent, b.bytes_received) == (at_release[rid_b].sent, at_release[rid_b].received) != (0, 0)
    # and together they are the link's request traffic: all of it up (the device sends nothing
    # for a request it has released); down, all but what arrived after an answer let go
    wire = by_request(frames)
    assert a.bytes_sent + b.bytes_sent == wire[rid_a].sent + wire[rid_b].sent
    assert a.bytes_received + b.bytes_received <= wire[rid_a].received + wire[rid_b].received
    assert wire[None].sent > 0  # the Hello and the pings are the link's, in no answer's count
