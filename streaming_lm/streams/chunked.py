"""Exact chunked reading: many tokens per forward pass, the token loop's numbers.

Every query of a chunk must see exactly its visible set (``policy.visible_mask``) at exactly the
positions of docs/semantics.md. Inside the recent window only relative distances matter, so the chunk
uses "local" positions counted from the first recent token held (r0); the cache keeps its recent
keys in that frame (rotating them back as the window slides). Sink logits need the distance
``p(t) - j`` instead, so they are scored with the query rotated by ``p(t) - L(t)``, and one
softmax runs over sink and window logits together. This lives in an attention function
registered with transformers' ``AttentionInterface``: no model code is copied or patched.

Decoding (``step``) hands the state over to a ``DecodeStream`` (static slots, decode.py).
"""

from __future__ import annotations

import dataclasses
import functools

import torch
import torch.nn.functional as F
from transformers import AttentionInterface

from ..forward_args import num_decoder_layers
from ..positions import first_recent, query_position
from ..rotary import LayerShifts, RotaryShift
from ..storage import EvictingDynamicCache
from ..loglik import ContinuationScore
from .attention import grouped_rows, pass_state, soft_capped
from .base import EvictingStream, as_ids, chunk_spans, score_batched
from .decode import DecodeStream

ATTENTION_NAME = "streaming_lm_chunked"


@dataclasses.dataclass
class ChunkPlan:
    """What every layer's attention needs for one chunk (the same at every layer)."""

    allowed: torch.Tensor  # bool [Q, K]: query t may attend key column k
    n_sink: int  # the first n_sink key columns are sinks
    query_shift: torch.Tensor  # long [Q]: p(t) - L(t), the extra rotation for sink logits
    shift: RotaryShift | LayerShifts | None  # for_layer(module.layer_idx): the layer's own
    # Worked out at the first layer and reused by the others (a layer's attention runs per pass, the plan once):
    # ("hidden", group), ("additive", dtype), ("sink", id(shift)).
    _memo: dict = dataclasses.field(default_factory=dict)

    def hidden(self, group: int) -> torch.Tensor:
        """bool [group * Q, K]: what each grouped row may not see (the mask, repeated for the query heads)."""
        key = ("hidden", group)
        if key not in self._memo:
            self._memo[key] = ~self.allowed.repeat(group, 1)
        return self._memo[key]

    @functools.cached_property
    def rotates_sinks(self) -> bool:
        """Whether some query's sink logits need a rotation (one device sync per pass, not per layer)."""
        return bool(self.n_sink) and self.shift is not None and bool(self.query_shift.any())

    def additive(self, dtype) -> torch.Tensor:
        """The mask as an additive float [Q, K] (0 where a query sees a key, -inf elsewhere), once per dtype."""
        key = ("additive", dtype)
        if key not in self._memo:
            self._memo[key] = torch.zeros(self.allowed.shape, dtype=dtype, device=self.allowed.device).masked_fill_(
                ~self.allowed, float("-inf"))
        return self._memo[key]

    def sink_tables(self, shift: RotaryShift, device) -> tuple[torch.Tensor, torch.Tensor]:
        """The rotation tables of ``query_shift`` for ``shift`` (layers sharing a shift share them)."""
        key = ("sink", id(shift))
        if key not in self._memo:
            self._memo[key] = shift.tables(self.query_shift, device)
        return self._memo[key]


