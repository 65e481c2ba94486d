"""A stream you can keep reading: a sink+window cache plus the number of tokens read into it.

``score_stream`` and ``score_stream_chunked`` (one whole stream, log-probabilities out) read
through it too (``scoring.score_with_stream``). Continuations (``loglikelihood``) and generation need more: read a context,
keep the cache, then read more tokens, or fork the state and read different continuations from
it. ``Stream`` does all of it with two paths and the same numbers (docs/semantics.md):

- ``read(ids)``: many tokens per forward pass (the chunked path, or the token loop for
  ``method="token"``);
- ``step(token)``: one token per pass through the model's own attention, with the token loop's
  numbers (for ``method="chunked"`` from a ``RingWindowCache``, ring_cache.py); used for decoding.

``DenseStream`` is the same interface over transformers' ``DynamicCache`` (no eviction), the
baseline of ``scripts/throughput.py``.
"""

from __future__ import annotations

import copy
import dataclasses

import torch
from transformers import DynamicCache

from .cache import SinkWindowCache, num_decoder_layers
from .chunked import PLAN_KWARG, chunk_attention, plan_chunk
from .ring_cache import RingWindowCache
from .rotary import RotaryShift
from .scoring import cache_kwarg, check_positions_fit, forward_takes, position_limit, position_of
from .settings import StreamingSettings


def _forward_kwargs(model, cache) -> tuple[dict, dict]:
    """Keyword arguments for a pass that needs every position's logits, and for one that needs the last only."""
    kwargs = {cache_kwarg(model): cache, "use_cache": True}
    # Context tokens need no logits but the last: skip the vocabulary projection for the rest.
    return kwargs, kwargs | ({"logits_to_keep": 1} if forward_takes(model, "logits_to_keep") else {})


def kv_bytes(cache) -> int:
    """Bytes of keys and values a cache holds right now (every layer)."""
    if isinstance(cache, RingWindowCache):
        return cache.held_bytes()  # its one free slot and unrotated sink copies: allocated_bytes()
    return sum(
        layer.keys.nbytes + layer.values.nbytes
        for layer in cache.layers
        if getattr(layer, "is_initialized", False) and layer.keys is not None
    )


