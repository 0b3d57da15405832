"""Centralized DRAGON written out again, for the end-to-end references, without the code under
test: no ``dragon_core.aggregate`` (mixture, canonical form, η, ``transform``), no session, no
driver. Only the engines' per-document distributions (``Dist.probs()``: what an engine said)
are shared.

The formulas (docs/ALGORITHMS.md §2, dist.py's canonical form):

* per side ``s``: ``p^s = Σ_d softmax(R^s)_d · p_d``. A side whose engine mixes its documents
  itself and reports the mixture's top ``engine_top_k`` (the cloud's vLLM gang) first reduces
  ``p^s`` to that form (float16 log-probs, the rest spread evenly, as below); with ``top_k > 0`` it then travels as its
  ``top_k`` most likely ids (ties: smaller id first) with log-probs rounded to float16, the rest
  of the mass spread evenly over the other ids (listed mass > 1 after rounding: renormalised,
  no tail); with ``top_k = 0`` as float32 log-probs;
* across sides ``η^s = Σ_{d∈s} e^{R_d} / Σ_{all d} e^{R_d}`` and ``p = Σ_s η^s p^s`` (so with
  full vectors this is one softmax-weighted mixture over every document of both sides);
* sampling draws from ``p`` truncated to its ``top_k`` largest values (ties at the k-th value
  kept) and then to the smallest prefix, in descending order, whose mass reaches ``top_p``.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np


def side_probs(doc_probs: Sequence[np.ndarray], scores: Sequence[float], top_k: int,
               engine_top_k: int = 0) -> np.ndarray:
    """One side's mixture as the peer receives it (dense float64)."""
    r = np.asarray(scores, dtype=np.float64)
    w = np.exp(r - r.max())
    w /= w.sum()
    mix = sum(wd * np.asarray(p, dtype=np.float64) for wd, p in zip(w, doc_probs))
    mix = mix / mix.sum()
    if engine_top_k:
        mix = top_k_form(mix, engine_top_k)
    if not top_k:
        with np.errstate(divide="ignore"):
            lp32 = np.log(mix).astype(np.float32)
        out = np.exp(lp32.astype(np.float64))
        return out / out.sum()
    return top_k_form(mix, top_k)


def top_k_form(mix: np.ndarray, top_k: int) -> np.ndarray:
    """``mix`` as its ``top_k`` most likely ids with float16 log-probs and an even tail."""
    vocab = mix.size
    with np.errstate(divide="ignore"):
        lp = np.log(mix)
    ids = np.lexsort((np.arange(vocab), -lp))[:top_k]
    listed = np.exp(lp[ids].astype(np.float16).astype(np.float64))
    out = np.full(vocab, max(0.0, 1.0 - listed.sum()) / (vocab - ids.size) if ids.size < vocab else 0.0)
    out[ids] = listed / max(1.0, listed.sum())
    return out


def mixture(sides: Sequence[tuple[Sequence[np.ndarray], Sequence[float], int]], top_k: int,
            swap_weights: bool = False) -> np.ndarray:
    """``p = Σ_s η^s p^s`` over the sides ``[(per-document probs, scores, engine_top_k), ...]``.
    ``swap_weights`` gives the sides each other's η: a deliberately wrong law (the bug of
    mixing up η^local and η^remote), for stating a test's power against it."""
    mass = [np.logaddexp.reduce(np.asarray(r, dtype=np.float64)) for _, r, _ in sides]
    eta = np.exp(np.asarray(mass) - max(mass))
    eta /= eta.sum()
    if swap_weights:
        eta = eta[::-1]
    return sum(e * side_probs(p, r, top_k, ek) for e, (p, r, ek) in zip(eta, sides))


def kept(p: np.ndarray, top_k: int = 0, top_p: float = 1.0, k_slack: float = 0.0,
         p_slack: float = 0.0) -> np.ndarray:
    """The ids top-k then top-p truncation keeps (a boolean mask). With slack, the ids a
    slightly different ``p`` could keep too: top-k keeps values down to ``(1 - k_slack)`` of the
    k-th, top-p keeps while the mass before an id is below ``top_p + p_slack``."""
    q = np.asarray(p, dtype=np.float64).copy()
    if top_k and top_k < q.size:
        q[q < np.sort(q)[::-1][top_k - 1] * (1.0 - k_slack)] = 0.0
    if top_p < 1.0:
        total, before = q.sum(), 0.0
        for i in np.lexsort((np.arange(q.size), -q)):  # descending, ties: smaller id first
            if before >= min(top_p + p_slack, 1.0) * total:  # the prefix before this id already reaches top_p
                q[i] = 0.0
            before += q[i]
    return q > 0.0


