"""A decode-speed sink+window cache: preallocated slots, no copies, no per-token re-rotation.

``SinkWindowLayer`` concatenates and, with shifted positions, re-rotates all ``W`` recent keys
after every token: two copies and a rotation of the whole window per token and layer. For
decoding one token at a time that is most of what streaming costs. ``RingWindowCache`` gives
the same numbers (docs/semantics.md) another way:

- Each layer owns ``S`` sink slots and ``W + 1`` ring slots. A new token is written into the free
  ring slot and the step attends to every slot (``C + 1`` keys, in ring order: attention over a
  set does not depend on the order). Afterwards the oldest recent slot is the free one: nothing
  is copied, and between steps exactly ``C`` tokens are held.
- Keys stay where they were rotated. The model rotates the new token at a frame position
  ``t - base``; inside the window only distances matter, so recent keys never move. The sinks
  are what must move instead (``S`` keys, from a kept unrotated copy): with shifted positions
  their distance to the query is ``min(t, C) - j``, not ``t - j``.
- Every ``rebase_every`` tokens the frame is reset to the token loop's (the query at ``C``) by
  rotating the window once, so positions stay below ``C + rebase_every`` however long the stream.

Only for models with rotary embeddings and shifted positions does anything rotate; with
``positions="original"`` the frame is the text itself (the token loop's), and models without
rotary embeddings use ``p(t)`` directly.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, DynamicLayer

from .rotary import RotaryShift
from .settings import StreamingSettings

REBASE_EVERY = 256  # frame resets: one window rotation per 256 tokens; positions stay below C + 256


class RingWindowLayer(DynamicLayer):
    """One layer's slots: ``keys``/``values`` hold ``S`` sinks then ``W + 1`` ring slots."""

    def __init__(self, owner: RingWindowCache, keys: torch.Tensor, values: torch.Tensor, sink_keys: torch.Tensor):
        super().__init__()
        self.owner = owner
        self.keys, self.values, self.sink_keys = keys, values, sink_keys
        self.is_initialized = True
        self.device = keys.device

    def update(self, key_states, value_states, *args, **kwargs):
        owner = self.owner
        slot = owner.write_slot
        self.keys[..., slot : slot + 1, :] = key_states
        self.values[..., slot : slot + 1, :] = value_states
        if slot < owner.start_size:  # a sink: keep it as computed, to re-rotate later
            self.sink_keys[..., slot : slot + 1, :] = key_states
        if owner.sink_cos is not None:
            self.keys[..., : owner.start_size, :] = owner.shift.rotate_by(self.sink_keys, owner.sink_cos, owner.sink_sin)
        return self.keys[..., : owner.attended, :], self.values[..., : owner.attended, :]

    def get_seq_length(self) -> int:
        return self.owner.held

    def get_max_length(self) -> int:
        return self.owner.settings.capacity


