"""The two pieces of vLLM's streaming-input sessions both cloud paths use: the input chunks a
session is fed, and the top-K of one position of its flat log-probs (``engine.py``: one session
per document; ``drafting.py``: a gang's rows)."""

from __future__ import annotations

import asyncio

import numpy as np


async def input_chunks(inbox: asyncio.Queue):
    """vLLM ``StreamingInput`` chunks from the token lists put into ``inbox`` (``None`` ends); an
    item ``(ids, params)`` gives the chunk its own ``SamplingParams`` (rollback in place)."""
    from vllm.engine.protocol import StreamingInput
    from vllm.inputs.engine import tokens_input

    while (item := await inbox.get()) is not None:
        ids, params = item if isinstance(item, tuple) else (item, None)
        # a fresh list of Python ints per chunk: vLLM extends the first chunk's list in place,
        # and 0.26 cannot serialise numpy ints
        prompt = tokens_input([int(t) for t in ids])
        yield StreamingInput(prompt=prompt) if params is None else StreamingInput(prompt=prompt, sampling_params=params)


def top_k_at(flat, position: int, top_k: int) -> tuple[np.ndarray, np.ndarray]:
    """(ids, log-probs) of one position of a ``FlatLogprobs``: its top-K, or every listed id for
    ``top_k = -1``. The sampled token is listed again (outside the top-K it is vLLM's own random
    pick, dropped), so ids are de-duplicated."""
    lo, hi = flat.start_indices[position], flat.end_indices[position]
    ids = np.asarray(flat.token_ids[lo:hi], dtype=np.int64)
    lps = np.asarray(flat.logprobs[lo:hi], dtype=np.float64)
    if top_k >= 0:
        ranks = np.asarray([r if r is not None else top_k + 1 for r in flat.ranks[lo:hi]])
        keep = ranks <= top_k
        ids, lps = ids[keep], lps[keep]
    ids, first = np.unique(ids, return_index=True)
    return ids, lps[first]
