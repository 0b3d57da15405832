"""Iterative retrieval's one rule (issue 16; docs/RALMSPEC.md): which documents a step uses.

With ``retrieve_every = n`` (0: retrieve once, as DRAGON does), a side re-retrieves every ``n``
generated tokens, with the question and the answer so far as the query. The distribution of
step ``t`` is computed over the documents retrieved on the answer's first ``boundary(t, n)``
tokens, ``n * floor(t / n)``. So a step's documents are a function of the committed prefix
alone: both sides (and the reference decode) agree on them without a message, a draft built on
a prefix that is later rolled back drops its documents with it, and a side's retrieval mass
``log h`` (the only score that leaves it) goes up with each ``Draft`` for the step it belongs to.

Pure: the drivers (the cloud's vLLM streams, the device's engine, the simulator) retrieve and
swap their document streams where this rule says.
"""

from __future__ import annotations

MAX_RETRIEVE_EVERY = 4096  # a bound for the wire; larger is "once" in all but name


def query(question: str, answer_so_far: str) -> str:
    """The retrieval query at a boundary: the question, then the answer so far. (The streams'
    prompts keep the question alone: the model answers it; the documents follow the answer.)"""
    answer_so_far = answer_so_far.strip()
    return f"{question} {answer_so_far}" if answer_so_far else question


def boundary(step: int, every: int) -> int:
    """Generated tokens the query of ``step``'s documents includes (0: the question alone)."""
    if step < 0 or every < 0:
        raise ValueError(f"step {step} and retrieve_every {every} must be >= 0")
    return 0 if every == 0 else every * (step // every)


def retrieves_at(step: int, every: int) -> bool:
    """Whether ``step`` is the first step of a new retrieval epoch (step 0: the first retrieval)."""
    return step == boundary(step, every)


def epoch_of(step: int, every: int) -> int:
    """The retrieval epoch of ``step``: 0 for the first retrieval, then one per boundary."""
    return 0 if every == 0 else step // every
