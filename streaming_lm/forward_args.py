"""What a model's forward takes: its decoder depth and keyword arguments (no streaming logic).

Kept apart from ``support`` so that the support checks can run the streams (its start-up self-check)
while the streams still ask these questions without an import cycle.
"""

from __future__ import annotations

import inspect


def num_decoder_layers(model) -> int:
    return model.config.get_text_config(decoder=True).num_hidden_layers


def num_key_value_heads(model) -> int:
    """Key/value heads per layer (the query heads where the model has no grouped-query attention)."""
    config = model.config.get_text_config(decoder=True)
    return getattr(config, "num_key_value_heads", None) or config.num_attention_heads


def head_dim(model) -> int:
    """Features per attention head (the config's ``head_dim``, else hidden size over query heads)."""
    config = model.config.get_text_config(decoder=True)
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def forward_takes(model, name: str) -> bool:
    """Whether ``model.forward`` has a parameter ``name`` (inspect once per stream, not per pass)."""
    return name in inspect.signature(model.forward).parameters


def cache_kwarg(model) -> str:
    """transformers 5 is renaming ``past_key_values`` to ``cache``; use whichever forward takes."""
    return "cache" if forward_takes(model, "cache") else "past_key_values"
