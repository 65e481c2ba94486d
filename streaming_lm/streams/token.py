"""The token loop: one token per forward pass through the model's own attention, the cache trimmed
after every step. The reference every faster path is tested against (docs/semantics.md)."""

from __future__ import annotations

import contextlib

import torch

from ..positions import check_positions_fit, query_position
from ..rotary import RotaryShift
from ..settings import StreamingSettings
from ..forward_args import num_decoder_layers
from ..methods.base import HEADS, INDEX, SCORED
from ..storage import EvictingDynamicCache, ScoredDynamicCache
from .attention import attention_function, run_pass
from .base import EvictingStream, as_ids
from .weights import ATTENTION_NAME, after_step, hand_over, weights_from_outputs


class TokenStream(EvictingStream):
    """``method="token"``: an ``EvictingDynamicCache`` (index-only policies) or a ``ScoredDynamicCache`` in the
    settings' own position mode."""

    def __init__(self, model, settings: StreamingSettings, shift: RotaryShift | None, batch_size: int = 1, policy=None):
        super().__init__(model, settings, shift, policy=policy)
        # A policy that scores by attention gets this step's weights from our attention function, or, where the
        # model's attention does not reach it, from the weights its eager attention returns.
        # Heads holding different tokens (duo) need it too: it masks the padding of the heads holding fewer.
        kind, observes = self.policy.kind, self.policy.observes
        weights = kind == HEADS or kind == SCORED and bool(observes & {"attention", "queries", "scale"})
        # A score of keys and values alone: every layer's event after the pass (the step attended to all C + 1).
        self._after_pass = kind == SCORED and not weights
        self._returned = weights and weights_from_outputs(model)
        if self._returned and kind == HEADS:
            raise ValueError(f"policy={settings.policy} holds different tokens in different heads, which "
                             f"{type(model).__name__}'s own attention code cannot mask; use evict_every=context or "
                             f"another policy")
        if self._returned and "queries" in observes:
            raise ValueError(
                f"policy={settings.policy} scores with the queries of each segment, which {type(model).__name__}'s "
                "own attention code does not expose (only its weights, through output_attentions); use a policy "
                "that scores by weights or keys (tova, h2o, knorm, sink_window)"
            )
        self._weights = weights and not self._returned
        if self._returned:
            self._kwargs = tuple(kwargs | {"output_attentions": True} for kwargs in self._kwargs)

    def new_cache(self):
        # Original positions keep every key's phase; only shifted slots need re-rotation on eviction.
        rotate = self.shift if self.settings.positions == "shifted" else None
        storage = EvictingDynamicCache if self.policy.kind == INDEX else ScoredDynamicCache
        return storage(num_decoder_layers(self.model), self.policy, rotate)

    def read_passes(self, ids, last_only: bool = False):
        ids = as_ids(ids, self.model.device)
        check_positions_fit(self.model, self.n + ids.numel(), self._limit)
        with self._attention():
            for i, token in enumerate(ids.tolist()):
                yield i, self.step(token)[None]

    def _attention(self):
        if self._weights:
            return attention_function(self.model, ATTENTION_NAME)
        # output_attentions returns weights from eager attention only (SDPA gives None)
        return attention_function(self.model, "eager") if self._returned else contextlib.nullcontext()

    @torch.inference_mode()
    def step(self, token: int) -> torch.Tensor:
        check_positions_fit(self.model, self.n + 1, self._limit)
        ids = torch.tensor([[token]], device=self.model.device)
        position = torch.tensor([[query_position(self.n, self.settings)]], device=ids.device)
        forward = dict(input_ids=ids, position_ids=position, **self._kwargs[False])
        with self._attention():
            out = run_pass(self.model, ATTENTION_NAME, self.cache, **forward) if self._weights else self.model(**forward)
        if self._returned:
            hand_over(self.cache, out.attentions, self.settings.policy, self.model)
        elif self._after_pass:
            for layer in self.cache.layers:
                after_step(layer)
        self.n += 1
        self.note_held()
        return out.logits[0, -1].float()
