"""Which models a streaming cache serves exactly: the one registry, its checks and the forward's kwargs.

Every "supported types" message, the README's support table (``support_table()``, checked by
tests/test_support.py) and tests/test_architectures.py's coverage come from ``ARCHITECTURES``.
"""

from __future__ import annotations

import dataclasses
import inspect

import torch
from transformers.cache_utils import DynamicCache, DynamicSlidingWindowLayer

from .rotary import RotaryShift
from .settings import StreamingSettings

ROPE, ABSOLUTE = "RoPE", "learned absolute positions"


@dataclasses.dataclass(frozen=True)
class Architecture:
    """One row of the support table: model types proven alike on tiny random models."""

    model_types: tuple[str, ...]
    scheme: str  # ROPE or ABSOLUTE: how positions reach the model
    positions: str  # what the README says of the scheme
    modes: str  # what shifted / original mean there
    status: str


ARCHITECTURES = (
    Architecture(("llama", "qwen2", "qwen3", "mistral"), ROPE, "RoPE",
                 "as in docs/semantics.md: cache slots / text positions",
                 "supported; `shifted` also equals the naive loop (llama, mistral, qwen2)"),
    Architecture(("phi3",), ROPE, "RoPE, partial allowed", "as above; the non-rotary tail of each head is never moved",
                 "supported"),
    Architecture(("gpt_neox",), ROPE, "partial RoPE (`rotary_pct`)", "as above", "supported"),
    Architecture(("gemma2",), ROPE, "RoPE; sliding/full layers, attention soft-capping",
                 "as above; the soft-cap is applied in the chunked attention too",
                 "supported if `sliding_window ≥ C + 1`"),
    Architecture(("gemma3_text",), ROPE, "RoPE per layer type", "as above",
                 "supported only if local and global RoPE are the same (not so in released checkpoints: refused, "
                 '"uses several different rotary embeddings")'),
    Architecture(("gpt2",), ABSOLUTE, "learned absolute embeddings",
                 "token `t` is read at position `min(t, C)` / `t`; a key keeps the embedding it was read with",
                 "supported if `C < n_positions`; `original` only for streams of at most `n_positions` tokens"),
)
SUPPORTED_ARCHITECTURES = {name: arch.scheme for arch in ARCHITECTURES for name in arch.model_types}
SUPPORTED_LAYER_TYPES = ("full_attention", "sliding_attention with a window of at least C + 1 tokens")
# RoPE variants whose inv_freq the model rewrites in place depending on the longest position seen.
SEQUENCE_DEPENDENT_ROPE = ("dynamic", "longrope")


def supported_list() -> str:
    """The model types, for error messages."""
    return ", ".join(SUPPORTED_ARCHITECTURES)


def support_table() -> str:
    """The README's support table, generated from the registry."""
    lines = ["| model_type | positions | `shifted` / `original` there | status |", "|---|---|---|---|"]
    for arch in ARCHITECTURES:
        types = ", ".join(f"`{name}`" for name in arch.model_types)
        lines.append(f"| {types} | {arch.positions} | {arch.modes} | {arch.status} |")
    return "\n".join(lines)


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
            f"path are not verified. Supported model types: {supported_list()}"
        )
    text = config.get_text_config(decoder=True)
    if getattr(text, "use_bidirectional_attention", False) or getattr(text, "attention_chunk_size", None):
        raise NotImplementedError(
            f"{config.model_type} with bidirectional or chunked attention is not a causal sink+window model. "
            f"Supported: causal decoders of model types {supported_list()}"
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
            raise NotImplementedError(f"{config.model_type}: no rotary embedding found; supported: {supported_list()}")
        limit = getattr(text, "max_position_embeddings", None)
        if settings is not None and limit is not None and settings.capacity >= limit:
            raise NotImplementedError(
                f"{config.model_type} has learned absolute positions 0..{limit - 1}, but streaming positions reach "
                f"C = {settings.capacity}. Supported: start_size + recent_size <= {limit - 1} (and, with "
                f"positions=original, streams of at most {limit} tokens)"
            )


def find_rotary(model) -> RotaryShift | None:
    """The model's RoPE frequencies, or None for a model without rotary embeddings.

    Raises when layers use different frequencies (e.g. local/global RoPE), which one
    shared shift cannot serve, or frequencies that change with the sequence length.
    """
    found = [
        buf
        for name, buf in model.named_buffers()
        if name.endswith("inv_freq") and not name.endswith("original_inv_freq")
    ]
    if not found:
        return None
    model_type = getattr(model.config, "model_type", type(model).__name__)
    first = found[0]
    if any(b.shape != first.shape or not torch.equal(b, first) for b in found[1:]):
        rotary_types = ", ".join(name for name, scheme in SUPPORTED_ARCHITECTURES.items() if scheme == ROPE)
        raise NotImplementedError(
            f"{model_type} ({type(model).__name__}) uses several different rotary embeddings "
            "(e.g. separate local and global RoPE); streaming_lm supports one rotary embedding shared by "
            f"every layer ({rotary_types}; gemma3_text only when its local and global RoPE coincide)"
        )
    changing = sorted(rope_types(model.config) & set(SEQUENCE_DEPENDENT_ROPE))
    if changing:
        raise NotImplementedError(
            f"{model_type} uses rope_type {changing[0]!r}, whose frequencies change with the sequence length: "
            "keys rotated once cannot be moved with fixed frequencies. Supported: rotary embeddings with fixed "
            f"frequencies (rope_type default, linear, llama3, yarn, ...; not {', '.join(SEQUENCE_DEPENDENT_ROPE)})"
        )
    return RotaryShift(first)


def rope_types(config) -> set[str]:
    """The ``rope_type`` s a config names (one, or one per layer type as in Gemma3)."""
    params = getattr(config.get_text_config(decoder=True), "rope_parameters", None) or {}
    groups = [params] if "rope_type" in params else [p for p in params.values() if isinstance(p, dict)]
    return {group.get("rope_type", "default") for group in groups}


def num_decoder_layers(model) -> int:
    return model.config.get_text_config(decoder=True).num_hidden_layers


def forward_takes(model, name: str) -> bool:
    """Whether ``model.forward`` has a parameter ``name`` (inspect once per stream, not per pass)."""
    return name in inspect.signature(model.forward).parameters


def cache_kwarg(model) -> str:
    """transformers 5 is renaming ``past_key_values`` to ``cache``; use whichever forward takes."""
    return "cache" if forward_takes(model, "cache") else "past_key_values"
