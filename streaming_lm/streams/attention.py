"""Attention functions registered with transformers' ``AttentionInterface`` (chunked.py, weights.py,
scored_chunked.py): switching a model to one, and the row arithmetic they share."""

from __future__ import annotations

import contextlib

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


@contextlib.contextmanager
def attention_function(model, name: str):
    """Route the model's attention through the registered function ``name``, restoring it afterwards."""
    previous = model.config._attn_implementation
    if previous == name:  # nested (a token loop's steps inside its read): switching costs milliseconds a pass
        yield
        return
    model.set_attn_implementation(name)
    try:
        yield
    finally:
        model.set_attn_implementation(previous)
