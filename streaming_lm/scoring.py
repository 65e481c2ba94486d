"""Scoring one stream under a sink+window cache: token ids in, log-probabilities out.

``score_stream`` is the reference: one token per forward pass with the cache trimmed
after every step, exactly the loop of docs/semantics.md.
"""

from __future__ import annotations

import dataclasses
import inspect

import torch
from tqdm.auto import tqdm

from .rotary import RotaryShift
from .settings import StreamingSettings


class NoEvictionError(RuntimeError):
    """A stream longer than the cache finished without evicting: it did not stream."""


@dataclasses.dataclass
class StreamScore:
    logprobs: torch.Tensor  # float32 [n - 1]: log p(x_{t+1} | visible set of step t)
    evicted: int  # tokens evicted from the cache over the stream
    max_held: int  # most tokens any layer held between steps (recompute: tokens in a window)
    greedy: torch.Tensor | None = None  # bool [n - 1]: x_{t+1} was the argmax (recompute only)


def forward_takes(model, name: str) -> bool:
    """Whether ``model.forward`` has a parameter ``name`` (inspect once per stream, not per pass)."""
    return name in inspect.signature(model.forward).parameters


def cache_kwarg(model) -> str:
    """transformers 5 is renaming ``past_key_values`` to ``cache``; use whichever forward takes."""
    return "cache" if forward_takes(model, "cache") else "past_key_values"


def target_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log p(targets[i]) under logits[i] ([len, vocab] and [len]), float32."""
    return torch.log_softmax(logits.float(), dim=-1).gather(-1, targets[:, None])[:, 0]


def position_of(t: int, settings: StreamingSettings) -> int:
    """p(t): the query position of step t."""
    return min(t, settings.capacity) if settings.positions == "shifted" else t


def check_evicted(n_tokens: int, evicted: int, settings: StreamingSettings) -> None:
    if n_tokens > settings.capacity + 1 and evicted == 0:
        raise NoEvictionError(
            f"a stream of {n_tokens} tokens passed a cache of {settings.capacity} tokens without a single "
            "eviction: the model did not use the streaming cache, so the result would be the dense one"
        )


def position_limit(model, settings: StreamingSettings, shift: RotaryShift | None) -> int | None:
    """The most tokens a stream may hold: learned absolute positions end at max_position_embeddings,
    and positions=original reads token t at t. None: no limit (rotary, shifted, recompute)."""
    if shift is not None or settings.positions != "original" or settings.method == "recompute":
        return None
    return getattr(model.config.get_text_config(decoder=True), "max_position_embeddings", None)


def check_positions_fit(model, n_tokens: int, limit: int | None) -> None:
    if limit is not None and n_tokens > limit:
        raise ValueError(
            f"positions=original reads token t at position t, but {model.config.model_type} has learned positions "
            f"0..{limit - 1} only and this stream has {n_tokens} tokens; use positions=shifted (positions stay "
            f"below C) or streams of at most {limit} tokens"
        )


def score(
    model, token_ids, settings: StreamingSettings, shift: RotaryShift | None, progress: bool = False,
    batch_size: int = 1,
):
    """Score one stream with the method the settings name (``batch_size``: recompute windows per pass)."""
    check_positions_fit(model, len(token_ids), position_limit(model, settings, shift))
    if settings.method == "recompute":
        from .recompute import score_stream_recompute

        return score_stream_recompute(model, token_ids, settings, batch_size, progress)
    return score_with_stream(model, token_ids, settings, shift, progress)  # token loop or chunked


def score_stream(
    model,
    token_ids,
    settings: StreamingSettings,
    shift: RotaryShift | None,
    progress: bool = False,
) -> StreamScore:
    """Token-by-token streaming log-probabilities of ``token_ids[1:]``: the reference loop."""
    return score_with_stream(model, token_ids, dataclasses.replace(settings, method="token", stride=None), shift,
                             progress)


def score_with_stream(
    model, token_ids, settings: StreamingSettings, shift: RotaryShift | None, progress: bool = False
) -> StreamScore:
    """log p(x_{t+1}) for one whole stream read through a ``Stream`` (token loop or chunked, per ``settings``)."""
    from .stream import Stream  # stream.py builds on this module

    ids = torch.as_tensor(token_ids, dtype=torch.long).reshape(-1).to(model.device)
    stream = Stream(model, settings, shift)
    logprobs = stream_logprobs(stream, ids, progress)
    check_evicted(ids.numel(), stream.evicted, settings)
    return StreamScore(logprobs, stream.evicted, stream.max_held)


@torch.inference_mode()
def stream_logprobs(stream, ids: torch.Tensor, progress: bool = False) -> torch.Tensor:
    """float32 log p(ids[t+1]) for every t, reading ``ids[:-1]`` through ``stream.read_passes``.

    Each pass's logits are reduced at once, so never more than one pass of them is held.
    """
    logprobs = torch.empty(max(ids.numel() - 1, 0), dtype=torch.float32)
    if ids.numel() > 1:
        with tqdm(total=ids.numel() - 1, disable=not progress, desc="streaming tokens", leave=False) as bar:
            for a, logits in stream.read_passes(ids[:-1]):
                b = a + logits.shape[0]
                logprobs[a:b] = target_logprobs(logits, ids[a + 1 : b + 1]).cpu()
                bar.update(b - a)
    return logprobs
