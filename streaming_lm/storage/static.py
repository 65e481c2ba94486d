"""A decode-speed cache: preallocated slots, no copies, no per-token re-rotation.

``EvictingDynamicLayer`` concatenates and, with shifted positions, re-rotates the whole window after
every pass: for decoding one token at a time that is most of what streaming costs.
``EvictingStaticCache`` gives the same numbers (docs/semantics.md) another way:

- Each layer owns ``C + K`` slots (``K = evict_every``), the first ``S`` for the sinks. A new token is
  written into the lowest free slot and the step attends to every slot in use (at most ``C + K`` keys;
  attention over a set does not depend on the order). After the step the policy's evicted tokens free their
  slots: with ``K = 1`` nothing is copied, and between steps exactly ``C`` tokens are held; with ``K > 1`` an
  event frees several slots, and the tokens behind them move down once so that the slots in use stay
  ``0 .. held - 1`` (at most ``C`` copies per ``K`` tokens).
- Keys stay where they were rotated. The model rotates the new token at a frame position
  ``t - base``; inside the window only distances matter, so recent keys never move. The sinks
  are what must move instead (``S`` keys, from a kept unrotated copy): with shifted positions
  their distance to the query is ``p(t) - j``, not ``t - j``.
- Every ``REBASE_EVERY`` tokens the frame is reset to the token loop's (the query at ``C``) by
  rotating the window once, so positions stay below ``C + REBASE_EVERY`` however long the stream.

Only for models with rotary embeddings and shifted positions does anything rotate; with
``positions="original"`` the frame is the text itself (the token loop's), and models without
rotary embeddings use ``p(t)`` directly.
"""

from __future__ import annotations

import heapq

import torch
from transformers.cache_utils import Cache, DynamicLayer

from ..methods import EvictionPolicy
from ..positions import first_recent, query_position
from ..rotary import LayerShifts, RotaryShift
from ..settings import StreamingSettings
from .accounting import KVAccounting

REBASE_EVERY = 256  # frame resets: one window rotation per 256 tokens; positions stay below C + 256


class EvictingStaticLayer(DynamicLayer):
    """One layer's slots: ``keys``/``values`` hold ``S`` sink slots then the others, ``C + K`` in all."""

    def __init__(self, owner: EvictingStaticCache, keys: torch.Tensor, values: torch.Tensor, sink_keys: torch.Tensor,
                 shift: RotaryShift | None):
        super().__init__()
        self.owner, self.shift = owner, shift  # this layer's shift (None: no RoPE here, nothing moves)
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
        if owner.sink_delta and self.shift is not None:
            cos, sin = self.shift.cos_sin(owner.sink_delta, self.device)  # memoised per delta
            self.keys[..., : owner.start_size, :] = self.shift.rotate_by(self.sink_keys, cos, sin)
        return self.keys[..., : owner.attended, :], self.values[..., : owner.attended, :]

    def get_seq_length(self) -> int:
        return self.owner.held



