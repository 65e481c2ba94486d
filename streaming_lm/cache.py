"""A sink+window key/value cache built on transformers' per-layer cache classes.

After every ``update`` a layer keeps the first ``start_size`` tokens it has seen (the
attention sinks) and the last ``recent_size`` ones. With ``positions="shifted"`` the
kept recent keys are rotated back by the number of tokens just evicted, so that they
sit in consecutive slots right after the sinks (see docs/semantics.md).
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer

from .rotary import RotaryShift
from .settings import StreamingSettings


class SinkWindowLayer(DynamicLayer):
    """One layer's cache: sinks plus a recent window, trimmed inside ``update``."""

    def __init__(self, start_size: int, recent_size: int, shift: RotaryShift | None = None):
        super().__init__()
        self.start_size = start_size
        self.recent_size = recent_size
        self.shift = shift
        self.evicted = 0

    @property
    def capacity(self) -> int:
        return self.start_size + self.recent_size

    def update(self, key_states, value_states, *args, **kwargs):
        # Attention of this step sees everything held plus the new tokens.
        keys, values = super().update(key_states, value_states, *args, **kwargs)
        excess = keys.shape[-2] - self.capacity
        if excess > 0:
            self._keep(keys, values, excess)
        return keys, values

    def _keep(self, keys, values, excess: int):
        start = self.start_size
        recent_keys = keys[..., -self.recent_size :, :]
        if self.shift is not None:
            recent_keys = self.shift.rotate(recent_keys, -excess)
        self.keys = torch.cat((keys[..., :start, :], recent_keys), dim=-2)
        self.values = torch.cat((values[..., :start, :], values[..., -self.recent_size :, :]), dim=-2)
        self.evicted += excess

    def get_max_length(self) -> int:
        return self.capacity

    def reset(self) -> None:
        super().reset()
        self.evicted = 0


class SinkWindowCache(Cache):
    """A ``Cache`` of ``SinkWindowLayer`` s, one per decoder layer."""

    def __init__(self, num_layers: int, settings: StreamingSettings, shift: RotaryShift | None):
        # Original positions keep every key's phase; only shifted slots need re-rotation.
        layer_shift = shift if settings.positions == "shifted" else None
        layers = [SinkWindowLayer(settings.start_size, settings.recent_size, layer_shift) for _ in range(num_layers)]
        super().__init__(layers=layers)
        self.settings = settings

    @property
    def evicted_tokens(self) -> int:
        """Tokens evicted so far (the same at every layer)."""
        return self.layers[0].evicted

    def held_tokens(self) -> list[int]:
        return [layer.get_seq_length() for layer in self.layers]


SUPPORTED_LAYER_TYPES = ("full_attention",)


def check_model_supported(model) -> None:
    """Raise a clear error for models whose cache a sink+window layer cannot replace."""
    config = model.config
    if getattr(config, "is_encoder_decoder", False):
        raise NotImplementedError(
            f"streaming_lm supports decoder-only models; {config.model_type} is encoder-decoder"
        )
    reference = DynamicCache(config=config)
    kinds = {type(layer).__name__ for layer in reference.layers}
    if reference.layers and kinds != {"DynamicLayer"}:
        raise NotImplementedError(
            f"{config.model_type} has cache layers of kind {sorted(kinds)}: recurrent, linear-attention, "
            "sliding-window or hybrid layers cannot be trimmed to a sink+window cache. "
            f"Supported: decoder-only models whose every layer is one of {SUPPORTED_LAYER_TYPES}"
        )


def num_decoder_layers(model) -> int:
    return model.config.get_text_config(decoder=True).num_hidden_layers
