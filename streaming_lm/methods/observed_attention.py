"""Observed attention: keep the tokens the segment's queries attended to most, on average over the queries that saw
them (kvpress's ``ObservedAttentionPress``; the attention H2O accumulates, observed once per segment).

Zhang et al., *H2O: Heavy-Hitter Oracle for Efficient Generative Inference of Large Language Models*,
NeurIPS 2023, https://arxiv.org/abs/2306.14048
"""

from __future__ import annotations

from .base import BOTH, ScoredPolicy
from .lazy_torch import torch

# Query rows per block of the attention that is summed (bounds its memory at [query_heads, BLOCK, keys]).
BLOCK = 512


class ObservedAttention(ScoredPolicy):
    """Observed attention: at an event, each held key's attention weight summed over the segment's queries (the whole
    prefill, once after the context), divided by how many of them saw it (causally), averaged over the query heads of
    its key/value head: kvpress's ``ObservedAttentionPress``, which reads the prefill's eager attention weights.

    Related to H2O: Zhang et al., *H2O: Heavy-Hitter Oracle for Efficient Generative Inference of Large Language
    Models*, NeurIPS 2023, https://arxiv.org/abs/2306.14048
    """

    name = "observed_attention"
    reaches_budget = True
    paths = {"token": BOTH, "chunked": ("original",)}
    observes = frozenset({"queries", "scale"})

    def score(self, keys, values, attention, queries, scale):
        return observed_attention_scores(queries, keys, scale)  # the model's own scaling, as its eager weights


def observed_attention_scores(queries: torch.Tensor, keys: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """float32 [kv_heads, n]: the mean attention each held key (``keys`` [kv_heads, n, d], after RoPE) received from
    the ``w`` segment queries (``queries`` [query_heads, w, d], the last ``w`` held tokens'), each seeing the keys up to
    its own (``snapkv.window_attention``), divided by the number of queries that saw it, mean over each key/value
    head's query heads. ``scale`` defaults to ``1/sqrt(d)``."""
    from .snapkv import window_attention

    heads, w, _ = queries.shape
    kv_heads, n, _ = keys.shape
    first = n - w  # the keys before the segment: every query saw them
    total = torch.zeros((heads, n), dtype=torch.float32, device=keys.device)
    for a in range(0, w, BLOCK):  # rows a..b-1 see the keys up to their own, first + b - 1 at most
        b = min(a + BLOCK, w)
        total[:, : first + b] += window_attention(queries[:, a:b], keys[:, : first + b], scale).sum(dim=1)
    seen = torch.full((n,), float(w), device=keys.device)
    seen[first:] = torch.arange(w, 0, -1, device=keys.device, dtype=torch.float32)
    return (total / seen).reshape(kv_heads, heads // kv_heads, n).mean(dim=1)
