"""Eviction policies: which tokens a cache holds. The one place that decides what is visible.

A policy answers one question, ``held(n)``: the token indices a cache holds after reading ``n``
tokens (between steps). Everything else follows from it and is derived here, once:

- step ``t`` attends to ``held(t) ∪ {t}`` (``visible_mask``, for the chunked path's mask);
- after step ``t`` the cache keeps ``held(t + 1)`` (the dynamic storage's trim, the static storage's
  free slot: ``evicted_after``);
- ``method=recompute`` re-encodes ``held(end + 1)`` as the window that ends at ``end``.

``index_only`` policies decide from token indices alone, so the chunked path can serve them; a
policy that needs attention scores would set it False and run on the token loop only.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch

from .positions import first_recent
from .settings import StreamingSettings

Runs = list[tuple[int, int]]  # ascending, disjoint half-open ranges [a, b) of token indices


class EvictionPolicy(ABC):
    """What a cache of ``capacity`` tokens keeps; implement ``held``."""

    name: str
    index_only: bool = True

    def __init__(self, settings: StreamingSettings):
        self.settings = settings
        self.capacity = settings.capacity

    @abstractmethod
    def held(self, n: int) -> Runs:
        """Token indices held after reading tokens ``0 .. n-1``: at most ``capacity`` of them, ascending."""

    def evicted_count(self, n: int) -> int:
        """Tokens evicted after reading ``n`` tokens: each token read is either held or was evicted once."""
        return n - sum(b - a for a, b in self.held(n))

    def held_index(self, n: int) -> torch.Tensor:
        """``held(n)`` as a tensor of token indices."""
        return torch.cat([torch.arange(a, b) for a, b in self.held(n)])

    def evicted_after(self, t: int) -> list[int]:
        """Tokens dropped after step ``t``: those of ``held(t) ∪ {t}`` not in ``held(t + 1)``."""
        dropped = []
        for a, b in [*self.held(t), (t, t + 1)]:
            for c, d in self.held(t + 1):  # cut every kept run out of [a, b), run by run
                if c > a:
                    dropped.extend(range(a, min(b, c)))
                a = max(a, d)
                if a >= b:
                    break
            dropped.extend(range(a, b))
        return dropped

    def visible_mask(self, queries: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        """bool [Q, K]: query token ``t`` sees key token ``j`` iff ``j ∈ held(t) ∪ {t}``."""
        runs = [self.held(int(t)) for t in queries]
        width = max(len(r) for r in runs)
        lo = torch.tensor([[a for a, _ in r] + [0] * (width - len(r)) for r in runs])
        hi = torch.tensor([[b for _, b in r] + [0] * (width - len(r)) for r in runs])
        k = keys[None, :, None]
        inside = ((k >= lo[:, None, :]) & (k < hi[:, None, :])).any(-1)
        return inside | (keys[None, :] == queries[:, None])


class SinkWindow(EvictionPolicy):
    """StreamingLLM: the first ``start_size`` tokens (attention sinks) and the last ``recent_size`` ones.

    Xiao et al., *Efficient Streaming Language Models with Attention Sinks*, ICLR 2024,
    https://arxiv.org/abs/2309.17453
    """

    name = "sink_window"

    def held(self, n: int) -> Runs:
        sinks = min(self.settings.start_size, n)
        return [(0, sinks), (min(first_recent(n, self.settings), n), n)]


POLICIES = {cls.name: cls for cls in (SinkWindow,)}


def policy_for(settings: StreamingSettings) -> EvictionPolicy:
    """The policy the settings name (today every setting is a sink+window cache)."""
    return SinkWindow(settings)
