"""Attention that also hands its weights to a scored policy's cache (the token loop of TOVA, H2O, ...).

One query per pass: the weights over the ``C + 1`` held keys cost what the model's own attention costs,
so nothing falls back to eager attention for the whole model. Registered with transformers'
``AttentionInterface``; no model code is copied or patched.
"""

from __future__ import annotations


import torch
from transformers import AttentionInterface

from .attention import grouped_rows, refuse_learned_sinks, soft_capped

ATTENTION_NAME = "streaming_lm_weights"
CACHE_KWARG = "streaming_scored_cache"


def _weights_attention(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    cache = kwargs.get(CACHE_KWARG)
    refuse_learned_sinks(kwargs)
    if cache is None:
        raise RuntimeError(f"{ATTENTION_NAME} attention called without a {CACHE_KWARG}")
    batch, heads, q_len, dim = query.shape
    kv_heads = key.shape[1]
    if batch != 1 or q_len != 1:
        raise ValueError("scored policies read one token per pass")
    # Each key/value head's query heads as rows; logits and softmax in float32 (eviction-policies.md).
    rows = grouped_rows(query.float(), kv_heads)[0]
    logits = soft_capped(torch.matmul(rows, key[0].float().transpose(-1, -2)) * scaling, kwargs.get("softcap"))
    dead = cache.layers[module.layer_idx].dead  # padding of heads holding fewer tokens (head_budgets=adaptive)
    if dead is not None:
        logits = logits.masked_fill(dead[:, None, :], float("-inf"))
    weights = torch.softmax(logits, dim=-1)  # [kv_heads, group, K]
    out = torch.matmul(weights.to(value.dtype), value[0]).reshape(1, heads, 1, -1)
    cache.layers[module.layer_idx].after_attention(weights.reshape(heads, -1), query[0])
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(ATTENTION_NAME, _weights_attention)


def weights_from_outputs(model) -> bool:
    """Whether a step's weights must come from the model's outputs (``output_attentions``) instead: its attention
    runs in its own code, which never calls ``_weights_attention`` (Falcon, MPT, BLOOM; support.py says which).
    Layers evict only after their own attention, so every layer's eviction can wait for the end of the pass."""
    return not type(model).is_backend_compatible()


def hand_over(cache, attentions) -> None:
    """The weights a model returned ([1, query_heads, 1, K] per layer) to each layer of a scored cache, in float32."""
    if attentions is None or len(attentions) != len(cache.layers):  # never evict on weights a model did not give
        raise RuntimeError("the model returned no attention weights for every layer (output_attentions=True); a "
                           "policy that scores by attention cannot run on it")
    for layer, weights in zip(cache.layers, attentions):
        layer.after_attention(weights[0, :, -1].float())

