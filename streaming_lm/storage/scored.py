"""A growing cache for scored methods (and any whose key/value heads hold different tokens): per key/value head,
the held tokens, their accumulated scores and the segment's queries. It stores; the paths observe and
``methods/event.py`` decides what an event keeps (``keep`` applies it).

Slots stay in token order, so with ``positions="shifted"`` a key's slot is its position: the keys after evicted ones
are rotated back by as many. Heads holding different counts (AdaKV, duo) are padded to the fullest, the padding
marked ``dead`` (the attention functions mask it).
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, DynamicLayer

from ..methods import Policy
from ..methods.base import HEADS
from ..rotary import LayerShifts, RotaryShift
from .accounting import KVAccounting


def packed(alive: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The layout of what each head keeps (``alive`` bool [kv_heads, K]): long [kv_heads, width], each head's kept
    columns in token order, a head keeping fewer padded with dropped columns; and bool [kv_heads, width] marking that
    padding ``dead`` (the attention functions mask it), or None when every head keeps as many."""
    counts = alive.sum(1)
    keep = torch.sort((~alive).to(torch.uint8), dim=1, stable=True).indices[:, : int(counts.max())]
    dead = torch.arange(keep.shape[1], device=keep.device)[None, :] >= counts[:, None]
    return keep, dead if bool(dead.any()) else None


def keep_columns(keys: torch.Tensor, values: torch.Tensor, alive: torch.Tensor, shift: RotaryShift | None):
    """What a layer keeps of the columns ``alive`` marks (bool [kv_heads, K]; ``keys``/``values`` [B, kv_heads, K,
    d]): its keys and values packed in column order (``packed``), the column of each slot (long [kv_heads, width]),
    the padding (``dead``, or None) and each head's count (on the host). With a rotary ``shift`` (shifted positions:
    a key's position is its slot) every kept key moves back by as many slots as columns went before it."""
    counts = alive.sum(1).tolist()
    keep, dead = packed(alive)
    kept_keys = gather_columns(keys, keep)
    if shift is not None:
        moved = keep - torch.arange(keep.shape[1], device=keep.device)[None, :]
        kept_keys = torch.where((moved > 0)[None, :, :, None], shift.rotate(kept_keys, -moved), kept_keys)
    return kept_keys, gather_columns(values, keep), keep, dead, counts


def gather_columns(x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """[1, kv_heads, width, d]: of ``x`` [1, kv_heads, K, d], the columns ``keep`` [kv_heads, width] names."""
    rows = torch.arange(keep.shape[0], device=keep.device)[:, None]
    return x[:, rows, keep]  # advanced indexing: a gather with an expanded index is 2x slower


class ScoredDynamicLayer(DynamicLayer):
    def __init__(self, policy: Policy, shift: RotaryShift | None, index: int = 0, layers: int = 1):
        super().__init__()
        self.index, self.layers = index, layers  # which decoder layer of how many (budgets by layer)
        self.policy, self.shift = policy, shift
        self.history = "history" in policy.observes  # scores summed over the steps a token is held (H2O)
        self.records_queries = "queries" in policy.observes
        self.seen = 0  # tokens read into this layer: the token of this step is seen - 1
        self.evicted, self.evicted_cells = 0, 0  # per head, and (head, token) cells in all
        self.tokens: torch.Tensor | None = None  # long [kv_heads, K]: the token held in each slot
        self.totals: torch.Tensor | None = None  # float32 [kv_heads, K]: accumulated scores (history)
        # float32 [query_heads, s, head_dim]: the queries read since the last event (observes queries)
        self.queries: torch.Tensor | None = None
        # bool [kv_heads, K]: padding slots of heads holding fewer tokens (AdaKV, duo); None when none
        self.dead: torch.Tensor | None = None
        self.head_counts: list[int] | None = None  # the tokens each head holds, on the host, where they differ

    def observe(self, query: torch.Tensor) -> torch.Tensor | None:
        """Add queries ([query_heads, s, head_dim]) to the segment's; returns the segment's so far (None unless
        the method observes queries)."""
        if not self.records_queries:
            return None
        query = query.float()
        self.queries = query if self.queries is None else torch.cat((self.queries, query), dim=1)
        return self.queries

    def update(self, key_states, value_states, *args, **kwargs):
        if key_states.shape[0] != 1 and (self.keys is None or self.keys.shape[0] == 1):
            # Rows only from a state expanded to a batch (expand_batch: continuations read with no event)
            raise ValueError("a scored policy's cache reads one stream at a time")
        keys, values = super().update(key_states, value_states, *args, **kwargs)
        heads, count = keys.shape[1], key_states.shape[-2]
        new = torch.arange(self.seen, self.seen + count, device=keys.device).expand(heads, -1)
        self.tokens = new if self.tokens is None else torch.cat((self.tokens, new), dim=1)
        if self.dead is not None:
            self.dead = torch.cat((self.dead, torch.zeros((heads, count), dtype=torch.bool, device=keys.device)), 1)
            self.head_counts = [held + count for held in self.head_counts]
        if self.history:
            zero = torch.zeros((heads, count), dtype=torch.float32, device=keys.device)
            self.totals = zero if self.totals is None else torch.cat((self.totals, zero), dim=1)
        self.seen += count
        return keys, values

    def held_per_head(self) -> torch.Tensor:
        """long [kv_heads]: the tokens each key/value head holds (they differ with head_budgets=adaptive, whose
        padding the storage's width counts)."""
        counts = self.head_counts or [self.tokens.shape[1]] * self.tokens.shape[0]
        return torch.tensor(counts, device=self.tokens.device)

    def keep(self, alive: torch.Tensor) -> None:
        """Keep the columns ``alive`` marks (bool [kv_heads, K]); with a rotary ``shift`` (shifted positions) every
        key moves back by as many positions as tokens were dropped before it."""
        held_before = sum(self.head_counts) if self.head_counts else alive.shape[1] * alive.shape[0]
        self.keys, self.values, keep, self.dead, counts = keep_columns(self.keys, self.values, alive, self.shift)
        self.head_counts = None if self.dead is None else counts
        self.evicted_cells += held_before - sum(counts)
        self.evicted = self.evicted_cells // alive.shape[0]  # per head (on average: AdaKV, duo)
        self.tokens = self.tokens.gather(1, keep)
        if self.totals is not None:
            self.totals = self.totals.gather(1, keep)



class ScoredDynamicCache(KVAccounting, Cache):
    """A ``Cache`` of ``ScoredDynamicLayer`` s, one per decoder layer."""

    def __init__(self, num_layers: int, policy: Policy, shift: RotaryShift | LayerShifts | None):
        super().__init__(layers=[ScoredDynamicLayer(policy, shift.for_layer(i) if shift is not None else None, i,
                                                    num_layers)
                                 for i in range(num_layers)])
        self.policy = policy

    @property
    def evicted_tokens(self) -> int:
        """Tokens evicted so far per head of the first layer (the same at every layer and head unless budgets
        differ by layer); duo: of the layer that evicted most (its first layers may hold only retrieval heads)."""
        if self.policy.kind == HEADS:
            return max(layer.evicted for layer in self.layers)
        return self.layers[0].evicted
