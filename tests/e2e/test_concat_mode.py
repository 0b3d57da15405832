"""DRCG with one concatenated prompt (``mode="concat"``), the DRAGON paper's main baseline.

Through the real link and the shared cloud, the device's answer must equal a plain greedy decode
of one prompt written out here from the chat template: the private and the public passages, best
score first, joined by blank lines, then the question. The cut to the 256-token budget is
checked on its own.
"""

from __future__ import annotations

import pytest
from e2e_world import QUESTION, ask, options, run

from dragon_core import prompt as P
from dragon_core.testing.reference import greedy_generate

pytestmark = [pytest.mark.slow, pytest.mark.llamacpp]


def template_ids(tok, user: str) -> list[int]:
    messages = [{"role": "system", "content": P.DEFAULT_SYSTEM}, {"role": "user", "content": user}]
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tok.encode(text, add_special_tokens=False)


def test_concat_answer_equals_a_plain_decode_of_the_concatenated_prompt(e2e_loop, runtime, world, cloud):
    opts = options(mode="concat")
    ids, stats = run(e2e_loop, ask(runtime, cloud.url, opts))
    private = runtime.private_passages(QUESTION, opts.k)
    public = world[1].search(QUESTION, opts.cloud_k)
    ranked = sorted([(p.score, p.text) for p in private] + [(p.score, p.text) for p in public], key=lambda t: -t[0])
    prompt = template_ids(runtime.tokenizer, P.user_message("\n\n".join(t for _, t in ranked), QUESTION))
    assert len(prompt) < 256 + 64  # the demo's four passages fit the budget: nothing was cut
    # a plain decode: one stream, argmax, stop at an end-of-turn token
    want = run(e2e_loop, greedy_generate(runtime.engine, [prompt], lambda dists: dists[0].argmax(),
                                         runtime.eos_ids, opts.max_tokens))
    assert ids == want
    assert stats.mode == "concat" and not stats.degraded and not stats.device_only
    assert {s.side for s in stats.sources} == {"device", "cloud"}  # the public text came down and was used
    # one prompt holding the public passages differs from the device's own concatenation
    alone = P.concatenated_prompt(runtime.tokenizer, QUESTION, [p.text for p in private])
    assert alone != prompt


def test_concatenation_is_cut_to_the_budget_best_passage_first(runtime):
    tok = runtime.tokenizer
    passages = [f"Passage {i}: " + " ".join(f"word{i}x{j}" for j in range(80)) for i in range(6)]
    ids = P.concatenated_prompt(tok, "What?", passages, budget=64)
    plain = P.concatenated_prompt(tok, "What?", passages[:1], budget=10_000)
    query_tail = P.document_segments(tok, "x", "What?", pad=False).query
    text = tok.decode(ids)
    assert "Passage 0" in text and "Passage 1" not in text
    assert list(ids[-len(query_tail):]) == list(query_tail)
    assert len(plain) > len(ids)  # the first passage alone is longer than 64 tokens: it was cut
    overhead = len(P.query_only_prompt(tok, "Document: \n\nQuestion: What?"))
    assert len(ids) - overhead <= 64 + 2  # the passages' share (re-encoding may merge a token or two)
    assert P.concatenated_prompt(tok, "What?", []) == P.query_only_prompt(tok, "What?")
