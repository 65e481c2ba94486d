"""A growing cache for scored policies: per key/value head, the held tokens and their scores.

At every event (after every ``evict_every`` steps; every step by default) a layer whose heads hold more than
``C`` tokens evicts, per head (or per layer), the unprotected token of lowest score, again and again until
``C`` are left, on the scores of the event's step; ties go to the older token (docs/policies.md). Between
events a layer only adds tokens (and accumulates scores, H2O). Slots stay in token order, so with
``positions="shifted"`` a key's slot is its position: the keys after evicted ones are rotated back by as many.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, DynamicLayer

from ..compression.budgets import adaptive_head_keep
from ..compression.ties import evict_lowest, lowest_oldest
from ..policy import ScoredPolicy
from ..rotary import LayerShifts, RotaryShift
from .accounting import KVAccounting


def step_scores(policy: ScoredPolicy, keys, values, attention, totals, heads: int, queries=None,
                step: int | None = None) -> torch.Tensor:
    """float32 [kv_heads, K]: the score of every key column after step ``step`` (``totals`` is accumulated in
    place; ``queries``: the segment's, for a policy that ``needs_queries``; ``step`` for one that ``needs_step``)."""
    observed = {"queries": queries} if policy.needs_queries else {}
    if policy.needs_step:
        observed["step"] = step
    score = policy.score(keys, values, attention, **observed).float()
    score = score.expand(heads, -1) if score.dim() == 1 else score
    if policy.accumulate:
        totals += score
        return totals
    return score


def compress(score: torch.Tensor, tokens: torch.Tensor, t: int, policy: ScoredPolicy,
             alive: torch.Tensor, capacity: int) -> torch.Tensor:
    """The event after step t: evict from the columns ``alive`` marks (bool [kv_heads, K], as many per head),
    one lowest-scored unprotected token per head at a time, until ``capacity`` (the layer's) are left; returns
    the mask. (compression/ties.py ``evict_lowest`` does the single evictions in one sort per head.)"""
    masked = score.masked_fill(protected_tokens(tokens, t, policy.settings) | ~alive, float("inf"))
    count = int(alive[0].sum()) - capacity
    if count == 1:  # evict_every=1: one argmin per head
        victim = lowest_oldest(masked)
        if not policy.reaches_budget and bool(masked.gather(1, victim[:, None]).isinf().any()):
            raise _not_evictable(count, capacity)
        alive = alive.clone()
        alive[torch.arange(alive.shape[0], device=alive.device), victim] = False
        return alive
    if count > 0 and int(torch.isfinite(masked).sum(1).min()) < count:
        raise _not_evictable(count, capacity)
    index = alive.nonzero()[:, 1].reshape(alive.shape[0], -1)  # each head's held columns, in token order
    kept = evict_lowest(masked.gather(1, index), max(count, 0))
    return torch.zeros_like(alive).scatter(1, index, kept)


def _not_evictable(count: int, capacity: int) -> RuntimeError:
    # The settings' checks (SnapKV.check_kept_always, ExpectedAttention.check_settings) should make it impossible.
    return RuntimeError(f"an event must evict {count} tokens per head to reach the layer's budget of {capacity}, but "
                        f"fewer are evictable: the tokens it never evicts (start_size, recent_size, the policy's own) "
                        f"exceed the budget")


def protected_tokens(tokens: torch.Tensor, t: int, settings) -> torch.Tensor:
    """bool, the shape of ``tokens`` (token indices): the tokens an event after step t never evicts, the first
    ``start_size`` and the last ``recent_size`` read (docs/policies.md)."""
    return (tokens < settings.start_size) | (tokens > t - settings.recent_size)


# A score below any real one, for (head, token) cells a head does not hold (finite: the tie margin is relative).
ABSENT = -1e30


def adaptive_compress(score: torch.Tensor, tokens: torch.Tensor, t: int, policy: ScoredPolicy, alive: torch.Tensor,
                      capacity: int) -> torch.Tensor:
    """AdaKV's event (compression/budgets.py ``adaptive_head_keep``) on what each head holds (``alive``, counts may
    differ): the heads keep ``capacity`` per head on average. Laid out by token (not by slot), so the tie rule's
    order (older token first, then lower head) does not depend on the storage's padding. Protected tokens stay."""
    settings = policy.settings
    heads = torch.arange(alive.shape[0], device=alive.device)[:, None].expand_as(alive)
    union = torch.unique(tokens[alive])  # sorted: the grid's columns
    column = torch.searchsorted(union, tokens.clamp(min=0))
    grid = torch.full((alive.shape[0], union.numel()), ABSENT, device=score.device)
    protected = protected_tokens(tokens, t, settings)
    grid[heads[alive], column[alive]] = score.float().masked_fill(protected, float("inf"))[alive]
    kept, _ = adaptive_head_keep(grid, capacity, policy.alpha_safeguard)
    return alive & kept[heads, column.clamp(max=union.numel() - 1)]


def held_scores(policy: ScoredPolicy, keys, values, attention, alive, queries, step) -> torch.Tensor:
    """float32 [kv_heads, columns]: the policy's scores of the columns ``alive`` marks, computed on those columns
    alone, as the token loop's cache holds them (a score may read neighbours or the window's last keys: SnapKV);
    other columns score ``+inf``. Heads holding different counts (AdaKV) are scored one by one."""
    kv_heads = keys.shape[0]
    counts = alive.sum(1)
    out = torch.full(alive.shape, float("inf"), device=alive.device)
    groups = [range(kv_heads)] if bool((counts == counts[0]).all()) else [[h] for h in range(kv_heads)]
    for heads in groups:
        every = len(heads) == kv_heads  # all heads at once: no per-head copies
        heads = slice(None) if every else list(heads)
        index = alive[heads].nonzero()[:, 1].reshape(kv_heads if every else len(heads), -1)  # [heads, held]

        rows_of = torch.arange(index.shape[0], device=index.device)[:, None]

        def held(x, heads=heads, index=index, rows_of=rows_of):
            return x[heads][rows_of, index]  # advanced indexing: a gather with an expanded index is 2x slower

        rows, asked = None, None
        if attention is not None:  # each key/value head's query heads, over its held columns
            group = attention.shape[0] // kv_heads
            rows = attention.reshape(kv_heads, group, -1)[heads]
            rows = rows.gather(2, index[:, None].expand(-1, group, -1)).reshape(index.shape[0] * group, -1)
        if queries is not None:
            asked = queries.reshape(kv_heads, -1, *queries.shape[1:])[heads].reshape(-1, *queries.shape[1:])
        score = step_scores(policy, held(keys), held(values), rows, None, index.shape[0], asked, step)
        out[heads] = out[heads].scatter(1, index, score)
    return out


def packed(alive: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The layout of what each head keeps (``alive`` bool [kv_heads, K]): long [kv_heads, width], each head's kept
    columns in token order, a head keeping fewer padded with dropped columns; and bool [kv_heads, width] marking that
    padding ``dead`` (the attention functions mask it), or None when every head keeps as many."""
    counts = alive.sum(1)
    keep = torch.sort((~alive).to(torch.uint8), dim=1, stable=True).indices[:, : int(counts.max())]
    dead = torch.arange(keep.shape[1], device=keep.device)[None, :] >= counts[:, None]
    return keep, dead if bool(dead.any()) else None


def gather_columns(x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """[1, kv_heads, width, d]: of ``x`` [1, kv_heads, K, d], the columns ``keep`` [kv_heads, width] names."""
    rows = torch.arange(keep.shape[0], device=keep.device)[:, None]
    return x[:, rows, keep]  # advanced indexing: a gather with an expanded index is 2x slower


class ScoredDynamicLayer(DynamicLayer):
    def __init__(self, policy: ScoredPolicy, shift: RotaryShift | None, rows: bool = False, index: int = 0,
                 layers: int = 1):
        super().__init__()
        self.index, self.layers = index, layers  # which decoder layer of how many (budgets by layer)
        self.policy, self.shift = policy, shift
        self.rows = rows  # the chunked path decides row by row in its attention function (keep)
        self.seen = 0  # tokens read into this layer: the token of this step is seen - 1
        self.evicted, self.evicted_cells = 0, 0  # per head, and (head, token) cells in all
        self.tokens: torch.Tensor | None = None  # long [kv_heads, K]: the token held in each slot
        self.totals: torch.Tensor | None = None  # float32 [kv_heads, K]: accumulated scores (accumulate)
        # float32 [query_heads, s, head_dim]: the queries read since the last event (needs_queries)
        self.queries: torch.Tensor | None = None
        # bool [kv_heads, K]: padding slots of heads holding fewer tokens (head_budgets=adaptive); None when none
        self.dead: torch.Tensor | None = None

    def observe(self, query: torch.Tensor) -> torch.Tensor | None:
        """Add queries ([query_heads, s, head_dim]) to the segment's; returns the segment's so far (None unless
        the policy ``needs_queries``)."""
        if not self.policy.needs_queries:
            return None
        query = query.float()
        self.queries = query if self.queries is None else torch.cat((self.queries, query), dim=1)
        return self.queries

    def update(self, key_states, value_states, *args, **kwargs):
        if key_states.shape[0] != 1:
            raise ValueError("a scored policy's cache reads one stream at a time")
        keys, values = super().update(key_states, value_states, *args, **kwargs)
        heads, count = keys.shape[1], key_states.shape[-2]
        new = torch.arange(self.seen, self.seen + count, device=keys.device).expand(heads, -1)
        self.tokens = new if self.tokens is None else torch.cat((self.tokens, new), dim=1)
        if self.dead is not None:
            self.dead = torch.cat((self.dead, torch.zeros((heads, count), dtype=torch.bool, device=keys.device)), 1)
        if self.policy.accumulate:
            zero = torch.zeros((heads, count), dtype=torch.float32, device=keys.device)
            self.totals = zero if self.totals is None else torch.cat((self.totals, zero), dim=1)
        self.seen += count
        if not (self.policy.needs_attention or self.policy.needs_queries or self.policy.holds_by_head or self.rows):
            self.after_attention(None)  # the score reads keys only: decide now, attention sees all C + 1
        return keys, values

    def after_attention(self, attention: torch.Tensor | None, query: torch.Tensor | None = None) -> None:
        """Token loop: this step's attention weights (float32 [query_heads, K], or None) and query ([query_heads,
        1, head_dim], or None) are in; score, and at an event evict down to ``C``."""
        policy, t = self.policy, self.seen - 1
        queries = self.observe(query) if query is not None else None
        event = policy.schedule.event_after(t)
        if event:
            self.queries = None  # the next segment starts empty
        alive = torch.ones(self.tokens.shape, dtype=torch.bool, device=self.tokens.device) if self.dead is None \
            else ~self.dead
        if policy.holds_by_head:  # an index rule per head (duo)
            if event:
                self.keep(policy.event_keep(self.index, alive))
            return
        capacity = self.capacity(t + 1) if event else 0  # a budget is asked for at events only (pyramid)
        over = event and int(alive.sum()) > capacity * alive.shape[0]
        if not policy.accumulate and not over:
            return
        if policy.adaptive_heads:
            score = held_scores(policy, self.keys[0], self.values[0], attention, alive, queries, t)
            self.keep(adaptive_compress(score, self.tokens, t, policy, alive, capacity))
            return
        score = step_scores(policy, self.keys[0], self.values[0], attention, self.totals, self.tokens.shape[0],
                            queries, t)
        if over:
            self.keep(compress(score, self.tokens, t, policy, alive, capacity), rotate=True)

    def held_per_head(self) -> torch.Tensor:
        """long [kv_heads]: the tokens each key/value head holds (they differ with head_budgets=adaptive, whose
        padding the storage's width counts)."""
        width = torch.full((self.tokens.shape[0],), self.tokens.shape[1], device=self.tokens.device)
        return width if self.dead is None else width - self.dead.sum(1)

    def capacity(self, n: int) -> int:
        """Tokens this layer keeps at an event after ``n`` tokens read (the policy's budget for this layer)."""
        return self.policy.layer_capacity(self.index, self.layers, n)

    def keep(self, alive: torch.Tensor, rotate: bool = False) -> None:
        """Keep the columns ``alive`` marks (bool [kv_heads, K], as many per head); with ``rotate`` (shifted
        positions) every key moves back by as many positions as tokens were dropped before it."""
        counts = alive.sum(1)
        keep, dead = packed(alive)
        held_before = alive.shape[1] * alive.shape[0] - (0 if self.dead is None else int(self.dead.sum()))
        keys = gather_columns(self.keys, keep)
        if rotate and self.shift is not None:
            # Shifted: positions are slots, so every key moves back by the evictions before it.
            moved = keep - torch.arange(keep.shape[1], device=keep.device)[None, :]
            keys = torch.where((moved > 0)[None, :, :, None], self.shift.rotate(keys, -moved), keys)
        self.evicted_cells += held_before - int(counts.sum())
        self.evicted = self.evicted_cells // alive.shape[0]  # per head (on average: AdaKV, duo)
        self.dead = dead
        self.keys = keys
        self.values = gather_columns(self.values, keep)
        self.tokens = self.tokens.gather(1, keep)
        if self.totals is not None:
            self.totals = self.totals.gather(1, keep)



class ScoredDynamicCache(KVAccounting, Cache):
    """A ``Cache`` of ``ScoredDynamicLayer`` s, one per decoder layer."""

    def __init__(self, num_layers: int, policy: ScoredPolicy, shift: RotaryShift | LayerShifts | None,
                 rows: bool = False):
        super().__init__(layers=[ScoredDynamicLayer(policy, shift.for_layer(i) if shift is not None else None, rows,
                                                    i, num_layers)
                                 for i in range(num_layers)])
        self.policy = policy

    @property
    def evicted_tokens(self) -> int:
        """Tokens evicted so far per head of the first layer (the same at every layer and head unless budgets
        differ by layer); duo: of the layer that evicted most (its first layers may hold only retrieval heads)."""
        if self.policy.holds_by_head:
            return max(layer.evicted for layer in self.layers)
        return self.layers[0].evicted
