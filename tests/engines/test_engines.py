"""Device engines (llama.cpp, transformers) and the prompt layout, on the real SmolLM2 model.

Tolerances, and why:
* llama.cpp: **bit for bit**. With flash attention and 32-token physical batches its logits do
  not depend on how tokens were batched (dragon_edge/engines/llamacpp.py), so a group after any
  append/rollback history equals a fresh group opened on the whole context exactly.
* transformers (float32 compute): max |Δ log p| <= 1e-3 over the whole vocabulary. A fresh run
  computes the context as one prefill, the group as several smaller steps: different matmul
  shapes sum in a different order (float32 rounding, ~5e-5 observed).
* our llama.cpp engine (``load_engine("llamacpp")``, the runtime's factory) vs transformers on
  the SAME GGUF (its Q4_1 / Q8_0 blocks dequantised to float32, float32 compute): same weights,
  different arithmetic. llama.cpp quantises every activation vector to 8 bits (Q8_1 blocks of
  32, scale max|x|/127) before each Q4_1 matmul (Q8_0 for the tied output layer) and keeps the
  KV cache in f16. SmolLM2's residual stream has outlier features of a few hundred, so a
  block holding one rounds its other 31 values coarsely: the logits move by ~0.15 nats (std
  over the vocabulary). Emulating that rounding in transformers moves its logits by the same
  amount but does not reproduce llama.cpp's (the rounding noise is chaotic), so the bound is
  the noise itself, measured on x86-64 (AVX-512, llama.cpp built without AMX), 8 streams x 16
  steps = 128 rows per prompt set, on five prompt sets: this module's prompts with the KV-block
  padding in each place dragon_core.prompt has used or bench_padding compares (after the
  document, after "Document:", between the system and the user turn = the shipped layout, at
  the very start) and unpadded (the template's own tokens), 640 rows. The noise is chaotic in
  the prompt, so one set's maximum is not the next one's: the bounds were first set on the
  after-the-document prompts alone (head 0.087 -> 0.15, tail 0.93 -> 1.2), and the same engine
  on the unpadded prompts broke both (0.162, 1.255), on the shipped layout the head (0.214, one
  token of p = 0.43 at step 1 of the Lake Baikal stream). Over the 640 rows:
  - reference top-20 log-probs: max |Δ| 0.214 for tokens of p > 1/e (after the document 0.087,
    after "Document:" 0.123, between the turns 0.214, at the start 0.142, unpadded 0.162; 99.9th
    percentile 0.194; ``HEAD_TOL`` = 0.3, 1.4x); 0.67 / 1.26 / 0.92 / 0.93 for lp in [-3, -1) /
    [-6, -3) / [-10, -6) / below (``TAIL_TOL`` = 1.6, 1.27x);
  - KL(reference || llama.cpp): max 0.086 (``KL_TOL`` = 0.1), mean 0.0048 (``KL_MEAN_TOL`` =
    0.01);
  - greedy: the engine moved the reference's top-1/top-2 gap by <= 0.86 (disagreements at
    margins up to 0.67), so the argmax must agree wherever the margin exceeds ``MARGIN`` = 1.0,
    with no agreement-rate escape hatch (55-63% of rows are that decisive).
  The bounds fail for a row one position off (0 of 600 pass) and for another stream's row (13 of
  640 pass, at most 4 of 128 per set, all at step 7 or later, where every stream has been
  teacher-forced on the same 7+ answer tokens and predicts alike; 3 of 640 with the old
  bounds): test_gguf_tolerance_rejects_shifted_and_foreign_rows.
"""

from __future__ import annotations

import asyncio
import os

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from dragon_core import prompt as P  # noqa: E402
from dragon_host.models import get_model  # noqa: E402

