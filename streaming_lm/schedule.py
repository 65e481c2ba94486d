"""When a cache is compressed: the events of docs/semantics.md ("Events"). The one place that knows them.

A stream is read in segments of ``evict_every`` (K) tokens. Within a segment nothing is evicted: each token
attends to what its layer held after the last event plus the segment's tokens up to itself. After the
segment's last token comes an event: every layer (and head) compresses what it holds down to its budget
``C``. ``K = 1`` is the per-token rule of every policy's paper; between steps a layer holds at most
``C + K - 1`` tokens, and a step attends to at most ``C + K``.

``evict_every=context`` is the other kind (``ContextSchedule``): one event per request, after its context
minus the last ``query_size`` tokens (kvpress's regime: docs/kvpress.md); nothing is evicted afterwards.

Torch-free: settings.py and policy.py read it before any model loads.
"""

from __future__ import annotations


class Schedule:
    """Events after every ``every`` tokens read (after tokens ``K-1, 2K-1, ...``)."""

    def __init__(self, every: int = 1):
        self.every = every

    def last_event(self, n: int) -> int:
        """Tokens read at the last event at or before ``n`` tokens read (0 if none yet)."""
        return n - n % self.every

    def event_after(self, t: int) -> bool:
        """Whether an event follows step ``t`` (the read of token ``t``)."""
        return (t + 1) % self.every == 0

    def extra_slots(self) -> int:
        """Tokens a layer may hold beyond ``C`` while a step attends: the segment read since the last event."""
        return self.every


CONTEXT = "context"  # the evict_every value of the once-after-the-context regime


class ContextSchedule:
    """Once after the context (``evict_every=context``): a request's context of ``m`` tokens is read as a prefill of
    ``m - Q`` tokens, one event compresses it, then its last ``Q`` tokens (``query_size``, kvpress's question) and
    the continuation or generated tokens are read with nothing evicted. The event's place is the request's."""

    every = CONTEXT

    def __init__(self, query_size: int = 1):
        self.query_size = query_size

    def prefill(self, context_tokens: int) -> int:
        """Tokens of a context of ``context_tokens`` read before its event (0: the context is all question)."""
        return max(context_tokens - self.query_size, 0)
