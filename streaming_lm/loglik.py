"""Log-likelihoods of text (not eviction scores: those are methods/'s): what reading a stream returns, the check
that a stream really streamed, and the running maximum of what a cache held."""

from __future__ import annotations

import dataclasses

import torch

from .settings import StreamingSettings


def most_held(before: tuple, now) -> tuple:
    """The running maximum of what a cache held: per layer (``now`` ints) or per layer and key/value head (``now``
    sequences of ints), element by element. Something empty (nothing read yet; a path with no cache: recompute; a
    layer that holds nothing yet) takes the other; any other difference of shape is a bug, and raises."""
    now = tuple(tuple(x) if isinstance(x, (list, tuple)) else x for x in now)
    if not before or not now:
        return now or before
    if len(before) != len(now):
        raise ValueError(f"held counts of another shape: {len(before)} layers before, {len(now)} now")
    return tuple(_most(old, new) for old, new in zip(before, now))


def _most(old, new):
    if not isinstance(new, tuple):
        return max(old, new)
    if not old or not new:
        return new or old
    if len(old) != len(new):
        raise ValueError(f"held counts of another shape: {len(old)} key/value heads before, {len(new)} now")
    return tuple(map(max, old, new))


class NoEvictionError(RuntimeError):
    """A stream longer than the cache finished without evicting: it did not stream."""


@dataclasses.dataclass
class StreamScore:
    logprobs: torch.Tensor  # float32 [n - 1]: log p(x_{t+1} | visible set of step t)
    evicted: int  # tokens evicted from the cache over the stream
    max_held: int  # most tokens any layer held between steps (recompute: tokens in a window)
    greedy: torch.Tensor | None = None  # bool [n - 1]: x_{t+1} was the argmax (recompute only)
    held_per_layer: tuple[int, ...] = ()  # the most tokens each layer held between passes (cache paths)
    held_per_head: tuple[tuple[int, ...], ...] = ()  # the most each key/value head of each layer held


@dataclasses.dataclass
class ContinuationScore:
    logprob: float  # sum of log p(continuation token) over the continuation
    is_greedy: bool  # every continuation token was the argmax at its position
    evicted: int  # tokens evicted over the stream context + continuation
    held_per_layer: tuple[int, ...] = ()  # the most tokens each layer held between passes (cache paths)
    kept_per_layer: tuple[float, ...] = ()  # evict_every=context: held per layer right after the event (head mean)
    held_per_head: tuple[tuple[int, ...], ...] = ()  # the most each key/value head of each layer held


def target_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log p(targets[i]) under logits[i] ([len, vocab] and [len]), float32."""
    return torch.log_softmax(logits.float(), dim=-1).gather(-1, targets[:, None])[:, 0]


def check_evicted(n_tokens: int, evicted: int, settings: StreamingSettings) -> None:
    """A stream of ``n_tokens`` reads all but its last; once an event falls after more than C tokens were read
    (docs/semantics.md, "Events"), something must have been evicted."""
    read = n_tokens - 1
    if settings.context_regime:  # one event per request, placed by the request walk; ContextStream.compress keeps the count
        return
    if settings.keys_attended is None:  # duo: its pattern, not C, sizes its streaming heads (bound at stream open)
        return
    if settings.schedule.last_event(read) > settings.capacity and evicted == 0:
        raise NoEvictionError(
            f"a stream of {n_tokens} tokens passed a cache of {settings.capacity} tokens without a single "
            "eviction: the model did not use the streaming cache, so the result would be the dense one"
        )
