"""What the registered attention functions (chunked.py, weights.py, scored_chunked.py) share."""

from __future__ import annotations

import torch


def grouped_rows(query: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """[B, heads, Q, D] -> [B, kv_heads, group * Q, D]: each key/value head's query heads as rows, so
    grouped-query attention needs no copies of the keys."""
    batch, _, _, dim = query.shape
    return query.reshape(batch, kv_heads, -1, dim)


def soft_capped(logits: torch.Tensor, softcap: float | None) -> torch.Tensor:
    """Gemma-style logit soft-capping (the ``softcap`` kwarg transformers passes), else the logits."""
    return logits if softcap is None else torch.tanh(logits / softcap) * softcap


def refuse_learned_sinks(kwargs: dict) -> None:
    if kwargs.get("s_aux") is not None:  # gpt_oss's learned sink logits are not in a scored policy's weights yet
        raise NotImplementedError("scored policies do not support attention with learned sink logits (gpt_oss)")
