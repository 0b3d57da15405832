"""``dragon_core.text_stream``: windowed detokenisation (O(n)), half characters, stop strings."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from dragon_core.text_stream import TextStream

EOS = 256


class ByteTokenizer:
    """One token per UTF-8 byte; counts the tokens it decodes (the cost of streaming)."""

    def __init__(self) -> None:
        self.decoded = 0

    def encode(self, text: str) -> list[int]:
        return list(text.encode())

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        self.decoded += len(ids)
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


def stream(text: str, cuts: list[int], stops=()) -> tuple[str, TextStream]:
    tok = ByteTokenizer()
    ids, out = tok.encode(text), ""
    ts = TextStream(tok, [EOS], stops)
    bounds = sorted({0, len(ids), *(c % (len(ids) + 1) for c in cuts)})
    for a, b in zip(bounds, bounds[1:]):
        out += ts.push(ids[a:b])
    return out + ts.finish(), ts


@given(st.text(max_size=40), st.lists(st.integers(0, 200), max_size=12))
def test_streamed_text_equals_the_whole_decode(text, cuts):
    assert stream(text, cuts)[0] == text


def test_half_a_character_waits_for_the_rest():
    tok = ByteTokenizer()
    ts = TextStream(tok, [EOS])
    e_acute = "é".encode()
    assert ts.push([ord("a"), e_acute[0]]) == ""
    assert ts.push([e_acute[1], EOS]) == "aé"


def test_decoding_is_linear_in_the_answer():
    tok = ByteTokenizer()
    ts = TextStream(tok, [EOS])
    for i in tok.encode("x" * 2000):
        ts.push([i])
    assert tok.decoded < 4 * 2000  # re-decoding the whole answer each token: ~2,000,000


@given(st.text(alphabet="abLyon ", max_size=30), st.lists(st.integers(0, 60), max_size=8))
def test_stop_strings_cut_the_answer_before_the_first_one(text, cuts):
    shown, ts = stream(text, cuts, ["Lyon", "ab"])
    hits = [i for i in (text.find("Lyon"), text.find("ab")) if i >= 0]
    assert shown == (text[:min(hits)] if hits else text)
    assert ts.stopped == bool(hits)
