"""Independent, deliberately naive references for the streaming semantics (docs/semantics.md).

Nothing here imports streaming_lm: these re-derive the definition from scratch.
"""

from __future__ import annotations

import math
import re

import torch


def dense_logprobs(model, ids: torch.Tensor) -> torch.Tensor:
    """log p(x_{t+1} | x_0..x_t) from one full forward pass, no cache."""
    with torch.no_grad():
        logits = model(ids[None]).logits[0].float()
    return torch.log_softmax(logits, -1)[:-1].gather(-1, ids[1:, None])[:, 0]


def sink_window_allowed(n: int, start: int, recent: int, every: int = 1) -> torch.Tensor:
    """bool [n, n], the suite's one reference mask: allowed(t, s) = s <= t and (s < S or s >= e - W), where
    e = t - t % K is the last event (the cache compressed after every K tokens; e = t for K = 1)."""
    t = torch.arange(n)[:, None]
    s = torch.arange(n)[None, :]
    return (s <= t) & ((s < start) | (s >= t - t % every - recent))


def sink_window_mask(n: int, start: int, recent: int, every: int = 1) -> torch.Tensor:
    """``sink_window_allowed`` as an additive attention mask [1, 1, n, n] (0 or -inf) for one dense pass."""
    return torch.zeros(n, n).masked_fill(~sink_window_allowed(n, start, recent, every), float("-inf"))[None, None]


def original_positions_logprobs(model, ids: torch.Tensor, start: int, recent: int, every: int = 1) -> torch.Tensor:
    """positions="original" in one pass with the sink+window mask."""
    mask = sink_window_mask(ids.numel(), start, recent, every)
    with torch.no_grad():
        logits = model(ids[None], attention_mask=mask).logits[0].float()
    return torch.log_softmax(logits, -1)[:-1].gather(-1, ids[1:, None])[:, 0]


def _rope(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """Rotate x [heads, seq, dim] to integer positions [seq] (rotate_half layout)."""
    angles = positions.double()[:, None] * inv_freq.double()[None, :]
    cos = torch.cat((angles, angles), -1).cos().float()
    sin = torch.cat((angles, angles), -1).sin().float()
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), -1)
    return x * cos + rotated * sin


@torch.no_grad()
def shifted_llama_logprobs(model, ids: torch.Tensor, start: int, recent: int, every: int = 1) -> torch.Tensor:
    """positions="shifted" for a Llama-family model, one token at a time, by hand.

    Keys are kept unrotated and rotated afresh at their current cache slot on every step:
    sinks at 0..S-1, the query at p(t) = (keys attended) - 1 (min(t, C) when the cache is trimmed after every
    token), a recent token s at p(t) - (t - s). The cache is trimmed after every ``every`` tokens.
    """
    inner = model.model
    cfg = model.config
    heads, kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    inv_freq = inner.rotary_emb.inv_freq
    capacity = start + recent
    n_layers, n = len(inner.layers), ids.numel()
    raw_keys = torch.zeros(n_layers, kv_heads, n, head_dim)  # unrotated, one column per token
    values = torch.zeros(n_layers, kv_heads, n, head_dim)
    kept: list[int] = []  # token indices held in the cache between steps
    out = []
    for t in range(n - 1):
        visible = kept + [t]
        p = len(visible) - 1
        slots = torch.tensor([j if j < start else p - (t - j) for j in visible])
        index = torch.tensor(visible)
        h = inner.embed_tokens(ids[t : t + 1])  # [1, hidden]
        for layer_idx, layer in enumerate(inner.layers):
            attn = layer.self_attn
            a = layer.input_layernorm(h)
            q = attn.q_proj(a).view(heads, 1, head_dim)
            raw_keys[layer_idx, :, t] = attn.k_proj(a).view(kv_heads, head_dim)
            values[layer_idx, :, t] = attn.v_proj(a).view(kv_heads, head_dim)
            q = _rope(q, torch.tensor([p]), inv_freq)
            k = _rope(raw_keys[layer_idx][:, index], slots, inv_freq).repeat_interleave(heads // kv_heads, 0)
            v = values[layer_idx][:, index].repeat_interleave(heads // kv_heads, 0)
            weights = torch.softmax((q @ k.transpose(1, 2)) * head_dim**-0.5, -1)
            h = h + attn.o_proj((weights @ v).transpose(0, 1).reshape(1, heads * head_dim))
            h = h + layer.mlp(layer.post_attention_layernorm(h))
        logits = model.lm_head(inner.norm(h))[0].float()
        out.append(torch.log_softmax(logits, -1)[ids[t + 1]])
        event = (t + 1) % every == 0
        kept = visible if len(visible) <= capacity or not event else visible[:start] + visible[-recent:]
    return torch.stack(out)


def perplexity(logprobs: torch.Tensor) -> float:
    return float(torch.exp(-logprobs.double().mean()))


def lm_eval_words(text: str) -> int:
    """lm-eval's word count, ``len(re.split(r"\\s+", text))``: words plus one empty field per whitespace end."""
    return len(re.split(r"\s+", text))


def word_perplexity(logliks, words) -> float:
    """lm-eval's ``word_perplexity`` (weighted_perplexity) over documents: exp(-sum log-likelihood / sum words)."""
    return math.exp(-sum(logliks) / sum(words))


@torch.no_grad()
def shifted_one_layer_logprobs(model, ids: torch.Tensor, start: int, recent: int) -> torch.Tensor:
    """positions="shifted" for any one-layer model: there a key depends on its own token and position only,
    so step t is one fresh pass over the tokens held plus x_t, sink j at j, recent s at min(t, C) - (t - s)."""
    out, kept, capacity = [], [], start + recent
    for t in range(ids.numel() - 1):
        visible = kept + [t]
        query = min(t, capacity)
        slots = [j if j < start else query - (t - j) for j in visible]
        logits = model(ids[visible][None], position_ids=torch.tensor([slots])).logits[0, -1].float()
        out.append(torch.log_softmax(logits, -1)[ids[t + 1]])
        kept = visible if len(visible) <= capacity else visible[:start] + visible[-recent:]
    return torch.stack(out)