MODEL = "smollm2-135m"
DOCS = [
    ("The Eiffel Tower was designed by the company of Gustave Eiffel and built from 1887 to 1889.",
     "Who designed the Eiffel Tower?"),
    ("Mount Everest is the highest mountain on Earth, at 8,849 metres above sea level.",
     "How high is Mount Everest?"),
    ("Python is a programming language created by Guido van Rossum and first released in 1991.",
     "Who created Python?"),
    ("The mitochondrion is the powerhouse of the cell; it produces ATP through respiration.",
     "What does the mitochondrion produce?"),
    ("Lake Baikal in Siberia is the deepest lake in the world, with a maximum depth of 1,642 metres.",
     "What is the deepest lake?"),
    ("The Treaty of Westphalia was signed in 1648 and ended the Thirty Years' War.",
     "When was the Treaty of Westphalia signed?"),
]
HF_TOL = 1e-3
# llama.cpp vs transformers on the GGUF: see the module docstring
GGUF_STEPS, TOP = 16, 20
HEAD_LP, HEAD_TOL, TAIL_TOL = -1.0, 0.3, 1.6
KL_TOL, KL_MEAN_TOL = 0.1, 0.01
MARGIN = 1.0


def run(coro):
    return asyncio.run(coro)


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(get_model(MODEL).tokenizer_dir()))


@pytest.fixture(scope="module")
def engines():
    from dragon_edge.engines import load_engine

    made: dict[str, object] = {}

    def get(kind: str):
        if kind not in made:  # "llamacpp-fresh": llama.cpp that never reuses an idle context's KV
            made[kind] = load_engine("llamacpp", MODEL, reuse_prefix=False) if kind == "llamacpp-fresh" \
                else load_engine(kind, MODEL)
        return made[kind]

    yield get
    for eng in made.values():
        run(eng.close())


def template_text(tok, system: str, user: str) -> str:
    messages = [{"role": "system", "content": system}, {"role": "user", "content": user}]
    return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


# ============================================================================ prompt layout
QUERIES = ["Who designed it?", "  What is 6*7?  ", "Where?\n"]
ODD_DOCS = ["  42 is the answer\n", "Zebras (Equus quagga) live in Africa!", "x" * 300,
            "Numbers: 1887, 3.14; code `a=b`.", "Ünïcödé — ok."]


def test_unpadded_layout_is_the_chat_template(tok):
    for doc in [d for d, _ in DOCS] + ODD_DOCS:
        for q in QUERIES:
            seg = P.document_segments(tok, doc, q, pad=False)
            text = template_text(tok, P.DEFAULT_SYSTEM, P.user_message(doc, q))
            assert seg.num_pad == 0
            assert tok.decode(seg.ids) == text
            # segment boundaries fall where the pre-tokenizer splits anyway: same ids
            assert seg.ids == tok.encode(text, add_special_tokens=False)


@pytest.mark.parametrize("block", [16, 32, 64])
def test_padding_aligns_the_document_to_blocks(tok, block):
    space = tok.encode(" ", add_special_tokens=False)
    prefixes = set()
    for doc in [d for d, _ in DOCS] + ODD_DOCS:
        segs = [P.document_segments(tok, doc, q, block_size=block) for q in QUERIES]
        for q, seg in zip(QUERIES, segs):
            plain = P.document_segments(tok, doc, q, pad=False)
            assert (len(seg.prefix) + len(seg.document)) % block == 0
            assert 0 <= seg.num_pad < block
            # the padding is spaces put before the unpadded document segment (which starts the
            # user turn), nothing else moves; after the document, answers quoting its end went on
            # with the spaces, after "Document:" they learnt "label: spaces" (issue 13)
            assert list(seg.document) == space * seg.num_pad + list(plain.document)
            assert (seg.prefix, seg.query) == (plain.prefix, plain.query)
        # the cacheable part depends on the document only, never on the question
        assert len({seg.prefix + seg.document for seg in segs}) == 1
        prefixes.update(seg.prefix for seg in segs)
    assert len(prefixes) == 1  # one fixed system prefix for every document and question