class EvictingStaticCache(KVAccounting, Cache):
    """A ``Cache`` for one-token steps; build it from a filled dynamic cache with ``from_dynamic``."""

    def __init__(self, policy: EvictionPolicy, settings: StreamingSettings, shift: RotaryShift | LayerShifts | None,
                 n: int, base: int, layers_kv, slot_of: dict[int, int]):
        self.policy, self.settings, self.start_size = policy, settings, settings.start_size
        self.rotating = shift is not None and settings.positions == "shifted"
        self.shift = shift
        self.n, self.base = n, base  # tokens read so far; the frame's origin (position = t - base)
        self.held = len(slot_of)
        self.evicted = n - self.held
        self.write_slot = self.attended = 0
        self.sink_delta = 0  # the sinks' extra rotation this step (0: none)
        self._slot_of = slot_of  # token -> slot, for every token held
        self.slots = policy.capacity + policy.schedule.extra_slots()
        self._free = sorted(set(range(self.slots)) - set(slot_of.values()))  # a heap
        super().__init__(layers=[EvictingStaticLayer(self, *kv, shift.for_layer(i) if shift is not None else None)
                                 for i, kv in enumerate(layers_kv)])

    @classmethod
    def from_dynamic(cls, cache, n: int, settings: StreamingSettings,
                     shift: RotaryShift | LayerShifts | None) -> EvictingStaticCache:
        """Move a dynamic cache filled by the chunked path (recent token ``s`` rotated to ``S + s - r0``) into slots."""
        policy, start = cache.policy, settings.start_size
        slots = settings.capacity + policy.schedule.extra_slots()
        held = policy.held_index(n).tolist()
        sinks = sum(1 for j in held if j < start)
        base = first_recent(n, settings) - start
        if shift is not None and settings.positions == "original" and base:
            # The token loop keeps original positions at the text's own: move the window there once.
            rotate, base = base, 0
        else:
            rotate = 0
        layers_kv = []
        for i, layer in enumerate(cache.layers):
            keys, values = layer.keys, layer.values
            layer_shift = shift.for_layer(i) if shift is not None else None
            shape = (*keys.shape[:-2], slots, keys.shape[-1])
            slot_keys, slot_values = keys.new_zeros(shape), values.new_zeros(shape)
            slot_keys[..., :sinks, :] = keys[..., :sinks, :]
            slot_keys[..., start : start + len(held) - sinks, :] = (
                layer_shift.rotate(keys[..., sinks:, :], rotate) if rotate and layer_shift is not None
                else keys[..., sinks:, :]
            )
            slot_values[..., :sinks, :] = values[..., :sinks, :]
            slot_values[..., start : start + len(held) - sinks, :] = values[..., sinks:, :]
            sink_keys = keys.new_zeros((*keys.shape[:-2], start, keys.shape[-1]))
            sink_keys[..., :sinks, :] = keys[..., :sinks, :]
            layers_kv.append((slot_keys, slot_values, sink_keys))
        slot_of = {j: (j if i < sinks else start + i - sinks) for i, j in enumerate(held)}
        return cls(policy, settings, shift, n, base, layers_kv, slot_of)

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
        """Every slot, the free slots and the unrotated sink copies included."""
        return sum(layer.keys.nbytes + layer.values.nbytes + layer.sink_keys.nbytes for layer in self.layers)

    @property
    def overhead_tokens(self) -> float:
        """The ``K`` slots beyond ``C`` (one free slot with ``evict_every=1``), and the sinks' unrotated keys (keys
        only: half a token each)."""
        return self.slots - self.policy.capacity + self.start_size / 2

    def begin_step(self) -> int:
        """Prepare the slots for token ``x_n``; returns its position id."""
        t, start = self.n, self.start_size
        self.write_slot = heapq.heappop(self._free)
        self.attended = self.held + 1
        position = query_position(t, self.settings)
        if not self.rotating:
            self.sink_delta = 0
            return position
        if t - self.base > self.settings.capacity + REBASE_EVERY:
            self._rebase(t - self.settings.capacity)
        # Sink j must sit at distance p(t) - j from the query at t - base.
        delta = t - self.base - position
        if delta and start:
            self.sink_delta = delta
        else:
            self.sink_delta = 0
            if 0 < start <= t:  # sinks back at their own positions (after a rebase or before any eviction)
                for layer in self.layers:
                    layer.keys[..., :start, :] = layer.sink_keys
        return t - self.base

    def end_step(self) -> None:
        t = self.n
        self._slot_of[t] = self.write_slot
        evicted = self.policy.evicted_after(t)
        for token in evicted:
            heapq.heappush(self._free, self._slot_of.pop(token))
        self.n += 1
        self.held += 1 - len(evicted)
        self.evicted += len(evicted)
        if len(evicted) > 1:
            self._compact()

    def _compact(self) -> None:
        """After an event freed several slots: move the tokens held at slots ``>= held`` into the free slots below,
        so that a step attends slots ``0 .. held`` (one free slot, the next write, is the most a gap may be)."""
        holes = sorted(slot for slot in self._free if slot < self.held)
        movers = sorted((slot, token) for token, slot in self._slot_of.items() if slot >= self.held)
        if not holes:
            return
        source, target = torch.tensor([slot for slot, _ in movers]), torch.tensor(holes)
        for layer in self.layers:
            for tensor in (layer.keys, layer.values):
                device = tensor.device
                tensor[..., target.to(device), :] = tensor.index_select(-2, source.to(device))
        for (_, token), slot in zip(movers, holes, strict=True):
            self._slot_of[token] = slot
        self._free = list(range(self.held, self.slots))  # sorted: a heap

    def _rebase(self, new_base: int) -> None:
        delta = new_base - self.base
        for layer in self.layers:
            if layer.shift is not None:
                layer.keys[..., self.start_size :, :] = layer.shift.rotate(layer.keys[..., self.start_size :, :], -delta)
        self.base = new_base
