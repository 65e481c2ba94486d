"""TOVA once after the context: the segment's last query decides, averaged over all query heads.

Oren et al., *Transformers are Multi-State RNNs*, 2024, https://arxiv.org/abs/2401.06104
(the every-token rule is ``policy.TOVA``; this is kvpress's ``TOVAPress`` at a single event).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .snapkv import window_attention


def tova_scores(last_query: torch.Tensor, keys: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """float32 [kv_heads, n]: TOVA's score of every held key, the same for every key/value head.

    ``last_query`` [query_heads, 1, d]: the query of the last held token (after RoPE); ``keys`` [kv_heads, n, d]
    as held, that token's last. A key's score is its softmax weight from that query (over all ``n`` keys),
    averaged over every query head of the layer; the last token itself scores ``+inf`` (always kept).
    """
    if last_query.dim() != 3 or last_query.shape[1] != 1:
        raise ValueError(f"last_query must be [query_heads, 1, head_dim]; got {tuple(last_query.shape)}")
    weights = window_attention(last_query, keys, scale)[:, 0, :-1].mean(dim=0)
    return F.pad(weights, (0, 1), value=float("inf")).expand(keys.shape[0], -1)
