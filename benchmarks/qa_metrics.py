"""Open-domain QA scores (SQuAD's normalisation) and what a reader of the answers sees.

* ``exact_match``, ``f1``, ``contains``: against every gold answer, the best one counts.
  Normalisation as in the SQuAD v1.1 evaluation script: lower case, punctuation and the
  articles a/an/the removed, whitespace collapsed.
* ``trailing_whitespace_run``: the answer ends in a run of >= 2 whitespace characters (the
  symptom of issue 13 item 4: block padding copied into the answer).
* ``repeated_ngram``: some word n-gram (n = 3 by default) occurs twice or more (loops such as
  "The answer is: The answer is ...").
"""

from __future__ import annotations

import collections
import re
import string
from typing import Sequence

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = set(string.punctuation)
_TRAILING_RUN = re.compile(r"\s{2,}$")


def normalize(text: str) -> str:
    text = "".join(ch for ch in text.lower() if ch not in _PUNCT)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(prediction: str, golds: Sequence[str]) -> float:
    p = normalize(prediction)
    return float(any(p == normalize(g) for g in golds))


def f1(prediction: str, golds: Sequence[str]) -> float:
    return max((_f1(normalize(prediction).split(), normalize(g).split()) for g in golds), default=0.0)


def contains(prediction: str, golds: Sequence[str]) -> float:
    """A gold answer occurs in the answer (word-aligned, after normalisation)."""
    p = f" {normalize(prediction)} "
    return float(any(normalize(g) and f" {normalize(g)} " in p for g in golds))


def trailing_whitespace_run(answer: str) -> bool:
    return _TRAILING_RUN.search(answer) is not None


def repeated_ngram(answer: str, n: int = 3) -> bool:
    words = answer.lower().split()
    grams = collections.Counter(tuple(words[i:i + n]) for i in range(len(words) - n + 1))
    return any(c > 1 for c in grams.values())


def _f1(pred: list[str], gold: list[str]) -> float:
    common = collections.Counter(pred) & collections.Counter(gold)
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred), same / len(gold)
    return 2 * precision * recall / (precision + recall)
