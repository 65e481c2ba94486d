"""The cache of ``evict_every=context`` (kvpress's regime): every token held until the request's one event, then
what the policy keeps, per layer and key/value head; nothing is evicted after it.

Heads of a layer may keep different counts (AdaKV, DuoAttention) and layers too (PyramidKV): a layer is as wide
as its fullest head, kept tokens packed in text order, the padding marked ``dead`` (streams/context.py's attention
masks it). Memory is what each layer's fullest head holds, not a masked full cache.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, DynamicLayer

from ..compression.budgets import adaptive_head_keep, uniform_keep
from ..compression.snapkv import window_attention
from .accounting import KVAccounting
from .scored import gather_columns, packed, protected_tokens, step_scores


def scored_keep(policy, layer: int, layers: int, keys, values, queries, scale: float) -> torch.Tensor:
    """bool [kv_heads, n]: what a scored policy keeps at the event (``Policy.keep_once``'s answer for scored ones). Its ``score`` gets
    the last prefill token's attention weights (recomputed from its query, as kvpress's TOVA does) and the prefill's
    queries; the first ``start_size`` and last ``recent_size`` tokens stay (and the last one for a policy that
    ``keeps_last_once``); each head keeps the layer's budget of its best, or AdaKV's split of it."""
    n = keys.shape[1]
    attention = window_attention(queries[:, -1:], keys, scale)[:, 0] if policy.needs_attention else None
    score = step_scores(policy, keys, values, attention, None, keys.shape[0],
                        queries if policy.needs_queries else None, n - 1)
    index = torch.arange(n, device=keys.device)
    protected = protected_tokens(index, n - 1, policy.settings)
    if policy.keeps_last_once:
        protected |= index == n - 1
    score = score.masked_fill(protected, float("inf"))
    budget = min(n, policy.layer_capacity(layer, layers, n))
    if policy.adaptive_heads:
        return adaptive_head_keep(score, budget, policy.alpha_safeguard)[0]
    return uniform_keep(score, budget)


class ContextLayer(DynamicLayer):
    """One layer: grows while the prefill is read (recording the queries its event will read), is compressed once
    (``compress``), then grows again without eviction."""

    def __init__(self, window: int | None):
        super().__init__()
        self.window = window  # the prefill's last queries the event reads (None: all; 0: none)
        self.queries: torch.Tensor | None = None  # float32 [query_heads, s, head_dim]
        self.scale: float | None = None  # the attention's scaling (the event recomputes weights)
        self.dead: torch.Tensor | None = None  # bool [kv_heads, K]: padding of heads keeping fewer
        self.compressed = False
        self.kept_tokens: torch.Tensor | None = None  # long [kv_heads, width]: the prefill token in each kept slot
        self.evicted = 0.0  # tokens evicted, per key/value head on average
        self.kept: float | None = None  # tokens held right after the event, per key/value head on average

    def update(self, key_states, value_states, *args, **kwargs):
        if key_states.shape[0] != 1 and not self.compressed:  # after the event: continuations as rows of a batch
            raise ValueError("the evict_every=context cache reads one stream at a time until its event")
        keys, values = super().update(key_states, value_states, *args, **kwargs)
        if self.dead is not None:
            fresh = torch.zeros((self.dead.shape[0], key_states.shape[-2]), dtype=torch.bool, device=keys.device)
            self.dead = torch.cat((self.dead, fresh), dim=1)
        return keys, values

    def record(self, query: torch.Tensor, scale: float) -> None:
        """The pass's queries ([query_heads, q, head_dim], after RoPE), kept for the event while it is to come."""
        if self.compressed or self.window == 0:
            return
        self.scale = scale
        query = query.float()
        self.queries = query if self.queries is None else torch.cat((self.queries, query), dim=1)
        if self.window is not None:
            self.queries = self.queries[:, -self.window:]

    def compress(self, policy, index: int, layers: int) -> None:
        """The event: keep what ``policy.keep_once`` says of the held tokens (all of them prefill tokens)."""
        if self.compressed:
            raise RuntimeError("an evict_every=context stream is compressed once")
        self.compressed = True
        if not self.is_initialized or self.keys.shape[-2] == 0:
            self.queries, self.kept = None, 0.0
            return
        n = self.keys.shape[-2]
        keep_once = policy.keep_once if policy.index_only else lambda *args: scored_keep(policy, *args)
        alive = keep_once(index, layers, self.keys[0], self.values[0], self.queries, self.scale)
        self.queries = None
        keep, self.dead = packed(alive)
        self.kept_tokens = keep
        self.keys, self.values = gather_columns(self.keys, keep), gather_columns(self.values, keep)
        self.kept = float(alive.sum(1).float().mean())
        self.evicted = n - self.kept


class ContextCache(KVAccounting, Cache):
    """A ``Cache`` of ``ContextLayer`` s, one per decoder layer."""

    def __init__(self, num_layers: int, window: int | None):
        super().__init__(layers=[ContextLayer(window) for _ in range(num_layers)])

    @property
    def evicted_tokens(self) -> int:
        """Tokens evicted per key/value head, on average over the layers (they differ with budgets by layer)."""
        return round(sum(layer.evicted for layer in self.layers) / len(self.layers))

    def kept_per_layer(self) -> tuple[float, ...]:
        """Tokens each layer held right after the event (per key/value head on average); () before it."""
        return tuple(layer.kept for layer in self.layers) if self.layers[0].compressed else ()
