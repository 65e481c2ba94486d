"""StreamingLLM: the first ``start_size`` tokens (attention sinks) and the last ``recent_size`` ones.

Xiao et al., *Efficient Streaming Language Models with Attention Sinks*, ICLR 2024,
https://arxiv.org/abs/2309.17453
"""

from __future__ import annotations

from .base import EvictionPolicy, Runs
from .lazy_torch import torch


class SinkWindow(EvictionPolicy):
    """StreamingLLM: the first ``start_size`` tokens (attention sinks) and the last ``recent_size`` ones.

    Xiao et al., *Efficient Streaming Language Models with Attention Sinks*, ICLR 2024,
    https://arxiv.org/abs/2309.17453
    """

    name = "sink_window"

    def compressed(self, n: int) -> Runs:
        sinks = min(self.settings.start_size, n)
        return [(0, sinks), (min(max(self.settings.start_size, n - self.settings.recent_size), n), n)]

    def event_keep(self, layer, alive, budget):
        """The first ``start_size`` and the last ``B - start_size`` of each head's held tokens, ``B`` the budget
        (kvpress's ``StreamingLLMPress`` with ``n_sink = start_size``)."""
        held = alive.sum(1, keepdim=True)
        budget = torch.minimum(held, torch.as_tensor(budget, device=alive.device))
        sinks = budget.clamp(max=self.settings.start_size)
        rank = alive.long().cumsum(1) - 1  # a column's place among its head's held tokens
        return alive & ((rank < sinks) | (rank >= held - (budget - sinks)))