def test_padded_text_differs_only_by_spaces_between_the_turns(tok):
    doc, q = DOCS[0]
    seg = P.document_segments(tok, doc, q)
    text = template_text(tok, P.DEFAULT_SYSTEM, P.user_message(doc, q))
    system_turn = tok.apply_chat_template([{"role": "system", "content": P.DEFAULT_SYSTEM}], tokenize=False)
    assert seg.num_pad > 0 and text.startswith(system_turn)
    assert tok.decode(seg.ids) == system_turn + " " * seg.num_pad + text[len(system_turn):]
    assert tok.decode(seg.prefix) == system_turn  # the padding starts right after the system's end of turn


def test_query_only_and_passage_prompts(tok):
    q = "What is the capital of France?"
    ids = P.query_only_prompt(tok, q)
    assert tok.decode(ids) == template_text(tok, P.DEFAULT_SYSTEM, q)
    assert P.passage_prompts(tok, q, [], []) == ([ids], [0.0])
    prompts, scores = P.passage_prompts(tok, q, ["doc a", "doc b"], [0.5, -1.0])
    assert prompts == [P.document_prompt(tok, "doc a", q), P.document_prompt(tok, "doc b", q)]
    assert scores == [0.5, -1.0]
    with pytest.raises(ValueError):
        P.passage_prompts(tok, q, ["doc a"], [])
    with pytest.raises(ValueError):
        P.document_segments(tok, "doc", q, block_size=0)


def test_eos_ids(tok):
    eos = P.eos_token_ids(tok)
    assert tok.convert_tokens_to_ids("<|im_end|>") in eos and tok.eos_token_id in eos
    assert P.pad_ids(tok) == tok.encode(" ", add_special_tokens=False)


# ============================================================================ engines
BACKENDS = [pytest.param("llamacpp", marks=[pytest.mark.llamacpp, pytest.mark.slow]),
            pytest.param("hf", marks=pytest.mark.slow)]


def assert_same(kind: str, got, want) -> None:
    assert len(got) == len(want)
    for g, w in zip(got, want):
        if kind == "llamacpp":
            np.testing.assert_array_equal(g.logprobs, w.logprobs)
        else:
            np.testing.assert_allclose(g.logprobs, w.logprobs, rtol=0, atol=HF_TOL)


async def fresh_dists(engine, prompts, generated, temperature=1.0):
    """The dists of a group opened on the whole context, computed from nothing: llama.cpp's
    prefix reuse is off for it (it would otherwise start from an idle context's KV)."""
    reuse = getattr(engine, "reuse_prefix", None)
    if reuse is not None:
        engine.reuse_prefix = False
    group = await engine.open_group([p + generated for p in prompts], temperature)
    try:
        return await group.next_dists()
    finally:
        await group.close()
        if reuse is not None:
            engine.reuse_prefix = reuse


