"""Compactor: approximate leverage of the keys blended with non-causal chunked attention (kvpress's
``CompactorPress``; AdaKV over it is the leaderboard's ``adakv_compactor``: ``head_budgets=adaptive``).

Chari and Van Durme, *Compactor: Calibrated Query-Agnostic KV Cache Compression with Approximate Leverage Scores*,
2025, https://arxiv.org/abs/2507.08143
"""

from __future__ import annotations

import math

from .base import ScoredPolicy, check_context_regime
from .budgets import HEAD_BUDGETS, check_head_budgets
from .lazy_torch import F, torch
from .leverage import PRE_ROPE, Leverage, leverage_scores, zscore
from .params import Param


class Compactor(ScoredPolicy):
    """Compactor (kvpress's ``CompactorPress``): the first ``sink_size_start`` and last ``sink_size_end`` held tokens
    score the layer's highest score; every other token ``blending · leverage + attention``, both z-scored over the
    layer: ``leverage`` is ``policy=leverage``'s on those tokens (its sketch seeded with ``seed``), ``attention`` the
    attention each of their keys receives from their own queries, non-causally within blocks of
    ``attention_chunk_size`` tokens (unscaled logits, as kvpress's; kvpress's ``chunk_size``, renamed: ``chunk_size``
    is the engine's pass length), summed over the queries, meaned over the key/value head's query heads, times
    ``‖v‖``, average-pooled over 3 neighbours. ``blending`` defaults to the compression ratio (kvpress's default).
    Once after the context only.

    Chari and Van Durme, *Compactor: Calibrated Query-Agnostic KV Cache Compression with Approximate Leverage
    Scores*, 2025, https://arxiv.org/abs/2507.08143
    """

    name = "compactor"
    reaches_budget = True
    params = (Param("sink_size_start", int, 8, "first held tokens that score the most", minimum=0),
              Param("sink_size_end", int, 4, "last held tokens that score the most", minimum=0),
              Param("attention_chunk_size", int, 256, "the blocks of the non-causal attention (kvpress's chunk_size)",
                    minimum=1),
              Param("sketch_dimension", int, 48, "the width of the leverage's Gaussian sketch", minimum=1),
              Param("blending", float, -1.0, "the leverage's weight; below 0 (the default): the compression ratio"),
              Param("seed", int, 0, "the sketch's seed, drawn from at each layer's event", minimum=0),
              *HEAD_BUDGETS)
    paths = {"token": ("original",), "chunked": ("original",)}
    observes = frozenset({"queries", "prerope_keys"})

    @classmethod
    def check_settings(cls, settings) -> None:
        check_context_regime(cls, settings, PRE_ROPE)
        check_head_budgets(settings)

    bind = Leverage.bind
    keys_before_rope = Leverage.keys_before_rope

    def score(self, keys, values, attention, queries, prerope_keys):
        n = keys.shape[1]
        left = min(self.sink_size_start, n)
        right = min(self.sink_size_end, max(0, n - left))
        middle = slice(left, n - right)
        keys_before = self.keys_before_rope(keys, prerope_keys)[:, middle]
        ratio = self.settings.compression_ratio  # kvpress: blending = compression_ratio, else 0.35
        blending = self.blending if self.blending >= 0 else 0.35 if ratio is None else ratio
        scores = blending * zscore(leverage_scores(keys_before, self.sketch_dimension, self.seed)) + \
            noncausal_scores(queries[:, middle], keys[:, middle], values[:, middle], self.attention_chunk_size)
        return F.pad(scores, (left, right), value=float(scores.max()))


def noncausal_scores(queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, chunk: int) -> torch.Tensor:
    """float32 [kv_heads, n]: kvpress's ``NonCausalAttnPress.score`` of the held tokens: ``queries`` [query_heads, n,
    d] (each token's own, after RoPE), ``keys``, ``values`` [kv_heads, n, d]. Blocks of ``chunk`` tokens attend
    within themselves, non-causally, with unscaled logits; kvpress pads the last block with zero queries and keys
    (logits 0 for the padded queries, -1e-9 towards the padded keys, and the padded queries' attention counted:
    reproduced), then the attention each key receives is summed over the queries."""
    heads, n, d = queries.shape
    kv_heads = keys.shape[0]
    group = heads // kv_heads
    padded = math.ceil(n / chunk) * chunk
    blocks = padded // chunk
    q = F.pad(queries, (0, 0, 0, padded - n)).reshape(heads, blocks, chunk, d)
    k = F.pad(keys.repeat_interleave(group, dim=0), (0, 0, 0, padded - n)).reshape(heads, blocks, chunk, d)
    dots = torch.matmul(q.to(keys.dtype), k.transpose(-2, -1))  # [heads, blocks, chunk, chunk]
    last = (torch.arange(padded - chunk, padded, device=keys.device) >= n) if padded > n else \
        torch.zeros(chunk, dtype=torch.bool, device=keys.device)
    dots[:, -1].masked_fill_(last[None, :, None], 0)
    dots[:, -1].masked_fill_(last[None, None, :], -1e-9)
    received = torch.softmax(dots.float(), dim=-1).sum(dim=-2).reshape(heads, padded)[:, :n]
    received = received.reshape(kv_heads, group, n).mean(dim=1)
    scores = received * values.float().norm(dim=-1)
    scores = F.avg_pool1d(scores[:, None], kernel_size=3, padding=1, stride=1)[:, 0]
    return zscore(scores)
