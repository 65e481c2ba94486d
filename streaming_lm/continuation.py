"""Log-likelihood of continuations under a streaming cache (lm-eval's ``loglikelihood``).

The request ``(context, continuation)`` is one stream ``context + continuation`` read from an
empty cache: the numbers are the continuation's entries of ``score_stream`` on that stream.
The context is read once and every continuation is read from a fork of that state.
"""

from __future__ import annotations

import dataclasses

import torch

from .rotary import RotaryShift
from .scoring import check_evicted, target_logprobs
from .settings import StreamingSettings
from .stream import Stream


@dataclasses.dataclass
class ContinuationScore:
    logprob: float  # sum of log p(continuation token) over the continuation
    is_greedy: bool  # every continuation token was the argmax at its position
    evicted: int  # tokens evicted over the stream context + continuation


def score_continuations(
    model, context, continuations, settings: StreamingSettings, shift: RotaryShift | None
) -> list[ContinuationScore]:
    """Score each continuation (token ids) after the same context (token ids, at least one)."""
    if len(context) == 0 or any(len(c) == 0 for c in continuations):
        raise ValueError("context and every continuation need at least one token")
    if settings.method == "recompute":
        return [_recompute_continuation(model, list(context), list(c), settings) for c in continuations]
    stream = Stream(model, settings, shift)
    last = stream.read(context, last_only=True)  # the logits that predict the first continuation token
    results = []
    for continuation in continuations:
        branch = stream
        logits = last
        if len(continuation) > 1:
            # Reading mutates the cache: each continuation gets its own copy of the context state.
            branch = stream.fork()
            logits = torch.cat((last, branch.read(continuation[:-1])))
        target = torch.as_tensor(continuation, dtype=torch.long, device=logits.device)
        chosen = target_logprobs(logits, target)
        check_evicted(len(context) + len(continuation), branch.evicted, settings)
        results.append(
            ContinuationScore(float(chosen.double().sum()), bool((logits.argmax(-1) == target).all()), branch.evicted)
        )
    return results


def _recompute_continuation(model, context, continuation, settings: StreamingSettings) -> ContinuationScore:
    """The continuation's entries of ``score_stream_recompute`` on ``context + continuation``."""
    from .recompute import score_stream_recompute

    first = len(context) - 1  # the position whose logits predict the first continuation token
    scored = score_stream_recompute(model, context + continuation, settings, first_scored=first)
    return ContinuationScore(
        float(scored.logprobs[first:].double().sum()), bool(scored.greedy[first:].all()), scored.evicted
    )
