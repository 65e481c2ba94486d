"""Log-likelihood of continuations under a streaming cache (lm-eval's ``loglikelihood``).

The request ``(context, continuation)`` is one stream ``context + continuation`` read from an
empty state: the numbers are the continuation's entries of ``scoring.score`` on that stream.
Each path decides how to share the context (the cache paths read it once and fork).
"""

from __future__ import annotations

from .rotary import RotaryShift
from .scores import ContinuationScore
from .settings import StreamingSettings
from .streams import open_stream


def score_continuations(
    model, context, continuations, settings: StreamingSettings, shift: RotaryShift | None
) -> list[ContinuationScore]:
    """Score each continuation (token ids) after the same context (token ids, at least one)."""
    if len(context) == 0 or any(len(c) == 0 for c in continuations):
        raise ValueError("context and every continuation need at least one token")
    return open_stream(model, settings, shift).score_continuations(list(context), [list(c) for c in continuations])
