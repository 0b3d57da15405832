r"""Prompt layout: one document stream's prompt as token ids (pure functions, no I/O).

Each stream reads ``[fixed system prefix][document segment, padded][query segment]``. The three
segments are tokenized *separately* and concatenated, so the ids of ``prefix + document`` depend
on the document alone: a prefix cache (vLLM's hashes whole blocks over the whole prefix) reuses a
hot document's KV across users and questions. The document segment is padded so that
``prefix + document`` ends on a block boundary (CPU vLLM's block size is a multiple of 32).

Without padding, the concatenated text is exactly what the model's chat template renders for
``system=...``, ``user="Document: {doc}\n\nQuestion: {query}"``, ``add_generation_prompt=True``.
Segment boundaries are placed where a BPE pre-tokenizer splits anyway (the space before the
document goes with the document, as it does for a word), so for SmolLM2 the unpadded ids equal
the template's own tokenization (tested).

**Padding: spaces between the system turn and the user turn** (issue 13). The prefix is the
system turn as the template renders it (for SmolLM2 up to and with ``"<|im_end|>\n"``), the
padded segment is ``[spaces][user turn up to and with the document]``: the run of spaces follows
the system's end of turn, where no answer goes. Two places were shipped before and leaked:
after the document (just before ``"\n\nQuestion: "``), an answer that quoted a document's end
went on with the spaces that followed it there (``"The French Chef:      "``, 0.5-2.5% of 200
NQ answers per mode); between ``"Document:"`` and the document, the model learnt "a label, a
colon, spaces" (``"The answer is:            "``, 1.5-2.0% of 200 per mode). Measured on 30 NQ
questions against the unpadded layout (benchmarks/bench_padding.py, results/padding.json):
between the turns, mean TV 0.048 and argmax agreement 0.967 along the unpadded answer, answers
ending in a whitespace run 0/30, the same answer as unpadded 57%; after the document 0.057 /
0.958 / 1/30 / 47%; after ``"Document:"`` 0.051 / 0.960 / 0/30 / 47%; at the very start of the
sequence 0.155 / 0.849. Whether the 200-question rate is 0 with this layout is measured by
benchmarks/bench_quality_qa.py (benchmarks/README.md, section 3). The block alignment is unchanged:
``prefix + document`` still ends on a block boundary and depends on the document only. A
special token (``<|endoftext|>``) as padding tells the model the text ended (TV 0.39). A
template that does not render the system turn as a prefix of the conversation (one that merges
the system text into the user turn) gets the padding right before the document instead.
tests/engines/test_engines.py keeps a check.

The tokenizer is duck-typed: ``encode(text, add_special_tokens=False)`` and
``apply_chat_template(messages, tokenize=False, add_generation_prompt=True)`` (transformers'
tokenizers have both), so the device and the cloud build identical prompts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

DEFAULT_SYSTEM = "You are a helpful assistant. Answer the question using the document."
BLOCK_SIZE = 32
PAD_TEXT = " "
# Markers that survive any chat template untouched; they only locate the segments.
_DOC_MARK, _QUERY_MARK = "\x00DRAGON_DOC\x00", "\x00DRAGON_QUERY\x00"
# End-of-turn tokens of common chat templates: generation stops on any of them.
_END_OF_TURN = ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<|end_of_text|>", "<end_of_turn>", "</s>")


@dataclass(frozen=True)
class Segments:
    """One document stream's prompt, segment by segment (token ids)."""

    prefix: tuple[int, ...]
    document: tuple[int, ...]  # the padding, then the user turn up to and with the document
    query: tuple[int, ...]
    num_pad: int = 0

    @property
    def ids(self) -> list[int]:
        return [*self.prefix, *self.document, *self.query]


def user_message(document: str, query: str) -> str:
    """The user turn of a document stream, as the chat template sees it (unpadded)."""
    return f"Document: {document.strip()}\n\nQuestion: {query.strip()}"


def document_segments(tokenizer: Any, document: str, query: str, *, system: str = DEFAULT_SYSTEM,
                      block_size: int = BLOCK_SIZE, pad: bool = True) -> Segments:
    """Lay out one document stream: prefix, padding + document (ending on a ``block_size``
    boundary), query."""
    if block_size <= 0:
        raise ValueError(f"block_size must be positive, got {block_size}")
    text = _render(tokenizer, system, user_message(_DOC_MARK, _QUERY_MARK))
    head, rest = text.split(_DOC_MARK)
    middle, tail = rest.split(_QUERY_MARK)
    fixed = _system_turn(tokenizer, system, head)  # the padding goes after it: see the module docstring
    prefix = _encode(tokenizer, fixed)
    doc = _encode(tokenizer, head[len(fixed):] + document.strip())
    num_pad = (-(len(prefix) + len(doc))) % block_size if pad else 0
    doc = pad_ids(tokenizer) * num_pad + doc
    query_ids = _encode(tokenizer, middle + query.strip() + tail)
    return Segments(tuple(prefix), tuple(doc), tuple(query_ids), num_pad)


def document_prompt(tokenizer: Any, document: str, query: str, **layout: Any) -> list[int]:
    """Token ids of one document stream (see :func:`document_segments` for ``layout``)."""
    return document_segments(tokenizer, document, query, **layout).ids


