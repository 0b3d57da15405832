"""The cloud's in-engine path: gang scheduling + the mixing logits processor + chunked drafting.

* the processor's arithmetic against numpy, on a fake batch (incomplete gangs fail closed);
* on the real vLLM engine: the canonical form the gang reports is the top-K of the exact
  full-vocabulary mixture of the documents (read one by one, whole vocabulary);
* many more gangs than ``max_num_seqs / k`` at once, with and without the cloud's admission in
  front: every answer equals the same answer decoded alone, none is repaired, all finish;
* rollback and an in-flight chunk stopped early give what a fresh gang gives.
"""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
import torch

from dragon_core.dist import Dist
from e2e_world import run
from near_tie import assert_equal_up_to_a_near_tie

# ---------------------------------------------------------------------------- the processor alone
from vllm.v1.sample.logits_processor import BatchUpdate, MoveDirectionality

from dragon_vllm.mixing import GroupMixingProcessor, gang_args, group_logsumexp


class _Params:
    def __init__(self, extra):
        self.extra_args = extra


def _processor(rows: dict[int, dict | None]) -> GroupMixingProcessor:
    proc = GroupMixingProcessor(None, torch.device("cpu"), False)
    added = [(i, _Params(extra), None, []) for i, extra in rows.items()]
    proc.update_state(BatchUpdate(batch_size=len(rows), removed=[], added=added, moved=[]))
    return proc


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max()
    return x - np.log(np.exp(x).sum())


def test_processor_writes_each_complete_gangs_mixture_into_all_its_rows():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(6, 50)).astype(np.float32) * 3
    w = np.log(np.array([0.5, 0.3, 0.2]))
    rows = {0: gang_args("a", 3, 0, w[0], 0.7), 2: gang_args("a", 3, 1, w[1], 0.7), 5: gang_args("a", 3, 2, w[2], 0.7),
            1: gang_args("b", 2, 0, np.log(0.9), 1.0), 4: gang_args("b", 2, 1, np.log(0.1), 1.0), 3: None}
    out = _processor(rows).apply(torch.tensor(logits)).numpy()
    want_a = np.logaddexp.reduce([w[i] + _log_softmax(logits[r] / 0.7) for i, r in enumerate((0, 2, 5))], axis=0)
    want_b = np.logaddexp(np.log(0.9) + _log_softmax(logits[1]), np.log(0.1) + _log_softmax(logits[4]))
    for r in (0, 2, 5):
        np.testing.assert_allclose(out[r], want_a, atol=2e-5)
    for r in (1, 4):
        np.testing.assert_allclose(out[r], want_b, atol=2e-5)
    np.testing.assert_array_equal(out[3], logits[3])  # not a gang row: untouched
    assert len({int(out[r].argmax()) for r in (0, 2, 5)}) == 1


def test_an_incomplete_gang_fails_closed_and_moves_are_followed():
    logits = torch.randn(4, 10)
    proc = _processor({0: gang_args("a", 3, 0, 0.0, 1.0), 1: gang_args("a", 3, 1, 0.0, 1.0),
                       2: gang_args("b", 1, 0, 0.0, 1.0), 3: None})
    out = proc.apply(logits.clone())
    assert torch.isnan(out[0]).all() and torch.isnan(out[1]).all()  # 2 of 3 rows in this step
    assert proc.incomplete_batches == 1
    torch.testing.assert_close(out[2], torch.log_softmax(logits[2], -1))  # a gang of one: its own law
    # the batch is condensed: row 2 moves to 0, rows 0/1 leave; the processor must follow
    proc.update_state(BatchUpdate(batch_size=2, removed=[0, 1], added=[],
                                  moved=[(2, 0, MoveDirectionality.UNIDIRECTIONAL)]))
    out = proc.apply(logits[[2, 3]].clone())
    torch.testing.assert_close(out[0], torch.log_softmax(logits[2], -1))
    torch.testing.assert_close(out[1], logits[3])


def test_group_logsumexp_handles_minus_infinity():
    lp = torch.tensor([[0.0, -np.inf, -1.0], [-np.inf, -np.inf, -2.0], [-0.5, -np.inf, -np.inf]])
    got = group_logsumexp(lp, torch.tensor([0, 0, 1]), 2)
    want = torch.tensor([[0.0, -np.inf, float(np.logaddexp(-1.0, -2.0))], [-0.5, -np.inf, -np.inf]])
    torch.testing.assert_close(got, want)


# ---------------------------------------------------------------------------- on the real engine
DOCS = ["Lyon is a city in France known for its food, its silk and the Festival of Lights.",
        "The Rhone and the Saone meet in Lyon, the third largest city of France.",
        "Paris is the capital of France; the Louvre is its most visited museum."]


def _prompts(tokenizer, question: str, n: int = 3) -> list[list[int]]:
    from dragon_core.prompt import document_prompt

    return [document_prompt(tokenizer, DOCS[i % len(DOCS)], question, block_size=32) for i in range(n)]


