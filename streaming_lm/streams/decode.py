"""Decoding: one token per pass from an ``EvictingStaticCache`` (no copies, no per-token re-rotation)."""

from __future__ import annotations

import torch

from ..positions import check_positions_fit
from ..storage import EvictingStaticCache
from .base import CachedStream, as_ids, forward_kwargs


class DecodeStream(CachedStream):
    """The token loop's numbers for one-token steps, continuing a stream another path has read."""

    def __init__(self, model, settings, shift, cache: EvictingStaticCache, limit, max_held: int):
        self.model, self.settings, self.shift, self.cache = model, settings, shift, cache
        self._limit = limit
        self.n, self.max_held = cache.n, max_held
        self._kwargs = forward_kwargs(model, cache)

    @classmethod
    def from_dynamic(cls, stream) -> DecodeStream:
        """Take over a chunked stream's dynamic cache (recent keys in its local frame)."""
        cache = EvictingStaticCache.from_dynamic(stream.cache, stream.n, stream.settings, stream.shift)
        decoder = cls(stream.model, stream.settings, stream.shift, cache, stream._limit, stream.max_held)
        decoder.held_per_layer, decoder.held_per_head = stream.held_per_layer, stream.held_per_head
        return decoder

    def _shared(self):
        return (self.shift, self.cache.policy)

    def read_passes(self, ids, last_only: bool = False):
        for i, token in enumerate(as_ids(ids, self.model.device).tolist()):
            yield i, self.step(token)[None]

    @torch.inference_mode()
    def step(self, token: int) -> torch.Tensor:
        check_positions_fit(self.model, self.n + 1, self._limit)
        ids = torch.tensor([[token]], device=self.model.device)
        position = self.cache.begin_step()
        out = self.model(input_ids=ids, position_ids=torch.tensor([[position]], device=ids.device), **self._kwargs[False])
        self.cache.end_step()
        self.n += 1
        self.note_held()
        return out.logits[0, -1].float()