@pytest.mark.parametrize("kind", BACKENDS)
@pytest.mark.parametrize("k", [1, 2, 4])
def test_append_rollback_equals_fresh_run(tok, engines, kind, k):
    """A history of single and multi-token appends (tokens of our choosing, not the model's
    top choice), rollbacks into and behind the pending tokens, and a rollback to 0, checked
    against fresh full-context runs at several points. Different documents per stream."""
    engine = engines(kind)
    q = DOCS[0][1]
    # unequal lengths (only stream 0 padded): exercises per-stream positions and left padding
    prompts = [P.document_prompt(tok, d, q, pad=i == 0) for i, (d, _) in enumerate(DOCS[:k])]
    assert len({len(p) for p in prompts}) == k
    rng = np.random.default_rng(k)

    def pick(dists, rank):  # the rank-th most likely token of stream 0
        return int(np.argsort(-dists[0].logprobs, kind="stable")[rank])

    async def scenario():
        group = await engine.open_group(prompts)
        assert group.num_streams == k and group.length == 0
        first = await group.next_dists()
        assert_same(kind, first, await fresh_dists(engine, prompts, []))
        checked = 0
        d = first
        for step in range(6):
            draft = []
            for _ in range(int(rng.integers(1, 4))):
                draft.append(pick(d, int(rng.integers(0, 3))))
            await group.append(draft)
            d = await group.next_dists()
            keep = group.length - int(rng.integers(0, len(draft) + 1))
            await group.rollback(keep)  # reject part of the draft (or none of it)
            await group.append([pick(d, 1)])  # a correction: the second choice
            await group.rollback(group.length)  # no-op
            d = await group.next_dists()
            if step % 2 == 1:
                assert_same(kind, d, await fresh_dists(engine, prompts, group._generated))
                checked += 1
        # rollback with nothing pending: the engine must recompute the last position
        generated = list(group._generated)
        await group.rollback(3)
        assert_same(kind, await group.next_dists(), await fresh_dists(engine, prompts, generated[:3]))
        await group.rollback(0)
        assert_same(kind, await group.next_dists(), first)
        await group.append(generated)
        assert group.length == len(generated)
        assert_same(kind, await group.next_dists(), await fresh_dists(engine, prompts, generated))
        await group.close()
        return checked

    assert run(scenario()) == 3


@pytest.mark.parametrize("kind", BACKENDS)
def test_streams_equal_single_stream_runs(tok, engines, kind):
    """A stream's dists do not depend on its neighbours: duplicate prompts (the whole prompt
    but its last token is shared through the prefix copy) and a prompt that is a prefix of
    another, against one-stream groups."""
    engine = engines(kind)
    q = DOCS[2][1]
    a, b = P.document_prompt(tok, DOCS[2][0], q), P.query_only_prompt(tok, q)
    prompts = [a, b, a, a[:40]]

    async def scenario():
        group = await engine.open_group(prompts)
        together = await group.next_dists()
        await group.close()
        alone = [(await fresh_dists(engine, [p], []))[0] for p in prompts]
        return together, alone

    together, alone = run(scenario())
    assert_same(kind, together, alone)


@pytest.mark.parametrize("kind", BACKENDS)
def test_temperature(tok, engines, kind):
    engine = engines(kind)
    prompts = [P.document_prompt(tok, d, q) for d, q in DOCS[:2]]

    async def both():
        return (await fresh_dists(engine, prompts, [], 1.0), await fresh_dists(engine, prompts, [], 0.5))

    plain, hot = run(both())
    for a, b in zip(plain, hot):
        z = a.logprobs.astype(np.float64) / 0.5
        want = z - np.logaddexp.reduce(z)
        np.testing.assert_allclose(b.logprobs, want, atol=1e-4)  # float32 log-probs, scaled by 1/T


@pytest.mark.parametrize("kind", BACKENDS)
def test_misuse_raises(tok, engines, kind):
    engine = engines(kind)
    prompt = P.query_only_prompt(tok, "Hi")

    async def scenario():
        with pytest.raises(ValueError):
            await engine.open_group([])
        with pytest.raises(ValueError):
            await engine.open_group([prompt, []])
        with pytest.raises(ValueError):
            await engine.open_group([prompt], temperature=0.0)
        with pytest.raises(ValueError):
            await engine.open_group([[engine.vocab_size]])
        group = await engine.open_group([prompt])
        await group.append([1, 2])
        with pytest.raises(ValueError):
            await group.rollback(3)
        with pytest.raises(ValueError):
            await group.rollback(-1)
        with pytest.raises(ValueError):
            await group.append([-1])
        assert group.length == 2
        await group.close()
        await group.close()  # idempotent
        with pytest.raises(RuntimeError):
            await group.next_dists()

    run(scenario())


