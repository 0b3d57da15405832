"""transformers backend: the exact reference (bf16 weights of the converted folder, computed in
float32 on CPU by default).

The k streams are one batch sharing a ``DynamicCache``. Prompts of unequal length are
*left*-padded and masked, so every stream's last prompt token sits in the same column and the
generated tokens, being the same for all streams, stay column-aligned: rollback is one
``crop`` of the batch's cache. Position ids are passed explicitly (prompt length + generated
index), so padding does not shift any stream's positions.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np

from dragon_edge.engines.common import LockstepGroup, Worker, check_prompts, check_temperature


class HFEngine:
    """Opens stream groups on one transformers causal LM."""

    def __init__(self, model_dir: str | Path, *, dtype: str = "float32", n_threads: int | None = None,
                 attn_implementation: str = "sdpa") -> None:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        import torch
        from transformers import AutoModelForCausalLM
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # one bar per weight group is noise in a server log

        if n_threads:
            torch.set_num_threads(n_threads)
        self._torch = torch
        self.path = Path(model_dir)
        self.dtype = getattr(torch, dtype)
        self._model = AutoModelForCausalLM.from_pretrained(
            str(model_dir), dtype=self.dtype, attn_implementation=attn_implementation).eval()
        config = self._model.config
        self._vocab_size = int(config.vocab_size)
        self.max_len = int(config.max_position_embeddings)
        self._worker = Worker("hf")

    @classmethod
    def from_name(cls, model: str, **kwargs) -> "HFEngine":
        from dragon_host.models import get_model

        return cls(get_model(model).hf_dir(), **kwargs)

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    async def open_group(self, prompts: Sequence[Sequence[int]], temperature: float = 1.0) -> "HFGroup":
        prompts = check_prompts(prompts, self._vocab_size, self.max_len)
        temperature = check_temperature(temperature)
        group = HFGroup(self, prompts, temperature)
        logits = await self._worker.run(group._prefill)
        group._set_first(logits)
        return group

    async def close(self) -> None:
        self._worker.shutdown()
        self._model = None

    def _forward(self, input_ids, attention_mask, position_ids, cache) -> np.ndarray:
        with self._torch.inference_mode():
            out = self._model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                              past_key_values=cache, use_cache=True, logits_to_keep=1)
        return out.logits[:, -1, :].float().numpy()


class HFGroup(LockstepGroup):
    """k streams = the rows of one left-padded batch."""

    def __init__(self, engine: HFEngine, prompts: list[list[int]], temperature: float) -> None:
        torch = engine._torch
        super().__init__(prompts, temperature, engine.vocab_size, engine.max_len, engine._worker, None)
        self._engine, self._torch = engine, torch
        self._width = max(len(p) for p in prompts)  # padded prompt width (columns)
        self._lens = torch.tensor([len(p) for p in prompts]).unsqueeze(1)
        self._prompt_mask = torch.zeros((len(prompts), self._width), dtype=torch.long)
        for i, p in enumerate(prompts):
            self._prompt_mask[i, self._width - len(p):] = 1
        self._cache = None

    def _set_first(self, logits: np.ndarray) -> None:
        self._dists = self._to_dists(logits)

    def _prefill(self) -> np.ndarray:
        from transformers import DynamicCache

        torch = self._torch
        ids = torch.zeros((self.num_streams, self._width), dtype=torch.long)  # pad id: masked out
        for i, p in enumerate(self.prompts):
            ids[i, self._width - len(p):] = torch.tensor(p)
        positions = (self._prompt_mask.cumsum(1) - 1).clamp(min=0)
        self._cache = DynamicCache()
        return self._engine._forward(ids, self._prompt_mask, positions, self._cache)

    def _feed(self, start: int, tails: list[list[int]]) -> np.ndarray:
        torch = self._torch
        ids = torch.tensor(tails, dtype=torch.long)
        end = start + ids.shape[1]
        ones = torch.ones((self.num_streams, end), dtype=torch.long)
        mask = torch.cat([self._prompt_mask, ones], dim=1)
        positions = self._lens + torch.arange(start, end).unsqueeze(0)
        return self._engine._forward(ids, mask, positions, self._cache)

    def _drop(self, keep: int) -> None:
        _crop(self._cache, self._width + keep)

    def _release(self) -> None:
        self._cache = None


def _crop(cache, keep: int) -> None:
    """Keep the first ``keep`` columns. A negative argument means "remove that many" in every
    transformers version since 4.4x; a positive one changed meaning (and is deprecated) in 5."""
    remove = cache.get_seq_length() - keep
    if remove > 0:
        cache.crop(-remove)