def query_only_prompt(tokenizer: Any, query: str, *, system: str = DEFAULT_SYSTEM) -> list[int]:
    """Token ids of the no-retrieval prompt: the question alone under the same system turn."""
    return _encode(tokenizer, _render(tokenizer, system, query.strip()))


def passage_prompts(tokenizer: Any, query: str, passages: Sequence[str], scores: Sequence[float],
                    **layout: Any) -> tuple[list[list[int]], list[float]]:
    """One prompt per retrieved passage, with its score; no passage gives the query-only prompt
    with score 0 (a side without documents still takes part, with one stream)."""
    if len(passages) != len(scores):
        raise ValueError(f"{len(passages)} passages but {len(scores)} scores")
    if not passages:
        system = layout.get("system", DEFAULT_SYSTEM)
        return [query_only_prompt(tokenizer, query, system=system)], [0.0]
    prompts = [document_prompt(tokenizer, p, query, **layout) for p in passages]
    return prompts, [float(s) for s in scores]


CONCAT_BUDGET = 256  # DRCG's context budget in tokens (the DRAGON paper's 256)


def concatenated_prompt(tokenizer: Any, query: str, passages: Sequence[str], *, system: str = DEFAULT_SYSTEM,
                        budget: int = CONCAT_BUDGET) -> list[int]:
    """Context aggregation (DRCG): every passage in one prompt, in the order given (best score
    first), joined by blank lines and cut to ``budget`` tokens, laid out like one document
    stream without padding (one prompt decoded once: nothing to align for a cache)."""
    if budget <= 0:
        raise ValueError(f"budget must be positive, got {budget}")
    joined = _encode(tokenizer, "\n\n".join(p.strip() for p in passages if p.strip()))
    # cut in tokens, then back to text: the template renders text; a cut inside a character is dropped
    context = tokenizer.decode(joined[:budget], skip_special_tokens=True).rstrip("\ufffd")
    if not context.strip():
        return query_only_prompt(tokenizer, query, system=system)
    return document_segments(tokenizer, context, query, system=system, pad=False).ids


def pad_ids(tokenizer: Any) -> list[int]:
    """The padding token (one id): the space."""
    ids = _encode(tokenizer, PAD_TEXT)
    if len(ids) != 1:
        raise ValueError(f"the tokenizer encodes {PAD_TEXT!r} as {len(ids)} tokens; padding needs one")
    return ids


def eos_token_ids(tokenizer: Any) -> tuple[int, ...]:
    """Ids that end an answer: the tokenizer's EOS and the end-of-turn tokens it knows."""
    ids = set()
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is not None:
        ids.update(eos if isinstance(eos, (list, tuple)) else [eos])
    vocab = tokenizer.get_vocab() if hasattr(tokenizer, "get_vocab") else {}
    ids.update(vocab[t] for t in _END_OF_TURN if t in vocab)
    return tuple(sorted(int(i) for i in ids))


def _system_turn(tokenizer: Any, system: str, head: str) -> str:
    """The system turn as the template renders it, if the rendered prompt starts with it (the
    padding then sits between the two turns); else, for templates that merge the turns, the
    text up to the document (minus the space that belongs to the document's first word)."""
    try:
        turn = tokenizer.apply_chat_template([{"role": "system", "content": system}], tokenize=False,
                                             add_generation_prompt=False)
    except Exception:  # a template that refuses a lone system message
        turn = None
    if isinstance(turn, str) and turn and head.startswith(turn):
        return turn
    return head.rstrip(" ")


def _render(tokenizer: Any, system: str, user: str) -> str:
    messages = [{"role": "system", "content": system}, {"role": "user", "content": user}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    if not isinstance(text, str):
        raise TypeError("apply_chat_template(tokenize=False) must return a string")
    return text


def _encode(tokenizer: Any, text: str) -> list[int]:
    # The rendered template already holds its special tokens (BOS included where it has one).
    ids = tokenizer.encode(text, add_special_tokens=False)
    return [int(i) for i in ids]


def last_user_message(messages: Sequence[dict]) -> str:
    """The query DRAGON retrieves with (and the device sends to the cloud): the last user
    turn's text; OpenAI content parts are joined."""
    for msg in reversed(list(messages)):
        if msg.get("role") == "user":
            content = msg.get("content")
            if isinstance(content, list):
                content = " ".join(p.get("text", "") for p in content if isinstance(p, dict))
            if content:
                return str(content)
    raise ValueError("messages must contain a non-empty user message")


class IncrementalText:
    """The text of the tokens committed so far, for streaming: EOS ids are dropped and a text
    ending in half a UTF-8 character is held back until the rest arrives."""

    def __init__(self, tokenizer: Any, eos_ids: Sequence[int]) -> None:
        self.tokenizer, self.eos_ids = tokenizer, frozenset(eos_ids)
        self.tokens: list[int] = []

    def push(self, tokens: Sequence[int]) -> str | None:
        self.tokens.extend(t for t in tokens if t not in self.eos_ids)
        text = self.text()
        return None if text.endswith("\ufffd") else text

    def text(self) -> str:
        return self.tokenizer.decode(self.tokens, skip_special_tokens=True)