# bf16 logits of the same position computed by two requests (prefill vs decode kernels differ):
# up to 0.11 measured at log-prob -4 on the CPU engine
NOISE_ABS, NOISE_REL = 0.05, 0.04


@pytest.fixture(scope="module")
def tokenizer(smollm2):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(smollm2.tokenizer_dir()))


async def _greedy(engine, prompts, scores, n: int) -> tuple[list[int], object]:
    group = await engine.open_group(prompts, 1.0, scores, n)
    tokens: list[int] = []
    try:
        for _ in range(n):
            tokens.append((await group.next_side_dist(20)).argmax())
            await group.append([tokens[-1]])
    finally:
        await group.close()
    return tokens, group


async def _gap_after(engine, prompts, scores, ref: list[int]):
    """``logprob_gap`` for ``assert_equal_up_to_a_near_tie``: the gang's own canonical
    distribution, decoded alone after ``ref[:k]``."""
    gaps = {}
    for k in range(len(ref)):
        group = await engine.open_group(prompts, 1.0, scores, len(ref) + 1)
        try:
            if k:
                await group.append(ref[:k])
            gaps[k] = await group.next_side_dist(20)
        finally:
            await group.close()
    return lambda k, a, b: abs(float(np.log(gaps[k].probs()[a]) - np.log(gaps[k].probs()[b])))


@pytest.mark.slow
def test_the_gangs_distribution_is_the_top_k_of_the_exact_mixture(e2e_loop, reference_engine, tokenizer):
    """Along a 12-token greedy path: the gang's canonical ``Dist`` lists the 20 most likely ids of
    the mixture of the documents' whole-vocabulary distributions, with their log-probs to float16
    precision, and the engine's token (its prediction of the draft) is the canonical argmax."""
    prompts, scores = _prompts(tokenizer, "What is Lyon famous for?"), [1.2, 0.4, -0.3]
    w = np.exp(np.array(scores) - np.logaddexp.reduce(scores))

    async def check():
        # one after the other, so both see the same batch shapes (bf16 logits depend on them)
        gang = await reference_engine.open_group(prompts, 1.0, scores, 12)
        path, dists, drafted = [], [], []
        try:
            for _ in range(12):
                got = await gang.next_side_dist(20)
                dists.append(got)
                drafted.append(gang._rows[0].tokens[len(gang._generated) - gang._base])  # the engine's own token
                path.append(got.argmax())
                await gang.append([path[-1]])
            assert gang.served_from_chunk >= 9 and gang.repairs == 0
        finally:
            await gang.close()
        docs = await reference_engine.open_group(prompts, 1.0, doc_top_k=-1)
        try:
            for step, (got, token) in enumerate(zip(dists, path)):
                exact = sum(wd * d.probs() for wd, d in zip(w, await docs.next_dists()))
                lp_exact = np.log(exact)
                bound = NOISE_ABS + NOISE_REL * np.abs(lp_exact[got.ids])
                assert np.all(np.abs(got.logprobs.astype(np.float64) - lp_exact[got.ids]) <= bound), step
                kth = np.sort(lp_exact)[-20]  # every listed id is among the exact top 20, up to the noise
                assert np.all(lp_exact[got.ids] >= kth - NOISE_ABS - NOISE_REL * abs(kth)), step
                assert abs(got.tail_mass - (1 - np.exp(got.logprobs.astype(np.float64)).sum())) < 1e-9
                assert drafted[step] == token, f"step {step}: the engine drafted another token"
                first, second = np.sort(lp_exact)[-2:][::-1]
                if first - second > 2 * NOISE_ABS:  # a near-tie may flip under bf16 noise
                    assert token == int(np.argmax(exact)), step
                await docs.append([token])
        finally:
            await docs.close()

    run(e2e_loop, check())


@pytest.mark.slow
@pytest.mark.parametrize("admission", ["cloud", "none"])
def test_more_gangs_than_seats_all_finish_each_as_if_alone(e2e_loop, reference_engine, tokenizer, admission):
    """24 gangs of 3 streams on an engine of 32 seats (10 gangs fit): with the cloud's admission
    queueing them, and with it removed so the gang scheduler alone holds whole gangs back. Each
    answer equals the same answer decoded alone, no gang is ever repaired (a split gang would be:
    its rows get NaN), all finish."""
    from dragon_vllm.admission import Admission

    questions = [f"Tell me about city number {i}?" for i in range(24)]
    requests = [(_prompts(tokenizer, q), [1.0, 0.2 * (i % 4), -0.3]) for i, q in enumerate(questions)]

    async def check():
        alone = [(await _greedy(reference_engine, p, s, 10))[0] for p, s in requests[:4]]
        saved = reference_engine.admission
        if admission == "none":
            reference_engine.admission = Admission(10_000, 10**9)
        try:
            results = await asyncio.wait_for(
                asyncio.gather(*(_greedy(reference_engine, p, s, 10) for p, s in requests)), 600)
        finally:
            reference_engine.admission = saved
        for i, (tokens, _) in enumerate(results[:4]):
            # bf16 logits on CPU depend on the batch: equal to decoding alone, up to a near tie
            prompts, scores = requests[i]
            gap = await _gap_after(reference_engine, prompts, scores, alone[i])
            assert_equal_up_to_a_near_tie(tokens, alone[i], gap, f"gang {i} among 24")
        assert all(len(tokens) == 10 for tokens, _ in results)
        assert sum(group.repairs for _, group in results) == 0

    run(e2e_loop, check())