class RingWindowCache(Cache):
    """A ``Cache`` for one-token steps; build it from a ``SinkWindowCache`` with ``from_stream``."""

    def __init__(self, settings: StreamingSettings, shift: RotaryShift | None, n: int, base: int, layers_kv):
        self.settings, self.start_size = settings, settings.start_size
        self.rotating = shift is not None and settings.positions == "shifted"
        self.shift = shift
        self.n, self.base = n, base  # tokens read so far; the frame's origin (position = t - base)
        self.held = min(n, settings.capacity)
        self.evicted = n - self.held
        self.write_slot = self.attended = 0
        self.sink_cos = self.sink_sin = None
        super().__init__(layers=[RingWindowLayer(self, *kv) for kv in layers_kv])

    @classmethod
    def from_stream(cls, cache, n: int, settings: StreamingSettings, shift: RotaryShift | None) -> RingWindowCache:
        """Move a ``SinkWindowCache`` filled by the chunked path (recent token ``s`` at ``S + s - r0``) into slots."""
        start, capacity = settings.start_size, settings.capacity
        sinks = min(start, n)
        first_recent = max(start, n - settings.recent_size)  # r0
        base = first_recent - start
        if shift is not None and settings.positions == "original" and base:
            # The token loop keeps original positions at the text's own: move the window there once.
            rotate, base = base, 0
        else:
            rotate = 0
        layers_kv = []
        for layer in cache.layers:
            keys, values = layer.keys, layer.values
            shape = (*keys.shape[:-2], capacity + 1, keys.shape[-1])
            slot_keys, slot_values = keys.new_zeros(shape), values.new_zeros(shape)
            held = keys.shape[-2]
            slot_keys[..., :sinks, :] = keys[..., :sinks, :]
            slot_keys[..., start : start + held - sinks, :] = (
                shift.rotate(keys[..., sinks:, :], rotate) if rotate else keys[..., sinks:, :]
            )
            slot_values[..., :sinks, :] = values[..., :sinks, :]
            slot_values[..., start : start + held - sinks, :] = values[..., sinks:, :]
            sink_keys = keys.new_zeros((*keys.shape[:-2], start, keys.shape[-1]))
            sink_keys[..., :sinks, :] = keys[..., :sinks, :]
            layers_kv.append((slot_keys, slot_values, sink_keys))
        ring = cls(settings, shift, n, base, layers_kv)
        ring._next_free = start + (ring.held - sinks)  # while filling: slots are taken in order
        ring._free_slot = capacity  # once full: the last ring slot is the free one
        return ring

    @property
    def evicted_tokens(self) -> int:
        return self.evicted

    def held_tokens(self) -> list[int]:
        return [self.held] * len(self.layers)

    def held_bytes(self) -> int:
        """Keys and values of the tokens held between steps (exactly C tokens once full)."""
        per_token = sum((layer.keys[..., :1, :].nbytes + layer.values[..., :1, :].nbytes) for layer in self.layers)
        return self.held * per_token

    def allocated_bytes(self) -> int:
        """Every slot, the one free slot and the unrotated sink copies included."""
        return sum(layer.keys.nbytes + layer.values.nbytes + layer.sink_keys.nbytes for layer in self.layers)

    def begin_step(self) -> int:
        """Prepare the slots for token ``x_n``; returns its position id."""
        t, start, capacity = self.n, self.start_size, self.settings.capacity
        if t < start:
            self.write_slot = t
        elif self.held < capacity:
            self.write_slot = self._next_free
        else:
            self.write_slot = self._free_slot
        self.attended = self.held + 1
        if not self.rotating:
            self.sink_cos = None
            return min(t, capacity) if self.settings.positions == "shifted" else t
        if t - self.base > capacity + REBASE_EVERY:
            self._rebase(t - capacity)
        # Sink j must sit at distance min(t, C) - j from the query at t - base.
        delta = t - self.base - min(t, capacity)
        if delta and start:
            self.sink_cos, self.sink_sin = self.shift.cos_sin(delta, self.layers[0].keys.device)
        else:
            self.sink_cos = None
            if 0 < start <= t:  # sinks back at their own positions (after a rebase or before any eviction)
                for layer in self.layers:
                    layer.keys[..., :start, :] = layer.sink_keys
        return t - self.base

    def end_step(self) -> None:
        start, capacity, ring = self.start_size, self.settings.capacity, self.settings.recent_size + 1
        self.n += 1
        if self.held < capacity:
            self.held += 1
            if self.n >= start:
                self._next_free = self.write_slot + 1 if self.write_slot >= start else start
            if self.held == capacity:
                self._free_slot = capacity  # the last ring slot was never written
            return
        # C + 1 tokens were attended; the oldest recent one, right after the slot just written, goes.
        self._free_slot = start + (self.write_slot - start + 1) % ring
        self.evicted += 1

    def _rebase(self, new_base: int) -> None:
        delta = new_base - self.base
        for layer in self.layers:
            layer.keys[..., self.start_size :, :] = self.shift.rotate(layer.keys[..., self.start_size :, :], -delta)
        self.base = new_base
