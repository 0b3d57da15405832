"""Committed tokens to shown text, incrementally: ``TextStream``.

Decoding the whole answer again at every token costs O(n²) over an answer. As vLLM's
detokenizer does, only a window is decoded: the tokens from ``prefix_offset`` on, of which those
before ``read_offset`` were shown already; the new text is what the window adds past them. The
window starts a few tokens back so that a tokenizer that treats the first token of a text
differently (a leading space) decodes the new tokens as it would inside the answer.

Two rules apply on top: a text ending in half a UTF-8 character waits for the rest, and stop
strings (``dragon_core.stop_text``) end the answer before they start, with any tail that might
begin one held back. EOS ids are dropped. Pure: the tokenizer is any object with Hugging Face's
``decode(ids, skip_special_tokens=)``.
"""

from __future__ import annotations

from typing import Any, Sequence

from dragon_core.stop_text import releasable

_INCOMPLETE = "\ufffd"  # what a decoder gives for half a UTF-8 character


class TextStream:
    def __init__(self, tokenizer: Any, eos_ids: Sequence[int], stops: Sequence[str] = ()) -> None:
        self.tokenizer, self.eos_ids = tokenizer, frozenset(eos_ids)
        self.stops = [stop for stop in stops if stop]
        self.tokens: list[int] = []
        self.text = ""  # decoded so far (``shown`` of it released)
        self.shown = 0
        self.stopped = False  # a stop string occurred: nothing more is released
        self._prefix_offset = self._read_offset = 0

    def push(self, tokens: Sequence[int]) -> str:
        """The text these committed tokens release ("" while it waits or after a stop)."""
        if self.stopped:
            return ""
        self.tokens.extend(t for t in tokens if t not in self.eos_ids)
        self.text += self._decode_new()
        return self._release()

    def finish(self) -> str:
        """The rest at the end of the answer: a held-back tail that never became a stop string
        (and, should a window have decoded differently from the whole, what the whole adds)."""
        if self.stopped:
            return ""
        whole = self._decode(self.tokens)
        if whole.startswith(self.text[:self.shown]):  # one full decode per answer: O(n)
            self.text = whole
        rest, self.shown = self.text[self.shown:], len(self.text)
        return rest

    def _decode_new(self) -> str:
        window = self.tokens[self._prefix_offset:]
        new = self._decode(window)
        if new.endswith(_INCOMPLETE):
            return ""  # wait for the rest of the character; the window grows meanwhile
        seen = self._decode(self.tokens[self._prefix_offset:self._read_offset])
        self._prefix_offset, self._read_offset = self._read_offset, len(self.tokens)
        return new[len(seen):]

    def _release(self) -> str:
        upto, self.stopped = releasable(self.text, self.stops, self.shown)
        out = self.text[self.shown:upto]
        self.shown = max(self.shown, upto)
        if self.stopped:
            self.text = self.text[:upto]
        return out

    def _decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)
