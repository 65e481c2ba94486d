"""A sink+window key/value cache built on transformers' per-layer cache classes.

After every ``update`` a layer keeps the first ``start_size`` tokens it has seen (the
attention sinks) and the last ``recent_size`` ones. With ``positions="shifted"`` the
kept recent keys are rotated back by the number of tokens just evicted, so that they
sit in consecutive slots right after the sinks (see docs/semantics.md).
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer, DynamicSlidingWindowLayer

from .rotary import RotaryShift, find_rotary
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


SUPPORTED_LAYER_TYPES = ("full_attention", "sliding_attention with a window of at least C + 1 tokens")

# model_type -> how positions reach the model. Only these are accepted: each one's position scheme and
# attention path (transformers' AttentionInterface) are tested in tests/test_architectures.py. An
# unlisted model may rotate keys in another layout, skip RoPE on some layers or use ALiBi, which the
# cache would get silently wrong.
ABSOLUTE = "learned absolute positions"
SUPPORTED_ARCHITECTURES = {
    "llama": "RoPE",
    "mistral": "RoPE",
    "qwen2": "RoPE",
    "qwen3": "RoPE",
    "phi3": "RoPE, partial allowed",
    "gemma2": "RoPE",
    "gemma3_text": "RoPE, the same for local and global layers",
    "gpt_neox": "partial RoPE",
    "gpt2": ABSOLUTE,
}


def _supported_list() -> str:
    return ", ".join(f"{name} ({scheme})" for name, scheme in SUPPORTED_ARCHITECTURES.items())


def check_model_supported(model, settings: StreamingSettings | None = None) -> None:
    """Raise a clear ``NotImplementedError`` for models a sink+window cache cannot serve exactly.

    Sliding-window layers are accepted only with ``settings`` whose ``C + 1`` keys per step fit inside
    the window (the window then never masks a key the cache holds); without ``settings`` they are refused.
    """
    config = model.config
    if getattr(config, "is_encoder_decoder", False):
        raise NotImplementedError(
            f"streaming_lm supports decoder-only models; {config.model_type} is encoder-decoder"
        )
    reference = DynamicCache(config=config)
    kinds = {type(layer).__name__ for layer in reference.layers}
    if reference.layers and not kinds <= {"DynamicLayer", "DynamicSlidingWindowLayer"}:
        raise NotImplementedError(
            f"{config.model_type} has cache layers of kind {sorted(kinds)}: recurrent, linear-attention, "
            "sliding-window or hybrid layers cannot be trimmed to a sink+window cache. "
            f"Supported: decoder-only models whose every layer is one of {SUPPORTED_LAYER_TYPES}"
        )
    if config.model_type not in SUPPORTED_ARCHITECTURES:
        raise NotImplementedError(
            f"streaming_lm does not support model_type {config.model_type!r}: its position scheme and attention "
            f"path are not verified. Supported model types: {_supported_list()}"
        )
    text = config.get_text_config(decoder=True)
    if getattr(text, "use_bidirectional_attention", False) or getattr(text, "attention_chunk_size", None):
        raise NotImplementedError(
            f"{config.model_type} with bidirectional or chunked attention is not a causal sink+window model. "
            f"Supported: causal decoders of model types {_supported_list()}"
        )
    windows = [layer.sliding_window for layer in reference.layers if type(layer) is DynamicSlidingWindowLayer]
    if windows:
        window = min(windows)
        if settings is None or window < settings.capacity + 1:
            why = (
                "the cache settings were not given, so C is unknown" if settings is None
                else f"here C = {settings.capacity}; use start_size + recent_size <= {window - 1}"
            )
            raise NotImplementedError(
                f"{config.model_type} has sliding-window attention layers (DynamicSlidingWindowLayer, window "
                f"{window} tokens): a sink+window cache can stand in for them only when one step's C + 1 keys fit "
                f"inside the window ({why}). Supported: decoder-only models whose every layer is one of "
                f"{SUPPORTED_LAYER_TYPES}"
            )
    shift = find_rotary(model)  # raises for local/global or sequence-dependent RoPE
    if shift is None:
        if SUPPORTED_ARCHITECTURES[config.model_type] != ABSOLUTE:
            raise NotImplementedError(f"{config.model_type}: no rotary embedding found; supported: {_supported_list()}")
        limit = getattr(text, "max_position_embeddings", None)
        if settings is not None and limit is not None and settings.capacity >= limit:
            raise NotImplementedError(
                f"{config.model_type} has learned absolute positions 0..{limit - 1}, but streaming positions reach "
                f"C = {settings.capacity}. Supported: start_size + recent_size <= {limit - 1} (and, with "
                f"positions=original, streams of at most {limit} tokens)"
            )


def num_decoder_layers(model) -> int:
    return model.config.get_text_config(decoder=True).num_hidden_layers
