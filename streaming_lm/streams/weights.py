"""The token loop's observation of a scored method (TOVA, H2O, ...): an attention function that hands each layer's
weights and query to the event rule (``after_step``), or the weights a model returns (``hand_over``).

One query per pass: the weights over the ``C + 1`` held keys cost what the model's own attention costs,
so nothing falls back to eager attention for the whole model. Registered with transformers'
``AttentionInterface``; no model code is copied or patched.
"""

from __future__ import annotations


import torch
from transformers import AttentionInterface

from ..methods.event import Observation, keep, step_scores
from .attention import attention_reach, grouped_rows, pass_state, refuse_learned_sinks, soft_capped

ATTENTION_NAME = "streaming_lm_weights"


def _weights_attention(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    cache = pass_state(ATTENTION_NAME)
    refuse_learned_sinks(kwargs)
    batch, heads, q_len, dim = query.shape
    kv_heads = key.shape[1]
    if batch != 1 or q_len != 1:
        raise ValueError("scored policies read one token per pass")
    # Each key/value head's query heads as rows; logits and softmax in float32 (docs/policies.md).
    rows = grouped_rows(query.float(), kv_heads)[0]
    logits = soft_capped(torch.matmul(rows, key[0].float().transpose(-1, -2)) * scaling, kwargs.get("softcap"))
    dead = cache.layers[module.layer_idx].dead  # padding of heads holding fewer tokens (head_budgets=adaptive)
    if dead is not None:
        logits = logits.masked_fill(dead[:, None, :], float("-inf"))
    weights = torch.softmax(logits, dim=-1)  # [kv_heads, group, K]
    out = torch.matmul(weights.to(value.dtype), value[0]).reshape(1, heads, 1, -1)
    after_step(cache.layers[module.layer_idx], weights.reshape(heads, -1), query[0], scaling)
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(ATTENTION_NAME, _weights_attention)


def weights_from_outputs(model) -> bool:
    """Whether a step's weights must come from the model's outputs (``output_attentions``, under its eager
    attention) instead: its attention does not reach ``_weights_attention`` (the probe, ``attention_reach``: MPT and
    BLOOM compute it in model code, falcon-rw adds ALiBi through its mask). Layers evict only after their own
    attention, so every layer's eviction can wait for the end of the pass."""
    return not attention_reach(model).served


def hand_over(cache, attentions, policy: str, model) -> None:
    """The weights a model returned ([1, query_heads, 1, K] per layer) to each layer of a scored cache, in float32."""
    # Never evict on weights a model did not give.
    if attentions is None or len(attentions) != len(cache.layers) or any(w is None for w in attentions):
        raise RuntimeError(
            f"policy={policy} scores by attention weights, and {type(model).__name__} returned none for some layers "
            f"with output_attentions=True under attn_implementation={model.config._attn_implementation!r}; use a "
            "policy that scores by keys (knorm) or sink_window"
        )
    for layer, weights in zip(cache.layers, attentions):
        after_step(layer, weights[0, :, -1].float())


def after_step(layer, attention=None, query=None, scale: float | None = None) -> None:
    """A step of the token loop is in for ``layer`` (a ``ScoredDynamicLayer``): its attention weights (float32
    [query_heads, K]), query ([query_heads, 1, head_dim]) and attention scaling where the method reads them. Scores accumulate (history);
    at an event the layer keeps what the event rule says."""
    policy, t = layer.policy, layer.seen - 1
    queries = layer.observe(query) if query is not None else None
    event = policy.schedule.event_after(t)
    if event:
        layer.queries = None  # the next segment starts empty
    obs = Observation(layer.keys[0], layer.values[0], t, attention, queries, scale=scale, layer=layer.index)
    if layer.history:
        obs.scores = step_scores(policy, obs, layer.tokens.shape[0], layer.totals)
    if event:
        kept = keep(policy, layer.index, layer.layers, obs, None if layer.dead is None else ~layer.dead, layer.tokens)
        if kept is not None:
            layer.keep(kept)

