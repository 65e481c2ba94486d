"""Exact chunked scoring: many tokens per forward pass, the token loop's numbers.

Every query of a chunk must see exactly its visible set V(t) at exactly the positions of
docs/semantics.md. Inside the recent window only relative distances matter, so the chunk
uses "local" positions counted from the first recent token held; the cache keeps its recent
keys in that frame (rotating them back as the window slides). Sink logits need the distance
``P(t) - j`` instead, so they are scored with the query rotated by ``P(t) - L(t)``, and one
softmax runs over sink and window logits together. This lives in an attention function
registered with transformers' ``AttentionInterface``: no model code is copied or patched.
"""

from __future__ import annotations

import contextlib
import dataclasses

import torch
from transformers import AttentionInterface

from .rotary import RotaryShift
from .scoring import StreamScore, score_with_stream
from .settings import StreamingSettings

ATTENTION_NAME = "streaming_lm_chunked"
PLAN_KWARG = "streaming_plan"


@dataclasses.dataclass
class ChunkPlan:
    """What every layer's attention needs for one chunk (the same at every layer)."""

    allowed: torch.Tensor  # bool [Q, K]: query t may attend key column k
    n_sink: int  # the first n_sink key columns are sinks
    query_shift: torch.Tensor  # long [Q]: P(t) - L(t), the extra rotation for sink logits
    shift: RotaryShift | None


def _chunk_attention(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    plan: ChunkPlan | None = kwargs.get(PLAN_KWARG)
    if plan is None:
        raise RuntimeError(f"{ATTENTION_NAME} attention called without a {PLAN_KWARG}")
    batch, heads, q_len, dim = query.shape
    kv_heads = key.shape[1]
    group = heads // kv_heads
    # Grouped-query attention without copying keys: fold each group's heads into the rows.
    rows = query.reshape(batch, kv_heads, group * q_len, dim)
    logits = torch.matmul(rows, key.transpose(-1, -2)) * scaling
    if plan.n_sink and plan.shift is not None and bool(plan.query_shift.any()):
        sink_query = plan.shift.rotate(query, plan.query_shift).reshape(batch, kv_heads, group * q_len, dim)
        logits[..., : plan.n_sink] = torch.matmul(sink_query, key[..., : plan.n_sink, :].transpose(-1, -2)) * scaling
    softcap = kwargs.get("softcap")
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    logits = logits.masked_fill(~plan.allowed.repeat(group, 1), float("-inf"))
    weights = torch.softmax(logits, dim=-1, dtype=torch.float32).to(value.dtype)
    out = torch.matmul(weights, value).reshape(batch, heads, q_len, dim)
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(ATTENTION_NAME, _chunk_attention)


@contextlib.contextmanager
def chunk_attention(model):
    """Route the model's attention through the chunk attention, restoring it afterwards."""
    previous = model.config._attn_implementation
    model.set_attn_implementation(ATTENTION_NAME)
    try:
        yield
    finally:
        model.set_attn_implementation(previous)


def plan_chunk(a: int, b: int, settings: StreamingSettings, shift: RotaryShift | None, device):
    """Key columns, mask, local positions and sink rotations for queries a..b-1."""
    start, recent, capacity = settings.start_size, settings.recent_size, settings.capacity
    first_recent = max(start, a - recent)  # r0: oldest recent token still held
    keys = torch.cat((torch.arange(min(start, a)), torch.arange(min(first_recent, a), b)))
    queries = torch.arange(a, b)
    allowed = (keys[None, :] <= queries[:, None]) & (
        (keys[None, :] < start) | (keys[None, :] >= queries[:, None] - recent)
    )
    local = start + queries - first_recent  # L(t): recent keys and queries, counted from r0
    target = queries.clamp(max=capacity) if settings.positions == "shifted" else queries  # P(t)
    plan = ChunkPlan(allowed.to(device), min(start, b), (target - local), shift)
    positions = local if shift is not None else target  # without RoPE the ids themselves carry p(t)
    return plan, positions.to(device)


def score_stream_chunked(
    model,
    token_ids,
    settings: StreamingSettings,
    shift: RotaryShift | None,
    chunk_size: int,
    progress: bool = False,
) -> StreamScore:
    """Streaming log-probabilities of ``token_ids[1:]``, ``chunk_size`` queries per forward pass."""
    chunked = dataclasses.replace(settings, method="chunked", chunk_size=chunk_size, stride=None)
    return score_with_stream(model, token_ids, chunked, shift, progress)
