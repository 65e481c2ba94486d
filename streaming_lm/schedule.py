"""When a cache is compressed: the events of docs/semantics.md ("Events"). The one place that knows them.

A stream is read in segments of ``evict_every`` (K) tokens. Within a segment nothing is evicted: each token
attends to what its layer held after the last event plus the segment's tokens up to itself. After the
segment's last token comes an event: every layer (and head) compresses what it holds down to its budget
``C``. ``K = 1`` is the per-token rule of every policy's paper; between steps a layer holds at most
``C + K - 1`` tokens, and a step attends to at most ``C + K``.

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
