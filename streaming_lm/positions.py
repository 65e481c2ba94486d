"""Position arithmetic of docs/semantics.md, in one place: p(t), r0 and the position limits.

Every execution path asks this module where a query or key sits; none re-derives it.
"""

from __future__ import annotations

import torch

from .rotary import rotary_position_limit, rotary_table
from .settings import StreamingSettings


def query_position(t, settings: StreamingSettings):
    """p(t): the position of the query of step t (cache slots when shifted, text positions when original).

    Shifted: the keys step t attends are what the layer kept at the last event ``e <= t`` (``min(e, C)`` of
    them) and the ``t - e`` tokens read since, so the query sits at ``min(e, C) + t - e`` (``min(t, C)`` with
    ``evict_every=1``). ``t`` is an int or a tensor of steps."""
    if settings.positions != "shifted":
        return t
    event = settings.schedule.last_event(t)
    if isinstance(t, torch.Tensor):
        return event.clamp(max=settings.capacity) + t - event
    return min(event, settings.capacity) + t - event


def context_position(t, evicted: int, settings: StreamingSettings):
    """The context regime: the position of token ``t`` once ``evicted`` tokens (per head) went at the event: ``t``
    (original), or ``t - evicted`` (shifted: the kept keys were re-rotated to ``0 .. kept - 1``, kvpress's
    KeyRerotationPress). ``t`` is an int or a tensor."""
    return t - evicted if settings.positions == "shifted" else t


def first_recent(n: int, settings: StreamingSettings) -> int:
    """r0 = max(S, e - W), ``e`` the last event at or before n tokens read (``n`` itself with
    ``evict_every=1``): the oldest recent (non-sink) token a sink+window layer holds after reading n tokens
    (while e < S it lies beyond the last event, and the recent run is what was read since). Also the origin of
    the chunked path's local frame."""
    return max(settings.start_size, settings.schedule.last_event(n) - settings.recent_size)


def position_limit(model, settings: StreamingSettings, rotary: bool) -> int | None:
    """The most tokens a stream may hold: learned absolute positions end at max_position_embeddings (RoPE:
    ``rotary_position_limit``), and positions=original reads token t at t. None: no limit (fixed RoPE,
    shifted, recompute). The context regime reads its prefill at text positions, whatever ``positions`` says."""
    if settings.positions != "original" and not settings.context_regime or settings.method == "recompute":
        return None
    if rotary:
        return rotary_position_limit(model)
    return getattr(model.config.get_text_config(decoder=True), "max_position_embeddings", None)


def check_positions_fit(model, n_tokens: int, limit: int | None) -> None:
    if limit is not None and n_tokens > limit:
        if rotary_table(model) is not None:
            kind = "rotary positions (a fixed table)"
        elif rotary_position_limit(model) is not None:
            kind = "fixed RoPE frequencies at positions"
        else:
            kind = "learned positions"
        raise ValueError(
            f"positions=original reads token t at position t, but {model.config.model_type} has {kind} "
            f"0..{limit - 1} only and this stream has {n_tokens} tokens; use positions=shifted (positions stay "
            f"below C) or streams of at most {limit} tokens"
        )
