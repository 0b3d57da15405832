"""Iterative retrieval end to end (issue 16): the real `dragon-cloud serve` retrieves again from its
public index every n tokens and swaps its vLLM streams, the device does the same over its private
store, and the answer equals the centralized reference that retrieves at the same boundaries
(``iterative_generate``: llama.cpp for the private passages, an in-process vLLM for the public),
token for token, with the aggregator on either side and over a slow link (rollbacks across
boundaries)."""

from __future__ import annotations

import asyncio

import pytest

from dragon_core import iterative
from dragon_core import messages as m
from dragon_core import session as s
from dragon_core.prompt import passage_prompts
from dragon_core.testing.reference import iterative_generate
from dragon_host.documents import Documents
from e2e_world import QUESTION, ask, options, reference, run

pytestmark = [pytest.mark.slow, pytest.mark.llamacpp]

EVERY = 4


async def iterative_reference(runtime, index, reference_engine, opts, question: str) -> list[int]:
    temperature = 1.0 if opts.greedy else opts.temperature

    def query(prefix) -> str:
        return iterative.query(question, runtime.tokenizer.decode(list(prefix), skip_special_tokens=True))

    def documents(passages) -> Documents:
        return Documents(tuple(p.id for p in passages), tuple(float(p.score) for p in passages), passages)

    def prompts(docs):
        return passage_prompts(runtime.tokenizer, question, [p.text for p in docs.payload], list(docs.scores))[0]

    class Device:  # llama.cpp, as the device runs its private passages
        async def retrieve(self, prefix):
            return documents(runtime.private_passages(query(prefix), opts.k))

        async def open(self, docs):
            return await runtime.engine.open_group(prompts(docs), temperature)

    class Cloud:  # an in-process vLLM gang, as the server runs its public passages
        async def retrieve(self, prefix):  # the cloud's iterative retrieval: top-20, canonical scores
            return documents(index.search_vector(index.embed_query(query(prefix)), 20)[: opts.cloud_k])

        async def open(self, docs):
            return await reference_engine.open_group(prompts(docs), temperature, list(docs.scores), opts.max_tokens)

    config = s.SessionConfig(request_id=0, max_tokens=opts.max_tokens, seed=opts.seed, eos_ids=runtime.eos_ids,
                             sampling=m.Sampling(opts.greedy, opts.temperature, opts.top_k, opts.top_p),
                             dist_top_k=opts.dist_top_k, retrieve_every=opts.retrieve_every)
    return await iterative_generate(config, [Device(), Cloud()], opts.retrieve_every)


@pytest.fixture(scope="module")
def iterative_answers(e2e_loop, runtime, world, reference_engine):
    """The demo question's iterative reference, the one-retrieval reference, and the queries'
    retrieved passages at the boundaries (so the test knows the documents really moved)."""
    opts = options(retrieve_every=EVERY)
    want = run(e2e_loop, iterative_reference(runtime, world[1], reference_engine, opts, QUESTION))
    once = run(e2e_loop, reference(runtime, world[1], reference_engine, options()))
    moved = set()
    for b in range(EVERY, len(want), EVERY):
        q = iterative.query(QUESTION, runtime.tokenizer.decode(want[:b], skip_special_tokens=True))
        moved.add((tuple(p.source for p in runtime.private_passages(q, 2)),
                   tuple((p.source, round(p.score, 4)) for p in world[1].search(q, 2))))
    return want, once, moved


def test_the_documents_move_at_the_boundaries(iterative_answers):
    """Power: the boundaries' queries retrieve other passages or other scores than the question
    alone, so an answer that ignored them would use other weights."""
    want, once, moved = iterative_answers
    assert len(want) > 2 * EVERY and len(moved) >= 2, moved


VARIANTS = {"dragon": dict(mode="dragon", aggregator="device"),
            "dragon-aggregator-on-cloud": dict(mode="dragon", aggregator="cloud")}


@pytest.mark.parametrize("rtt", [0, 300])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_iterative_retrieval_across_the_wire_equals_the_iterative_reference(e2e_loop, runtime, proxies,
                                                                           iterative_answers, rtt, variant):
    want, _, _ = iterative_answers
    ids, stats = run(e2e_loop, ask(runtime, proxies[rtt], options(retrieve_every=EVERY, **VARIANTS[variant])))
    assert not stats.degraded and not stats.device_only
    assert ids == want, f"{variant} at RTT {rtt} ms diverged"
    assert stats.retrievals >= (len(ids) - 1) // EVERY  # the device retrieved again at every boundary


def test_a_bad_retrieve_every_is_refused_before_any_work(e2e_loop, runtime, proxies):
    from dragon_core.errors import InvalidOptions

    for bad in (dict(retrieve_every=-1), dict(retrieve_every=2, mode="concord"), dict(retrieve_every=1.5)):
        with pytest.raises(InvalidOptions, match="retrieve_every"):
            run(e2e_loop, ask(runtime, proxies[0], options(**bad)))


def test_the_cloud_speculated_its_boundaries_from_the_request_cache(e2e_loop, runtime, cloud, proxies):
    """RaLMSpec on the served cloud (on by default): the demo's four public passages all sit in
    the request's cache after its first retrieval, so every boundary was speculated, and right."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    def counts() -> dict[str, float]:
        with urllib.request.urlopen(f"{cloud.url}/metrics", timeout=5) as r:
            text = r.read().decode()
        return {s.labels["kind"]: s.value for f in text_string_to_metric_families(text) for s in f.samples
                if s.name == "dragon_iterative_retrievals_total"}

    before = counts()
    ids, stats = run(e2e_loop, ask(runtime, proxies[0], options(retrieve_every=EVERY)))
    boundaries = (len(ids) - 1) // EVERY
    for _ in range(100):  # the cloud counts once its session closed, a moment after the device
        after = counts()
        if after.get("speculated", 0) - before.get("speculated", 0) >= boundaries:
            break
        e2e_loop.run_until_complete(asyncio.sleep(0.1))
    delta = {k: after.get(k, 0) - before.get(k, 0) for k in ("speculated", "speculated_right", "speculated_wrong",
                                                              "retrievals")}
    assert delta["speculated"] >= boundaries >= 2 and delta["speculated_wrong"] == 0, delta
    assert delta["speculated_right"] == delta["speculated"] <= delta["retrievals"], delta