def _chunk_attention(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    plan: ChunkPlan = pass_state(ATTENTION_NAME)
    batch, heads, q_len, dim = query.shape
    kv_heads = key.shape[1]
    group = heads // kv_heads
    shift = plan.shift.for_layer(getattr(module, "layer_idx", None)) if plan.shift is not None else None
    rotated = shift is not None and plan.rotates_sinks
    if kwargs.get("softcap") is None and kwargs.get("s_aux") is None:
        # One fused SDPA call: the mask says what each query sees; where a query's sink logits need another
        # rotation, the mask carries the difference as an additive bias on the sink columns (its logit there is
        # then the rotated query's), so sinks and window share one softmax as before.
        mask = plan.allowed[None, None]
        if rotated:
            cos, sin = plan.sink_tables(shift, query.device)
            sink_keys = key[..., : plan.n_sink, :].transpose(-1, -2).float()
            moved = torch.matmul(grouped_rows(shift.rotate_by(query, cos, sin), kv_heads).float(), sink_keys)
            bias = ((moved - torch.matmul(grouped_rows(query, kv_heads).float(), sink_keys)) * scaling)
            mask = plan.additive(query.dtype).expand(batch, heads, -1, -1).clone()
            mask[..., : plan.n_sink] += bias.reshape(batch, heads, q_len, plan.n_sink).to(query.dtype)
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scaling, enable_gqa=True)
        return out.transpose(1, 2).contiguous(), None
    rows = grouped_rows(query, kv_heads)
    logits = torch.matmul(rows, key.transpose(-1, -2)) * scaling
    if rotated:
        cos, sin = plan.sink_tables(shift, query.device)
        sink_query = grouped_rows(shift.rotate_by(query, cos, sin), kv_heads)
        logits[..., : plan.n_sink] = torch.matmul(sink_query, key[..., : plan.n_sink, :].transpose(-1, -2)) * scaling
    # in place: the logits are this function's own (no copy of [rows, keys] per layer)
    logits = soft_capped(logits, kwargs.get("softcap")).masked_fill_(plan.hidden(group), float("-inf"))
    learned = kwargs.get("s_aux")  # gpt-oss: a learned logit per head joins every softmax, then is dropped
    if learned is not None:
        column = learned.to(logits.dtype).view(1, kv_heads, group, 1, 1).expand(batch, -1, -1, q_len, 1)
        logits = torch.cat((logits, column.reshape(batch, kv_heads, group * q_len, 1)), dim=-1)
    weights = torch.softmax(logits, dim=-1, dtype=torch.float32).to(value.dtype)
    if learned is not None:
        weights = weights[..., :-1]
    out = torch.matmul(weights, value).reshape(batch, heads, q_len, dim)
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(ATTENTION_NAME, _chunk_attention)



def plan_chunk(a: int, b: int, stream: ChunkedStream, device):
    """Key columns, mask, local positions and sink rotations for queries a..b-1."""
    settings, policy = stream.settings, stream.policy
    keys = torch.cat((policy.held_index(a), torch.arange(a, b)))  # the cache's tokens, then the chunk's
    queries = torch.arange(a, b)
    allowed = policy.visible_mask(queries, keys)
    local = settings.start_size + queries - first_recent(a, settings)  # L(t): counted from r0
    target = query_position(queries, settings)  # p(t)
    plan = ChunkPlan(allowed.to(device), min(settings.start_size, b), (target - local), stream.shift)
    positions = local if stream.shift is not None else target  # without RoPE the ids themselves carry p(t)
    return plan, positions.to(device)


class ChunkedStream(EvictingStream):
    """``method="chunked"``: ``chunk_size`` tokens per pass; the cache keeps recent keys in the local frame
    (so it re-rotates on eviction in both position modes)."""

    def __init__(self, model, settings, shift, batch_size: int = 1, policy=None):
        self._layers = num_decoder_layers(model)
        super().__init__(model, settings, shift, policy=policy)
        self._decoder: DecodeStream | None = None  # once the stream steps

    def new_cache(self):
        return EvictingDynamicCache(self._layers, self.policy, self.shift)

    def read_passes(self, ids, last_only: bool = False):
        ids = as_ids(ids, self.model.device)
        if self._decoder is not None:
            for i, token in enumerate(ids.tolist()):
                yield i, self.step(token)[None]
            return
        for a, logits in self._read_rows(ids[None], last_only):
            yield a, logits[0]

    def _read_rows(self, rows: torch.Tensor, last_only: bool = False):
        """Read ``rows`` ([B, L] token ids; B > 1 only on a state that is thrown away after, see
        ``score_continuations``): yields ``(offset, float32 logits [B, q, vocab])`` per chunk of L."""
        return self._read_in_passes(rows, chunk_spans(rows.shape[1], self.settings.chunk_size), ATTENTION_NAME,
                                    lambda a, b: plan_chunk(a, b, self, rows.device), last_only)

    @torch.inference_mode()
    def score_continuations(self, context, continuations) -> list[ContinuationScore]:
        """The continuations of a context read together, as the rows of a batch (``score_batched``)."""
        if self._decoder is not None:
            return super().score_continuations(context, continuations)
        return score_batched(self, context, continuations, self.policy.evicted_count)

    @torch.inference_mode()
    def step(self, token: int) -> torch.Tensor:
        """One token through the model's own attention, from static slots: the token loop's numbers."""
        if self._decoder is None:
            if self.n == 0:  # the slots take their shapes from a filled cache: read the first token as a chunk
                return self.read([token])[-1]
            self._decoder = DecodeStream.from_dynamic(self)
            self.cache = self._decoder.cache  # accounting (evicted, bytes) is the decode slots' from now on
        logits = self._decoder.step(token)
        self.n, self.max_held = self._decoder.n, self._decoder.max_held
        self.held_per_layer, self.held_per_head = self._decoder.held_per_layer, self._decoder.held_per_head
        return logits
