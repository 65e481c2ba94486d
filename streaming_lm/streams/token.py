"""The token loop: one token per forward pass through the model's own attention, the cache trimmed
after every step. The reference every faster path is tested against (docs/semantics.md)."""

from __future__ import annotations

import contextlib

import torch

from ..policy import policy_for
from ..positions import check_positions_fit, position_limit, query_position
from ..rotary import RotaryShift
from ..settings import StreamingSettings
from ..forward_args import num_decoder_layers
from ..storage import EvictingDynamicCache, ScoredDynamicCache
from .base import CachedStream, as_ids, attention, forward_kwargs
from .weights import ATTENTION_NAME, CACHE_KWARG, hand_over, weights_from_outputs


class TokenStream(CachedStream):
    """``method="token"``: an ``EvictingDynamicCache`` in the settings' own position mode."""

    # Original positions keep every key's phase; only shifted slots need re-rotation on eviction.
    frame_rotates = False

    def __init__(self, model, settings: StreamingSettings, shift: RotaryShift | None, batch_size: int = 1):
        self.model, self.settings, self.shift = model, settings, shift
        self.policy = policy_for(settings)
        rotate = shift if (self.frame_rotates or settings.positions == "shifted") else None
        storage = EvictingDynamicCache if self.policy.index_only else ScoredDynamicCache
        self.cache = storage(num_decoder_layers(model), self.policy, rotate)
        self._limit = position_limit(model, settings, shift is not None)
        self.n = 0
        self.max_held = 0
        self._kwargs = forward_kwargs(model, self.cache)
        # A policy that scores by attention gets this step's weights from our attention function, or, where
        # attention runs in model code, from the weights the model returns.
        weights = not self.policy.index_only and self.policy.needs_attention
        self._returned = weights and weights_from_outputs(model)
        self._weights = weights and not self._returned
        if self._weights:
            self._kwargs = tuple(kwargs | {CACHE_KWARG: self.cache} for kwargs in self._kwargs)
        if self._returned:
            self._kwargs = tuple(kwargs | {"output_attentions": True} for kwargs in self._kwargs)

    def _shared(self):
        return (self.shift, self.policy)

    def read_passes(self, ids, last_only: bool = False):
        ids = as_ids(ids, self.model.device)
        check_positions_fit(self.model, self.n + ids.numel(), self._limit)
        with self._attention():
            for i, token in enumerate(ids.tolist()):
                yield i, self.step(token)[None]

    def _attention(self):
        return attention(self.model, ATTENTION_NAME) if self._weights else contextlib.nullcontext()

    @torch.inference_mode()
    def step(self, token: int) -> torch.Tensor:
        check_positions_fit(self.model, self.n + 1, self._limit)
        ids = torch.tensor([[token]], device=self.model.device)
        position = torch.tensor([[query_position(self.n, self.settings)]], device=ids.device)
        with self._attention():
            out = self.model(input_ids=ids, position_ids=position, **self._kwargs[False])
        if self._returned:
            hand_over(self.cache, out.attentions)
        self.n += 1
        self.max_held = max(self.max_held, *self.cache.held_tokens())
        return out.logits[0, -1].float()