def truncate(p: np.ndarray, top_k: int = 0, top_p: float = 1.0) -> np.ndarray:
    """The law a token is drawn from: top-k then top-p truncation of ``p``, renormalised."""
    q = np.where(kept(p, top_k, top_p), np.asarray(p, dtype=np.float64), 0.0)
    return q / q.sum()


async def step_sides(groups) -> list[tuple[list[np.ndarray], Sequence[float], int]]:
    """``[(per-document next-token probabilities, scores, engine_top_k), ...]``, one per
    ``(group, scores, engine_top_k)``: the sides ``mixture`` takes."""
    return [([d.probs() for d in await g.next_dists()], scores, ek) for g, scores, ek in groups]


async def greedy(groups, top_k: int, max_tokens: int, eos_ids) -> list[int]:
    """Greedy centralized decoding over ``groups = [(StreamGroup, scores), ...]`` (ties: smaller id)."""
    out: list[int] = []
    while len(out) < max_tokens:
        tok = int(np.argmax(mixture(await step_sides(groups), top_k)))
        out.append(tok)
        if tok in eos_ids:
            break
        for g, *_ in groups:
            await g.append([tok])
    return out


async def joint_law(groups, steps: int, top_k: int, sample_top_k: int, top_p: float,
                    eos_ids, swap_weights: bool = False, near: set | None = None,
                    slack: tuple[float, float] = (0.0, 0.0)) -> dict[tuple[int, ...], float]:
    """The law of the first ``steps`` sampled tokens: ``{(t1, ..., tn): probability}`` (an answer
    that ends with EOS earlier is a shorter tuple). Every branch is expanded with append and
    rollback on the groups, which end at length 0.

    ``near`` collects the prefixes that end in an id truncation drops but would keep with
    ``slack = (k_slack, p_slack)`` (see ``kept``): outcomes the law gives 0 only by a margin
    the engines' rounding can cross."""
    law: dict[tuple[int, ...], float] = {}

    async def expand(prefix: tuple[int, ...], mass: float) -> None:
        mix = mixture(await step_sides(groups), top_k, swap_weights)
        q = truncate(mix, sample_top_k, top_p)
        if near is not None:
            near.update(prefix + (int(t),) for t in np.flatnonzero(kept(mix, sample_top_k, top_p, *slack) & (q == 0)))
        for tok in np.flatnonzero(q):
            seq, pm = prefix + (int(tok),), mass * float(q[tok])
            if len(seq) == steps or int(tok) in eos_ids:
                law[seq] = law.get(seq, 0.0) + pm
                continue
            for g, *_ in groups:
                await g.append([int(tok)])
            await expand(seq, pm)
            for g, *_ in groups:
                await g.rollback(len(prefix))

    await expand((), 1.0)
    return law


def pooled(law: dict[tuple[int, ...], float], n: int, min_expected: float = 5.0) -> list[list[tuple[int, ...]]]:
    """Cells for a χ² test: every outcome expected ``>= min_expected`` times in ``n`` runs is a
    cell of its own, the rest are pooled into one cell (merged into the smallest cell if even the
    pool is expected less often). A function of ``law`` and ``n`` only, fixed before sampling."""
    big = [[o] for o, pr in sorted(law.items(), key=lambda kv: -kv[1]) if n * pr >= min_expected]
    rest = [o for o, pr in law.items() if n * pr < min_expected]
    if rest:
        if n * sum(law[o] for o in rest) >= min_expected or not big:
            big.append(rest)
        else:
            big[-1] = big[-1] + rest
    return big


def cell_of(outcome: tuple[int, ...], cells: list[list[tuple[int, ...]]], near: set = frozenset()) -> int | None:
    """The index of ``outcome``'s cell; an outcome near a truncation boundary (a prefix of it is
    in ``near``, see ``joint_law``) joins the last, least likely cell; None: impossible."""
    for i, cell in enumerate(cells):
        if outcome in cell:
            return i
    if any(outcome[:j] in near for j in range(1, len(outcome) + 1)):
        return len(cells) - 1
    return None


def cell_probs(law: dict[tuple[int, ...], float], cells: list[list[tuple[int, ...]]],
               near: set = frozenset()) -> np.ndarray:
    """Each cell's mass under ``law`` (the mass of impossible outcomes is in no cell)."""
    out = np.zeros(len(cells))
    for o, pr in law.items():
        i = cell_of(o, cells, near)
        if i is not None:
            out[i] += pr
    return out


def cell_counts(outcomes: Sequence[tuple[int, ...]], cells: list[list[tuple[int, ...]]],
                near: set = frozenset()) -> np.ndarray:
    """How many ``outcomes`` fall in each cell (each must have one)."""
    counts = np.zeros(len(cells), dtype=np.int64)
    for o in outcomes:
        counts[cell_of(o, cells, near)] += 1
    return counts
