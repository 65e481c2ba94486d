"""A growing key/value cache trimmed by an eviction policy, on transformers' per-layer cache classes.

After every ``update`` a layer keeps the policy's ``held`` set. Slots are in token order, so a run
of held tokens is a run of slots. With a ``shift`` (RoPE, frame-rotating paths) each kept run is
rotated by how far it moves, so that held keys sit in consecutive slots (see docs/semantics.md).
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer

from ..methods import EvictionPolicy
from ..rotary import LayerShifts, RotaryShift
from .accounting import KVAccounting


class EvictingDynamicLayer(DynamicLayer):
    """One layer's cache: everything attended by a pass, then trimmed to ``policy.held`` inside ``update``."""

    def __init__(self, policy: EvictionPolicy, shift: RotaryShift | None = None):
        super().__init__()
        self.policy = policy
        self.shift = shift
        self.seen = 0  # tokens read into this layer
        self.evicted = 0

    def update(self, key_states, value_states, *args, **kwargs):
        # Attention of this pass sees everything held plus the new tokens.
        keys, values = super().update(key_states, value_states, *args, **kwargs)
        before, self.seen = self.seen, self.seen + key_states.shape[-2]
        if keys.shape[-2] > self.policy.capacity and keys.shape[-2] > self.policy.held_count(self.seen):
            self._keep(keys, values, before)
        return keys, values

    def _keep(self, keys, values, before: int):
        # Slots hold held(before) then the new tokens, in token order.
        slots, offset = [], 0
        for a, b in [*self.policy.held(before), (before, self.seen)]:
            slots.append((a, b, offset))
            offset += b - a
        kept_keys, kept_values, target = [], [], 0
        for a, b in self.policy.held(self.seen):
            if a == b:
                continue
            source = next(slot + a - first for first, last, slot in slots if first <= a < last)
            k, v = keys[..., source : source + b - a, :], values[..., source : source + b - a, :]
            if self.shift is not None and target != source:
                k = self.shift.rotate(k, target - source)
            kept_keys.append(k)
            kept_values.append(v)
            target += b - a
        self.evicted += keys.shape[-2] - target
        self.keys = torch.cat(kept_keys, dim=-2)
        self.values = torch.cat(kept_values, dim=-2)


    def reset(self) -> None:
        super().reset()
        self.seen = self.evicted = 0


class EvictingDynamicCache(KVAccounting, Cache):
    """A ``Cache`` of ``EvictingDynamicLayer`` s, one per decoder layer."""

    def __init__(self, num_layers: int, policy: EvictionPolicy, shift: RotaryShift | LayerShifts | None):
        super().__init__(layers=[EvictingDynamicLayer(policy, shift.for_layer(i) if shift is not None else None)
                                 for i in range(num_layers)])
        self.policy = policy

    @property
    def evicted_tokens(self) -> int:
        """Tokens evicted so far (the same at every layer)."""
        return self.layers[0].evicted


class DenseCache(KVAccounting, DynamicCache):
    """transformers' ``DynamicCache`` (every token kept) with the storages' accounting."""
