"""TOVA: keep the tokens the step's query attends to most, averaged over the layer's heads.

Oren et al., *Transformers are Multi-State RNNs*, 2024, https://arxiv.org/abs/2401.06104
"""

from __future__ import annotations

from .base import BOTH, ScoredPolicy
from .lazy_torch import F, torch


class TOVA(ScoredPolicy):
    """TOVA: keep the tokens this step's query attends to most, averaged over the layer's heads. Once after the
    context, the last prefill token's query decides and that token stays (kvpress's ``TOVAPress``).

    Oren et al., *Transformers are Multi-State RNNs*, 2024, https://arxiv.org/abs/2401.06104
    """

    name = "tova"
    reaches_budget = True
    paths = {"token": BOTH, "chunked": ("original",)}
    keeps_last_in_context_regime = True

    def score(self, keys, values, attention):
        return attention.mean(0)


def tova_scores(last_query: torch.Tensor, keys: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """float32 [kv_heads, n]: kvpress's ``TOVAPress`` scores in one function (what ``TOVA`` gives at the event of
    ``evict_every=context``), for comparing with kvpress's numbers.

    ``last_query`` [query_heads, 1, d]: the query of the last held token (after RoPE); ``keys`` [kv_heads, n, d]
    as held, that token's last. A key's score is its softmax weight from that query (over all ``n`` keys),
    averaged over every query head of the layer; the last token itself scores ``+inf`` (always kept).
    """
    from .snapkv import window_attention

    if last_query.dim() != 3 or last_query.shape[1] != 1:
        raise ValueError(f"last_query must be [query_heads, 1, head_dim]; got {tuple(last_query.shape)}")
    # The engine's two pieces, composed: the last query's weights (as the context regime recomputes them), TOVA's score.
    weights = TOVA.score(None, keys, None, window_attention(last_query, keys, scale)[:, 0])
    return F.pad(weights[:-1], (0, 1), value=float("inf")).expand(keys.shape[0], -1)
