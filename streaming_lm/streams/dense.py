"""The dense baseline behind the same interface: transformers' ``DynamicCache``, every token kept,
positions 0, 1, 2, ... (``scripts/throughput.py``'s baseline and ``bench_eval``'s bare loop)."""

from __future__ import annotations

import torch

from ..storage import DenseCache
from .base import CachedStream, forward_kwargs


class DenseStream(CachedStream):
    def __init__(self, model):
        self.model = model
        self.cache = DenseCache(config=model.config)
        self.n = 0
        self._kwargs = forward_kwargs(model, self.cache)

    @property
    def max_held(self) -> int:
        return self.n

    @torch.inference_mode()
    def read(self, ids, last_only: bool = False) -> torch.Tensor:
        """Every token in one pass (a prefill)."""
        ids = torch.as_tensor(ids, dtype=torch.long).reshape(1, -1).to(self.model.device)
        positions = torch.arange(self.n, self.n + ids.shape[1], device=ids.device)[None]
        out = self.model(input_ids=ids, position_ids=positions, **self._kwargs[last_only])
        self.n += ids.shape[1]
        logits = out.logits[0].float()
        self._last = logits[-1:]
        return logits[-1:] if last_only else logits

    def step(self, token: int) -> torch.Tensor:
        return self.read([token])[-1]

    def read_passes(self, ids, last_only: bool = False):
        """One token per pass (the bare transformers token loop): yields ``(offset, logits [1, vocab])``."""
        for i, token in enumerate(torch.as_tensor(ids).reshape(-1).tolist()):
            yield i, self.step(token)[None]