class Stream:
    """One stream under a sink+window cache, read incrementally from an empty cache."""

    def __init__(self, model, settings: StreamingSettings, shift: RotaryShift | None):
        self.model, self.settings, self.shift = model, settings, shift
        # The chunked path keeps recent keys in its local frame (chunked.py) in both position
        # modes, so its cache re-rotates on eviction; the token loop uses the settings as given.
        self._chunked = settings.method == "chunked"
        cache_settings = dataclasses.replace(settings, positions="shifted") if self._chunked else settings
        self.cache = SinkWindowCache(num_decoder_layers(model), cache_settings, shift)
        self._ring = False  # chunked streams decode through a RingWindowCache once they step
        self._limit = position_limit(model, settings, shift)
        self.n = 0  # tokens read so far: the next token is x_n
        self.max_held = 0  # most tokens any layer held between passes
        self._kwargs = _forward_kwargs(model, self.cache)

    @property
    def evicted(self) -> int:
        return self.cache.evicted_tokens

    def fork(self) -> Stream:
        """An independent copy of this state (keys and values copied, the rotary tables shared)."""
        return copy.deepcopy(self, memo={id(self.model): self.model, id(self.shift): self.shift})

    @torch.inference_mode()
    def read(self, ids, last_only: bool = False) -> torch.Tensor:
        """Read tokens x_n.. and return the float32 logits after each ([len, vocab]; [1, vocab] if last_only)."""
        out = [logits for _, logits in self.read_passes(ids, last_only)]
        return out[-1][-1:] if last_only else torch.cat(out)

    @torch.inference_mode()
    def read_passes(self, ids, last_only: bool = False):
        """``read`` one forward pass at a time: yields ``(offset in ids, float32 logits)`` per pass.

        A caller that reduces each pass's logits at once (``score_stream_chunked``) never holds more
        than one pass of them. With ``last_only`` a pass yields the logits of its last token only.
        """
        ids = torch.as_tensor(ids, dtype=torch.long).reshape(-1).to(self.model.device)
        if ids.numel() == 0:
            raise ValueError("read() needs at least one token")
        check_positions_fit(self.model, self.n + ids.numel(), self._limit)
        if not self._chunked or self._ring:
            for i, token in enumerate(ids):
                yield i, self.step(int(token))[None]
            return
        kwargs, chunk, first = self._kwargs[last_only], self.settings.chunk_size, self.n
        with chunk_attention(self.model):
            for a in range(0, ids.numel(), chunk):
                b = min(a + chunk, ids.numel())
                plan, positions = plan_chunk(first + a, first + b, self.settings, self.shift, ids.device)
                logits = self.model(input_ids=ids[None, a:b], position_ids=positions[None], **kwargs,
                                    **{PLAN_KWARG: plan}).logits
                self.max_held = max(self.max_held, *self.cache.held_tokens())
                self.n = first + b
                yield a, logits[0].float()

    @torch.inference_mode()
    def step(self, token: int) -> torch.Tensor:
        """Read one token, one pass through the model's own attention; its float32 logits [vocab].

        ``method="token"``: exactly the token loop of ``score_stream``. ``method="chunked"``: the
        same numbers from a ``RingWindowCache`` (no copies, no per-token re-rotation).
        """
        check_positions_fit(self.model, self.n + 1, self._limit)
        if self._chunked and not self._ring:
            if self.n == 0:  # the slots take their shapes from a filled cache: read the first token as a chunk
                return self.read([token])[-1]
            self.cache = RingWindowCache.from_stream(self.cache, self.n, self.settings, self.shift)
            self._kwargs = _forward_kwargs(self.model, self.cache)
            self._ring = True
        ids = torch.tensor([[token]], device=self.model.device)
        position = self.cache.begin_step() if self._ring else position_of(self.n, self.settings)
        out = self.model(input_ids=ids, position_ids=torch.tensor([[position]], device=ids.device), **self._kwargs[False])
        if self._ring:
            self.cache.end_step()
        self.n += 1
        self.max_held = max(self.max_held, *self.cache.held_tokens())
        return out.logits[0, -1].float()


def open_stream(model, settings: StreamingSettings, shift: RotaryShift | None):
    """An empty stream for the settings' method (``recompute`` keeps no cache at all)."""
    if settings.method == "recompute":
        from .recompute import RecomputeStream

        return RecomputeStream(model, settings)
    return Stream(model, settings, shift)


class DenseStream:
    """The same interface over transformers' DynamicCache: every token kept, positions 0, 1, 2, ..."""

    def __init__(self, model):
        self.model = model
        self.cache = DynamicCache(config=model.config)
        self.n = 0
        self._kwargs = _forward_kwargs(model, self.cache)

    @torch.inference_mode()
    def read(self, ids, last_only: bool = False) -> torch.Tensor:
        ids = torch.as_tensor(ids, dtype=torch.long).reshape(1, -1).to(self.model.device)
        positions = torch.arange(self.n, self.n + ids.shape[1], device=ids.device)[None]
        out = self.model(input_ids=ids, position_ids=positions, **self._kwargs[last_only])
        self.n += ids.shape[1]
        logits = out.logits[0].float()
        return logits[-1:] if last_only else logits

    def step(self, token: int) -> torch.Tensor:
        return self.read([token])[-1]

    def read_passes(self, ids, last_only: bool = False):
        """One token per pass (the bare transformers token loop): yields ``(offset, logits [1, vocab])``."""
        for i, token in enumerate(torch.as_tensor(ids).reshape(-1).tolist()):
            yield i, self.step(token)[None]