@pytest.mark.llamacpp
@pytest.mark.slow
@pytest.mark.llamacpp
@pytest.mark.slow
def test_llamacpp_prefix_reuse_is_bit_exact_and_saves_the_shared_tokens(tok, engines):
    """A group opened where an earlier one closed starts from that context's KV: the same
    question again prefills one token a stream; an iterative-retrieval swap (one document kept,
    one replaced, the answer so far appended before the first step) recomputes only the new
    document's stream; a prompt that diverges mid-way keeps the common part. Every dist equals a
    group computed from nothing, bit for bit."""
    engine, fresh = engines("llamacpp"), engines("llamacpp-fresh")
    q = DOCS[3][1]
    a, b, c = (P.document_prompt(tok, d, q) for d, _ in DOCS[3:6])

    async def answer(prompts, prefix=(), steps=4):
        group = await engine.open_group(prompts)
        if prefix:
            await group.append(list(prefix))
        before = engine.reused_tokens
        out = []
        for _ in range(steps):
            d = await group.next_dists()
            out.append(d)
            await group.append([d[0].argmax()])
        got = (before, engine.reused_tokens, list(group._generated))
        await group.close()
        return out, got

    async def scenario():
        first, (_, _, gen) = await answer([a, b])
        assert_same("llamacpp", first[0], await fresh_dists(fresh, [a, b], []))
        again, (r0, r1, _) = await answer([a, b])  # the same question: all but the last token reused
        assert r1 - r0 == len(a) - 1 + len(b) - 1, (r0, r1)
        assert_same("llamacpp", again[0], first[0])
        # a swap at a boundary after 4 tokens: stream 0 keeps its document, stream 1 gets another
        swap, (s0, s1, _) = await answer([a, c], prefix=gen[:4], steps=2)
        assert s1 - s0 >= len(a) + 4 - 1 and s1 - s0 < len(a) + 4 + len(c), (s0, s1)  # c shares the system turn only
        assert_same("llamacpp", swap[0], await fresh_dists(fresh, [a, c], gen[:4]))
        assert_same("llamacpp", swap[1], await fresh_dists(fresh, [a, c], gen[:4] + [swap[0][0].argmax()]))
        # a prompt that diverges mid-way (another question over the same document)
        other = P.document_prompt(tok, DOCS[3][0], DOCS[0][1])
        shared = next(i for i, (x, y) in enumerate(zip(a, other)) if x != y)
        div, (d0, d1, _) = await answer([other, b], steps=1)
        assert d1 - d0 >= shared, (d0, d1, shared)
        assert_same("llamacpp", div[0], await fresh_dists(fresh, [other, b], []))

    run(scenario())


def test_llamacpp_event_loop_stays_free_and_groups_are_isolated(tok, engines):
    """Engine work runs on a worker thread (the loop keeps ticking meanwhile); interleaved groups
    with different k, one of them rolling back (into its KV, twice) and appending another token
    while the others step, and a group on a reused context, give the same bits as sequential
    runs: a rollback in one group never touches another group's values."""
    engine = engines("llamacpp")
    q = DOCS[1][1]
    prompts = [P.document_prompt(tok, d, q) for d, _ in DOCS[:4]]

    async def decode(k, steps, rollback=False):
        group = await engine.open_group(prompts[:k])
        out = []
        for step in range(steps):
            d = await group.next_dists()
            out.append([x.logprobs.copy() for x in d])
            if rollback and step in (2, 4):
                await group.rollback(group.length - 2)
                await group.append([int(np.argsort(-d[0].logprobs, kind="stable")[1])])  # a second choice
            else:
                await group.append([d[0].argmax()])
        await group.close()
        return out

    async def scenario():
        ticks = 0
        done = asyncio.Event()

        async def ticker():
            nonlocal ticks
            while not done.is_set():
                ticks += 1
                await asyncio.sleep(0)

        tick_task = asyncio.create_task(ticker())
        together = await asyncio.gather(decode(4, 6), decode(2, 6, rollback=True), decode(4, 6))
        done.set()
        await tick_task
        alone = [await decode(4, 6), await decode(2, 6, rollback=True)]
        return ticks, together, alone

    ticks, together, alone = run(scenario())
    assert ticks > 20
    for got, want in [(together[0], alone[0]), (together[1], alone[1]), (together[2], alone[0])]:
        for a, b in zip(got, want):
            for x, y in zip(a, b):
                np.testing.assert_array_equal(x, y)


