"""CONCORD (mode "concord") over the real link: real sockets, the device's ``CloudLink``, the
cloud's ``LinkServer`` and both sides' ``SessionDriver`` on the fake stream groups of
``test_link``. The host layers carry it unchanged (the connection routes the two new frames, the
cloud runs the mode's session): with ``D_max = inf`` each of several concurrent answers equals
centralized greedy aggregation, ``-inf`` is the device's own decode, and a cloud that goes away
mid-answer leaves a degraded answer finished locally. (No host passes the clock yet: waits are
counted as one RTT estimate each, docs/CONCORD.md.)"""

from __future__ import annotations

import asyncio
import math

from dragon_core import messages as m
from dragon_core import session as s
from dragon_core.testing.reference import solo_decode
from dragon_edge.link import CloudLink
from fakes import EOS, side_spec
from test_link import DEV_DOCS, DEV_SCORES, IDENTITY, TOKEN, FakeBackend, ask, central, cloud_server

INF = math.inf


def test_concurrent_concord_answers_over_the_link_are_dense_greedy_or_device_only_as_set():
    cases = [(0, INF), (1, INF), (2, 4.0), (3, -INF)]

    async def main():
        backend = FakeBackend()
        async with cloud_server(backend) as (server, url):
            async with CloudLink(url, IDENTITY, TOKEN) as link:
                results = await asyncio.gather(*(ask(link, dict(max_tokens=18, mode="concord", concord_debt_max=d),
                                                     world=w) for w, d in cases))
            await asyncio.sleep(0.05)
            assert server.active_requests == 0 and all(g.closed for g in backend.groups)
        return results

    results = asyncio.run(main())
    for (world, debt_max), (tokens, finish, session) in zip(cases, results):
        stats = session.stats
        assert not finish.degraded and finish.reason in ("eos", "length")
        assert len(stats.concord_by_step) == len(tokens)
        if debt_max == INF:
            assert tokens == central(world, 18) and stats.steps_local == 0
        if debt_max == -INF:
            config = s.SessionConfig(request_id=0, max_tokens=18, seed=world, eos_ids=frozenset({EOS}), mode="concord")
            assert tokens == solo_decode(config, side_spec(DEV_DOCS, DEV_SCORES, world), "device")
            assert stats.steps_local == len(tokens) and stats.evidence_requests == 0


def test_cloud_lost_mid_concord_answer_device_finishes_locally_flagged_degraded():
    async def main():
        backend = FakeBackend(delay_s=0.01)
        async with cloud_server(backend) as (server, url):
            async with CloudLink(url, IDENTITY, TOKEN) as link:
                task = asyncio.create_task(ask(link, dict(max_tokens=40, mode="concord", concord_debt_max=INF),
                                               delay_s=0.01))
                await asyncio.sleep(0.15)
                await server.close_all()  # the cloud goes away mid-answer
                return await task

    tokens, finish, session = asyncio.run(main())
    by_step = session.stats.concord_by_step
    consulted = len(by_step) - by_step.count("local")
    assert finish.degraded and finish.reason in ("eos", "length") and 0 < consulted < len(tokens)
    assert "local" not in by_step[:consulted]  # consulted until the loss, local after it
    assert tokens[:consulted] == central(0, 40)[:consulted]
    config = s.SessionConfig(request_id=0, max_tokens=40, seed=0, eos_ids=frozenset({EOS}), mode="concord")
    assert tokens == solo_decode(config, side_spec(DEV_DOCS, DEV_SCORES, 0), "device", tuple(tokens[:consulted]))


def test_only_token_ids_and_evidence_requests_go_up():
    """The device's messages of a CONCORD answer, as it handed them to the link: the Open, then
    only its committed token ids and evidence requests (no ``Draft``, no distribution)."""
    sent: list[m.Message] = []

    async def main():
        async with cloud_server(FakeBackend()) as (_, url):
            async with CloudLink(url, IDENTITY, TOKEN) as link:
                original = link.send

                async def tapped(msg):
                    sent.append(msg)
                    return await original(msg)  # the link reports whether it could write

                link.send = tapped
                return await ask(link, dict(max_tokens=18, mode="concord", concord_debt_max=INF), world=1)

    tokens, finish, _ = asyncio.run(main())
    assert not finish.degraded  # the cloud took part
    assert [type(msg) for msg in sent].count(m.Open) == 1  # the request itself (query and settings)
    assert {type(msg) for msg in sent} <= {m.Open, m.Tokens, m.EvidenceRequest}
    assert [t for msg in sent if isinstance(msg, m.Tokens) for t in msg.tokens] == tokens
