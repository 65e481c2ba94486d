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

import torch
from transformers import AttentionInterface

from ..forward_args import num_decoder_layers
from ..positions import check_positions_fit, first_recent, query_position
from ..rotary import LayerShifts, RotaryShift
from .base import as_ids, attention
from .decode import DecodeStream
from .token import TokenStream

ATTENTION_NAME = "streaming_lm_chunked"
PLAN_KWARG = "streaming_plan"


@dataclasses.dataclass
class ChunkPlan:
    """What every layer's attention needs for one chunk (the same at every layer)."""

    allowed: torch.Tensor  # bool [Q, K]: query t may attend key column k
    n_sink: int  # the first n_sink key columns are sinks
    query_shift: torch.Tensor  # long [Q]: p(t) - L(t), the extra rotation for sink logits
    shift: RotaryShift | LayerShifts | None  # for_layer(module.layer_idx): the layer's own
    calls: int = 0  # layers whose attention ran here: a model that bypasses the function must not pass silently


def _chunk_attention(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    plan: ChunkPlan | None = kwargs.get(PLAN_KWARG)
    if plan is None:
        raise RuntimeError(f"{ATTENTION_NAME} attention called without a {PLAN_KWARG}")
    plan.calls += 1
    batch, heads, q_len, dim = query.shape
    kv_heads = key.shape[1]
    group = heads // kv_heads
    # Grouped-query attention without copying keys: fold each group's heads into the rows.
    rows = query.reshape(batch, kv_heads, group * q_len, dim)
    logits = torch.matmul(rows, key.transpose(-1, -2)) * scaling
    shift = plan.shift.for_layer(getattr(module, "layer_idx", None)) if plan.shift is not None else None
    if plan.n_sink and shift is not None and bool(plan.query_shift.any()):
        sink_query = shift.rotate(query, plan.query_shift).reshape(batch, kv_heads, group * q_len, dim)
        logits[..., : plan.n_sink] = torch.matmul(sink_query, key[..., : plan.n_sink, :].transpose(-1, -2)) * scaling
    softcap = kwargs.get("softcap")
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    logits = logits.masked_fill(~plan.allowed.repeat(group, 1), float("-inf"))
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


class ChunkedStream(TokenStream):
    """``method="chunked"``: ``chunk_size`` tokens per pass; the cache keeps recent keys in the local frame
    (so it re-rotates on eviction in both position modes)."""

    frame_rotates = True

    def __init__(self, model, settings, shift, batch_size: int = 1):
        super().__init__(model, settings, shift)
        self._decoder: DecodeStream | None = None  # once the stream steps
        self._layers = num_decoder_layers(model)

    def read_passes(self, ids, last_only: bool = False):
        ids = as_ids(ids, self.model.device)
        if self._decoder is not None:
            for i, token in enumerate(ids.tolist()):
                yield i, self.step(token)[None]
            return
        check_positions_fit(self.model, self.n + ids.numel(), self._limit)
        kwargs, chunk, first = self._kwargs[last_only], self.settings.chunk_size, self.n
        with attention(self.model, ATTENTION_NAME):
            for a in range(0, ids.numel(), chunk):
                b = min(a + chunk, ids.numel())
                plan, positions = plan_chunk(first + a, first + b, self, ids.device)
                logits = self.model(input_ids=ids[None, a:b], position_ids=positions[None], **kwargs,
                                    **{PLAN_KWARG: plan}).logits
                if plan.calls < self._layers:
                    raise RuntimeError(
                        f"{type(self.model).__name__}: {plan.calls} of {self._layers} layers ran the chunked attention "
                        "function; the others computed attention in model code that cannot see the chunk's plan"
                    )
                self.max_held = max(self.max_held, *self.cache.held_tokens())
                self.n = first + b
                yield a, logits[0].float()

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
        return logits