# ============================================================================ llama.cpp vs transformers
@pytest.fixture(scope="module")
def gguf_rows(tok, engines):
    """Full next-token log-prob rows ``(steps, streams, V)`` of OUR llama.cpp engine (the
    runtime's ``load_engine("llamacpp", ...)``, one group of 8 streams) and of transformers on
    the same GGUF (Q4_1 / Q8_0 blocks dequantised to float32, float32 compute, one KV cache per
    stream), teacher-forced on the reference's greedy token of stream 0 for 16 steps."""
    import torch
    from transformers import AutoModelForCausalLM, DynamicCache
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    gguf = get_model(MODEL).gguf_path()
    ref_model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()
    engine = engines("llamacpp")
    prompts = [P.document_prompt(tok, d, q) for d, q in DOCS]
    prompts += [P.query_only_prompt(tok, "What is the capital of France?"),
                P.query_only_prompt(tok, "Write a haiku about rain.")]
    caches = [DynamicCache() for _ in prompts]

    @torch.inference_mode()
    def reference(new_tokens: list[list[int]]) -> np.ndarray:
        out = [ref_model(torch.tensor([t]), past_key_values=c, use_cache=True).logits[0, -1].double()
               for t, c in zip(new_tokens, caches)]
        return torch.log_softmax(torch.stack(out), -1).numpy()

    async def scenario():
        group = await engine.open_group(prompts)
        refs, devs = [], []
        new = prompts
        try:
            for _ in range(GGUF_STEPS):
                devs.append(np.stack([d.logprobs.astype(np.float64) for d in await group.next_dists()]))
                refs.append(reference(new))
                token = int(np.argmax(refs[-1][0]))
                await group.append([token])
                new = [[token]] * len(prompts)
        finally:
            await group.close()
        return np.stack(refs), np.stack(devs)

    return run(scenario())