@pytest.mark.slow
@pytest.mark.parametrize("chunk_tokens", [0, 4])
def test_rollback_and_a_chunk_stopped_early_give_what_a_fresh_gang_gives(e2e_loop, reference_engine, tokenizer,
                                                                         chunk_tokens, monkeypatch):
    """Open-ended drafting (the default) and fixed chunks of 4 (the path crosses chunk
    boundaries, continued by feeding the session's tokens)."""
    monkeypatch.setattr(reference_engine, "chunk_tokens", chunk_tokens)
    prompts, scores = _prompts(tokenizer, "What is Lyon famous for?"), [0.5, 0.1, 0.0]

    async def dist_after(tokens: list[int]) -> Dist:
        group = await reference_engine.open_group(prompts, 1.0, scores, 16)
        try:
            await group.append(tokens)
            return await group.next_side_dist(20)
        finally:
            await group.close()

    async def check():
        path, _ = await _greedy(reference_engine, prompts, scores, 10)
        group = await reference_engine.open_group(prompts, 1.0, scores, 16)
        try:
            for t in path[:6]:
                await group.next_side_dist(20)
                await group.append([t])
            await group.rollback(3)  # a rejected draft: back to 3 tokens, then another token
            detour = (path[3] + 1) % reference_engine.vocab_size
            await group.append([detour])
            got = await group.next_side_dist(20)
            want = await dist_after(path[:3] + [detour])
            assert got.argmax() == want.argmax()
            np.testing.assert_allclose(got.logprobs.astype(float), want.logprobs.astype(float), rtol=1e-3, atol=2e-4)
            # the chunk now in flight drafts from `detour`; leaving its path stops it at once
            before, in_flight = group.reopens, not group._chunk_done()
            await group.append([path[4]])
            if in_flight:
                assert group._rows is None, "the in-flight chunk was not stopped"
            got = await group.next_side_dist(20)
            assert group.reopens == before + 1
            want = await dist_after(path[:3] + [detour, path[4]])
            assert got.argmax() == want.argmax()
        finally:
            await group.close()

    run(e2e_loop, check())


@pytest.mark.slow
def test_a_gang_that_lost_a_row_sits_out_instead_of_decoding_split(e2e_loop, reference_engine, tokenizer):
    """A gang is closed row by row, and the engine can step between two rows' aborts. The rows
    left must not be scheduled: before, they went on decoding as a split gang (NaN logits, an
    error logged per step). Here one row of a gang decoding a long chunk is aborted alone; the
    others get at most the tokens already in flight, then nothing, and closing the gang still
    works and frees everything (the next gang decodes as usual)."""
    prompts, scores = _prompts(tokenizer, "What is Lyon famous for?"), [1.2, 0.4, -0.3]

    async def check():
        gang = await reference_engine.open_group(prompts, 1.0, scores, 400)
        try:
            await gang.next_side_dist(20)
            await asyncio.sleep(0.3)  # the chunk decodes on by itself (no round trip per token)
            before = [len(r.tokens) for r in gang._rows]
            assert before[0] >= 2, "the chunk should be decoding ahead"
            await reference_engine.llm.abort(f"{gang._gang}-1")
            held = await _settled(gang, timeout_s=5.0)  # the abort reached the engine; in-flight tokens landed
            await asyncio.sleep(1.5)  # a split gang would decode dozens of tokens meanwhile
            after = [len(r.tokens) for r in gang._rows]
            assert held is not None, f"the rows left kept decoding: {before} -> {after}"
            assert after[0] == held[0] and after[2] == held[2], (before, held, after)
        finally:
            await gang.close()
        tokens, group = await _greedy(reference_engine, prompts, scores, 4)
        assert len(tokens) == 4 and group.repairs == 0

    run(e2e_loop, check())


async def _settled(gang, timeout_s: float) -> list[int] | None:
    """The rows' token counts once two samples 0.3 s apart agree (None: still growing at the timeout)."""
    last = [len(r.tokens) for r in gang._rows]
    for _ in range(int(timeout_s / 0.3)):
        await asyncio.sleep(0.3)
        now = [len(r.tokens) for r in gang._rows]
        if now == last:
            return now
        last = now
    return None
