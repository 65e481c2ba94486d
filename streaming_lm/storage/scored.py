"""A growing cache for scored policies: per key/value head, the held tokens and their scores.

After every step (one token per pass: the token loop) a layer whose heads hold more than ``C`` tokens
evicts, per head (or per layer), the unprotected token of lowest score; ties go to the older token
(shared/docs/eviction-policies.md). Slots stay in token order, so with ``positions="shifted"`` a key's
slot is its position: the keys after an evicted one are rotated back by one.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, DynamicLayer

from ..policy import ScoredPolicy
from ..rotary import RotaryShift
from .accounting import KVAccounting


class ScoredDynamicLayer(DynamicLayer):
    def __init__(self, policy: ScoredPolicy, shift: RotaryShift | None):
        super().__init__()
        self.policy, self.shift = policy, shift
        self.seen = 0  # tokens read into this layer: the token of this step is seen - 1
        self.evicted = 0
        self.tokens: torch.Tensor | None = None  # long [kv_heads, K]: the token held in each slot
        self.totals: torch.Tensor | None = None  # float32 [kv_heads, K]: accumulated scores (accumulate)

    def update(self, key_states, value_states, *args, **kwargs):
        if key_states.shape[0] != 1 or key_states.shape[-2] != 1:
            raise ValueError("a scored policy's cache reads one stream, one token per pass (the token loop)")
        keys, values = super().update(key_states, value_states, *args, **kwargs)
        heads = keys.shape[1]
        new = torch.full((heads, 1), self.seen, dtype=torch.long, device=keys.device)
        self.tokens = new if self.tokens is None else torch.cat((self.tokens, new), dim=1)
        if self.policy.accumulate:
            zero = torch.zeros((heads, 1), dtype=torch.float32, device=keys.device)
            self.totals = zero if self.totals is None else torch.cat((self.totals, zero), dim=1)
        self.seen += 1
        if not self.policy.needs_attention:
            self.after_attention(None)  # the score reads keys only: decide now, attention sees all C + 1
        return keys, values

    def after_attention(self, attention: torch.Tensor | None) -> None:
        """This step's attention weights (float32 [query_heads, K], or None) are in: score and evict."""
        policy = self.policy
        if not policy.accumulate and self.keys.shape[-2] <= policy.capacity:
            return
        score = policy.score(self.keys[0], self.values[0], attention).float()
        score = score.expand(self.tokens.shape) if score.dim() == 1 else score
        if policy.accumulate:
            self.totals += score
            score = self.totals
        if self.keys.shape[-2] <= policy.capacity:
            return
        settings, t = policy.settings, self.seen - 1
        protected = (self.tokens < settings.start_size) | (self.tokens > t - settings.recent_size)
        # argmin takes the first lowest slot, and slots are in token order: ties evict the older token.
        victim = score.masked_fill(protected, float("inf")).argmin(dim=1)  # [kv_heads]
        slots = torch.arange(self.tokens.shape[1], device=victim.device)
        keep = (slots[None, :] != victim[:, None]).nonzero()[:, 1].reshape(len(victim), -1)  # [kv_heads, C]
        gather = keep[None, :, :, None].expand(*self.keys.shape[:2], -1, self.keys.shape[-1])
        keys = self.keys.gather(2, gather)
        if self.shift is not None:
            # Shifted: positions are slots, so every key after the evicted one moves back by one.
            moved = keep > victim[:, None]
            keys = torch.where(moved[None, :, :, None], self.shift.rotate(keys, -1), keys)
        self.keys = keys
        self.values = self.values.gather(2, keep[None, :, :, None].expand(*self.values.shape[:2], -1,
                                                                          self.values.shape[-1]))
        self.tokens = self.tokens.gather(1, keep)
        if self.totals is not None:
            self.totals = self.totals.gather(1, keep)
        self.evicted += 1

    def get_max_length(self) -> int:
        return self.policy.capacity


class ScoredDynamicCache(KVAccounting, Cache):
    """A ``Cache`` of ``ScoredDynamicLayer`` s, one per decoder layer."""

    def __init__(self, num_layers: int, policy: ScoredPolicy, shift: RotaryShift | None):
        super().__init__(layers=[ScoredDynamicLayer(policy, shift) for _ in range(num_layers)])
        self.policy = policy

    @property
    def evicted_tokens(self) -> int:
        """Tokens evicted so far per head (the same at every layer and head)."""
        return self.layers[0].evicted