def _row_errors(ref: np.ndarray, dev: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(reference log-probs, |error|) over the reference's top-20 tokens of one row."""
    top = np.argsort(-ref)[:TOP]
    return ref[top], np.abs(ref[top] - dev[top])


def _kl(ref: np.ndarray, dev: np.ndarray) -> float:
    return float(np.sum(np.exp(ref) * (ref - dev)))


def _bound(lp: np.ndarray) -> np.ndarray:
    return np.where(lp > HEAD_LP, HEAD_TOL, TAIL_TOL)


def _row_ok(ref: np.ndarray, dev: np.ndarray) -> bool:
    lp, err = _row_errors(ref, dev)
    return bool(np.all(err <= _bound(lp))) and _kl(ref, dev) <= KL_TOL


@pytest.mark.llamacpp
@pytest.mark.slow
def test_llamacpp_matches_transformers_on_the_gguf(gguf_rows):
    """Every row: the reference's top-20 log-probs within HEAD_TOL (tokens of p > 1/e) or
    TAIL_TOL (the rest), KL(reference || llama.cpp) <= KL_TOL; the mean KL <= KL_MEAN_TOL."""
    ref, dev = gguf_rows
    assert ref.shape == dev.shape == (GGUF_STEPS, 8, 49152)
    pairs = [(r, d) for rs, ds in zip(ref, dev) for r, d in zip(rs, ds)]
    errors = np.concatenate([np.stack(_row_errors(r, d), 1) for r, d in pairs])
    kls = np.array([_kl(r, d) for r, d in pairs])
    lp, err = errors.T
    bins = [(0, -1), (-1, -3), (-3, -6), (-6, -10), (-10, -100)]
    print(f"\nllama.cpp vs transformers(GGUF): max |dlp| over top-{TOP} by reference log-prob: " + ", ".join(
        f"[{lo},{hi}): {err[(lp <= lo) & (lp > hi)].max(initial=0):.3f}" for lo, hi in bins)
        + f"; KL max {kls.max():.4f} mean {kls.mean():.4f}")
    bad = err > _bound(lp)
    assert not bad.any(), f"{bad.sum()} log-probs off, e.g. {lp[bad][:3]} by {err[bad][:3]}"
    assert kls.max() <= KL_TOL and kls.mean() <= KL_MEAN_TOL


@pytest.mark.llamacpp
@pytest.mark.slow
def test_llamacpp_greedy_agrees_where_the_reference_is_decisive(gguf_rows):
    """The argmax must be the reference's wherever its top-1/top-2 margin exceeds MARGIN (no
    agreement-rate escape hatch), and most rows must be decisive, or this checks little."""
    ref, dev = gguf_rows
    ref, dev = ref.reshape(-1, ref.shape[-1]), dev.reshape(-1, dev.shape[-1])
    top2 = np.sort(ref, axis=1)[:, -2:]
    margin = top2[:, 1] - top2[:, 0]
    agree = ref.argmax(1) == dev.argmax(1)
    a, b = np.argsort(ref, axis=1)[:, -1], np.argsort(ref, axis=1)[:, -2]
    rows = np.arange(len(ref))
    gap_err = np.abs((dev[rows, a] - dev[rows, b]) - margin)
    print(f"\ngreedy: {agree.sum()}/{agree.size} agree; disagreements at margins "
          f"{np.round(margin[~agree], 3).tolist()}; max top-2 gap error {gap_err.max():.3f}")
    decisive = margin > MARGIN
    assert agree[decisive].all(), f"disagreement at margins {margin[decisive & ~agree]}"
    assert decisive.mean() >= 0.45, f"only {decisive.sum()} of {decisive.size} rows are decisive"


@pytest.mark.llamacpp
@pytest.mark.slow
def test_gguf_tolerance_rejects_shifted_and_foreign_rows(gguf_rows):
    """The bounds are tight enough to fail: the engine's row one position later (a shifted
    position or stale KV) or another stream's row (another document) against the reference."""
    ref, dev = gguf_rows
    shifted = [_row_ok(ref[t, i], dev[t + 1, i]) for t in range(GGUF_STEPS - 1) for i in range(8)]
    foreign = [_row_ok(ref[t, i], dev[t, (i + 1) % 8]) for t in range(GGUF_STEPS) for i in range(8)]
    print(f"\nrows passing although shifted: {sum(shifted)}/{len(shifted)}, foreign: {sum(foreign)}/{len(foreign)}")
    assert sum(shifted) <= 0.05 * len(shifted) and sum(foreign) <= 0.05 * len(foreign)


@pytest.mark.llamacpp
@pytest.mark.slow
def test_block_padding_barely_moves_the_answer(tok, engines):
    """Padding to a block boundary must not change what the model says (see dragon_core.prompt)."""
    engine = engines("llamacpp")

    async def compare(doc, q):
        plain = await engine.open_group([P.document_prompt(tok, doc, q, pad=False)])
        padded = await engine.open_group([P.document_prompt(tok, doc, q)])
        rows = []
        for _ in range(8):
            (a,), (b,) = await plain.next_dists(), await padded.next_dists()
            rows.append((0.5 * np.abs(a.probs() - b.probs()).sum(), a.argmax() == b.argmax()))
            await plain.append([a.argmax()])
            await padded.append([a.argmax()])
        await plain.close()
        await padded.close()
        return rows

    rows = [r for d, q in DOCS for r in run(compare(d, q))]
    tv = np.array([t for t, _ in rows])
    agree = np.array([a for _, a in rows])
    print(f"\npadded vs unpadded: mean TV {tv.mean():.3f}, greedy agreement {agree.mean():.3f}")
    assert tv.mean() < 0.1 and agree.mean() >= 0.9
