"""Generation under a streaming cache (lm-eval's ``generate_until``).

The context is read into a stream (``open_stream``: chunked by default), then a plain decode loop feeds
one token per step (``Stream.step``: the token loop's numbers, from static slots for method=chunked),
evicting after every step: memory stays at ``C`` tokens however long the generation. ``decode`` takes
any ``Stream``, so the dense baseline of ``scripts/throughput.py`` runs through the very same loop.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import torch
from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from .rotary import RotaryShift
from .settings import StreamingSettings
from .streams import open_stream
from .streams.shared import WalkStats, read_contexts

# transformers' defaults for sampling when neither the request nor the model's generation config
# sets them (GenerationConfig._get_default_generation_params): do_sample=True means top_k=50 there too.
SAMPLING_DEFAULTS = {"temperature": 1.0, "top_k": 50, "top_p": 1.0}


def greedy(logits: torch.Tensor) -> int:
    return int(logits.argmax())


def sampler(temperature: float, top_k: int | None, top_p: float | None, generator=None) -> Callable:
    """Multinomial sampling after transformers' own temperature, top-k and top-p warpers."""
    warpers = LogitsProcessorList()
    if temperature != 1.0:
        warpers.append(TemperatureLogitsWarper(temperature))
    if top_k:
        warpers.append(TopKLogitsWarper(top_k))
    if top_p is not None and top_p < 1.0:
        warpers.append(TopPLogitsWarper(top_p))
    no_ids = torch.empty(1, 0, dtype=torch.long)  # the warpers used here ignore past ids

    def pick(logits: torch.Tensor) -> int:
        scores = warpers(no_ids.to(logits.device), logits[None].float())
        probs = torch.softmax(scores, dim=-1)
        return int(torch.multinomial(probs, 1, generator=generator))

    return pick


@dataclasses.dataclass
class Generation:
    tokens: list[int]  # generated ids (a stop token included, as transformers' generate does)
    evicted: int = 0  # tokens evicted over context + generation
    max_held: int = 0  # most tokens any layer held between passes
    held_per_layer: tuple[int, ...] = ()  # the most tokens each layer held between passes
    kept_per_layer: tuple[float, ...] = ()  # evict_every=context: held per layer right after the event (head mean)
    held_per_head: tuple[tuple[int, ...], ...] = ()  # the most each key/value head of each layer held


def decode(
    stream,
    logits: torch.Tensor,
    max_new_tokens: int,
    pick: Callable[[torch.Tensor], int] = greedy,
    eos_token_ids: Sequence[int] = (),
    stop: Callable[[list[int]], bool] | None = None,
    on_token: Callable[[int, int], None] | None = None,
) -> list[int]:
    """Generate from ``logits`` (those of the last token read), one ``stream.step`` per new token.

    Stops after ``max_new_tokens``, after an EOS id, or once ``stop(tokens)`` is true. The last
    token is not fed back (nothing would read its logits), as in transformers' ``generate``.
    """
    tokens: list[int] = []
    eos = set(eos_token_ids)
    while len(tokens) < max_new_tokens:
        token = pick(logits)
        tokens.append(token)
        if on_token is not None:
            on_token(len(tokens), token)
        if token in eos or (stop is not None and stop(tokens)) or len(tokens) == max_new_tokens:
            break
        logits = stream.step(token)
    return tokens


def generate(
    model,
    context: Sequence[int],
    settings: StreamingSettings,
    shift: RotaryShift | None,
    max_new_tokens: int,
    **decode_kwargs,
) -> Generation:
    """Stream ``context`` (token ids, at least one) through the cache, then ``decode``."""
    if len(context) == 0:
        raise ValueError("generation needs at least one context token")
    if settings is not None and settings.context_regime:  # the event falls inside the context: the request walk places it
        return generate_requests(model, [GenerationRequest(context, max_new_tokens, decode_kwargs)], settings,
                                 shift)[0][0]
    stream = open_stream(model, settings, shift)
    stream.extend(context)
    return _generate_after_context(stream, max_new_tokens, decode_kwargs)


@dataclasses.dataclass
class GenerationRequest:
    context: Sequence[int]  # token ids, at least one
    max_new_tokens: int
    decode_kwargs: dict = dataclasses.field(default_factory=dict)  # pick, eos_token_ids, stop (``decode``)


def generate_requests(
    model, requests: Sequence[GenerationRequest], settings: StreamingSettings, shift: RotaryShift | None,
    share: bool = True, on_result: Callable[[int, Generation], None] | None = None, policy=None,
) -> tuple[list[Generation], WalkStats]:
    """``generate`` for every request, in the order given; contexts' common prefixes are read once
    (``streams.shared``; ``share=False``: only identical contexts are). ``on_result(index, generation)``; ``policy``:
    the settings' method bound once (``engine.Engine``)."""
    results: list = [None] * len(requests)

    def visit(stream, members, spare):
        for k, i in enumerate(members):
            # Decoding changes the state; the context's state stays for the requests after this one (and for
            # longer contexts through it, unless ``spare``).
            branch = stream if spare and k == len(members) - 1 else stream.fork()
            results[i] = _generate_after_context(branch, requests[i].max_new_tokens, requests[i].decode_kwargs)
            if on_result is not None:
                on_result(i, results[i])

    stats = read_contexts([request.context for request in requests],
                          lambda: open_stream(model, settings, shift, policy=policy), visit, share,
                          None if settings is None else settings.schedule)
    return results, stats


def _generate_after_context(stream, max_new_tokens: int, decode_kwargs: dict) -> Generation:
    logits = stream.last_logits()[-1]
    tokens = decode(stream, logits, max_new_tokens, **decode_kwargs) if max_new_tokens > 0 else []
    return Generation(tokens, stream.evicted, stream.max_held, tuple(stream.held_per_layer), stream.kept_per_layer(),
                      tuple(stream.held_per_head))
