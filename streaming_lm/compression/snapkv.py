"""SnapKV: keys the last queries of the segment (the observation window) attend to are kept.

Li et al., *SnapKV: LLM Knows What You are Looking for Before Generation*, 2024, https://arxiv.org/abs/2404.14469
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .checks import check_snapkv


def window_attention(queries: torch.Tensor, keys: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """float32 [query_heads, w, n]: the softmax weights of the ``w`` window queries over every held key.

    ``queries`` [query_heads, w, d] after RoPE are the last ``w`` held tokens' (the window's keys are the last
    ``w`` of ``keys`` [kv_heads, n, d], after RoPE); window query ``i`` sees keys ``0 .. n - w + i`` (causal
    within the window). Query head ``q`` reads key/value head ``q // (query_heads // kv_heads)``.
    ``scale`` defaults to ``1/sqrt(d)``.
    """
    heads, w, d = queries.shape
    kv_heads, n, _ = keys.shape
    if heads % kv_heads:
        raise ValueError(f"query heads ({heads}) must be a multiple of key/value heads ({kv_heads})")
    if w > n:
        raise ValueError(f"the window ({w} queries) must be among the {n} held keys")
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    work = torch.promote_types(queries.dtype, torch.float32)
    grouped = queries.to(work).reshape(kv_heads, heads // kv_heads, w, d)
    logits = torch.einsum("hgwd,hnd->hgwn", grouped, keys.to(work)).reshape(heads, w, n) * scale
    future = torch.arange(n, device=keys.device)[None, :] > (n - w + torch.arange(w, device=keys.device))[:, None]
    return torch.softmax(logits.masked_fill(future, float("-inf")), dim=-1)


def snapkv_scores(queries: torch.Tensor, keys: torch.Tensor, kernel_size: int = 5,
                  scale: float | None = None) -> torch.Tensor:
    """float32 [kv_heads, n]: SnapKV's score of every held key; the ``w`` window keys score ``+inf``.

    ``queries`` [query_heads, w, d]: the segment's last ``w`` queries after RoPE at their positions;
    ``keys`` [kv_heads, n, d] as held, after RoPE, the window's last. For each key before the window: its
    attention weight (``window_attention``) averaged over the ``w`` queries, average-pooled along the keys
    (kernel ``kernel_size``, stride 1, zero padding ``kernel_size // 2``, always divided by ``kernel_size``),
    then averaged over the query heads of its key/value head. ``+inf`` keeps the window through any top-B
    with ``B >= w`` (below that the tie rule keeps its newest keys).
    """
    w = queries.shape[1]
    check_snapkv(w, kernel_size, keys.shape[1])
    weights = window_attention(queries, keys, scale)[..., : keys.shape[1] - w].mean(dim=1)  # [heads, n - w]
    pooled = F.avg_pool1d(weights[:, None, :], kernel_size, stride=1, padding=kernel_size // 2,
                          count_include_pad=True)[:, 0]
    kv_heads = keys.shape[0]
    grouped = pooled.reshape(kv_heads, -1, pooled.shape[-1]).mean(dim=1)
    return F.pad(grouped, (0, w), value=float("inf"))
