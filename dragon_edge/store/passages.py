"""A document's passages, produced one at a time.

The same passages as :func:`dragon_core.retrieval.chunk_words` (consecutive runs of ``words``
whitespace-separated words, joined by single spaces), without its list of every word: a 50 MB
text file has about 8 million words, and that list alone takes about half a gigabyte.
"""

from __future__ import annotations

import re
from typing import Iterator

# str.split() and re's \s agree on what whitespace is (both use Py_UNICODE_ISSPACE)
_WORD = re.compile(r"\S+")


def iter_passages(text: str, words: int) -> Iterator[str]:
    batch: list[str] = []
    for match in _WORD.finditer(text):
        batch.append(match.group())
        if len(batch) == words:
            yield " ".join(batch)
            batch = []
    if batch:
        yield " ".join(batch)


def count_passages(text: str, words: int) -> int:
    n_words = sum(1 for _ in _WORD.finditer(text))
    return -(-n_words // words)


def batched(passages: Iterator[str], size: int) -> Iterator[list[str]]:
    """Lists of ``size`` passages (the last may be shorter); itertools.batched is 3.12+."""
    batch: list[str] = []
    for passage in passages:
        batch.append(passage)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch
