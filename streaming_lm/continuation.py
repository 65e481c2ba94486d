"""Log-likelihood of continuations under a streaming cache (lm-eval's ``loglikelihood``).

The request ``(context, continuation)`` is one stream ``context + continuation`` read from an
empty state: the numbers are the continuation's entries of ``rolling.score`` on that stream.
Each path decides how to share the context (the cache paths read it once and fork); across
requests, ``score_requests`` reads shared context prefixes once (``streams.shared``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from .rotary import RotaryShift
from .loglik import ContinuationScore
from .settings import StreamingSettings
from .streams import open_stream
from .streams.shared import WalkStats, read_contexts


def score_continuations(
    model, context, continuations, settings: StreamingSettings, shift: RotaryShift | None
) -> list[ContinuationScore]:
    """Score each continuation (token ids) after the same context (token ids, at least one)."""
    _check(context, continuations)
    if settings is not None and settings.context_regime:  # the event falls inside the context: the request walk places it
        return score_requests(model, [(context, c) for c in continuations], settings, shift)[0]
    return open_stream(model, settings, shift).score_continuations(list(context), [list(c) for c in continuations])


def score_requests(
    model, requests: Sequence[tuple[Sequence[int], Sequence[int]]], settings: StreamingSettings,
    shift: RotaryShift | None, share: bool = True, on_result: Callable[[int, ContinuationScore], None] | None = None,
    policy=None,
) -> tuple[list[ContinuationScore], WalkStats]:
    """Every ``(context, continuation)``, in the order given; contexts' common prefixes are read once
    (``share=False``: only identical contexts are). ``on_result(index, score)`` as each one is done; ``policy``: the
    settings' method bound once (``engine.Engine``)."""
    for context, continuation in requests:
        _check(context, [continuation])
    results: list = [None] * len(requests)

    def visit(stream, members, spare):
        scores = stream.score_continuations([], [list(requests[i][1]) for i in members])
        for i, scored in zip(members, scores, strict=True):
            results[i] = scored
            if on_result is not None:
                on_result(i, scored)

    stats = read_contexts([context for context, _ in requests], lambda: open_stream(model, settings, shift, policy=policy),
                          visit, share, None if settings is None else settings.schedule)
    return results, stats


def _check(context, continuations) -> None:
    if len(context) == 0 or any(len(c) == 0 for c in continuations):
        raise ValueError("context and every continuation need at least one token")
