"""How many tokens each layer (PyramidKV) and each key/value head (AdaKV) keeps at an event.

PyramidKV: Cai et al., *PyramidKV: Dynamic KV Cache Compression based on Pyramidal Information Funneling*,
2024, https://arxiv.org/abs/2406.02069. AdaKV: Feng et al., *Ada-KV: Optimizing KV Cache Eviction by
Adaptive Budget Allocation for Efficient LLM Inference*, 2024, https://arxiv.org/abs/2407.11550.
"""

from __future__ import annotations

import torch

from .checks import check_fraction, check_int, check_pyramid
from .ties import evict_lowest, keep_top


def kept_count(n: int, ratio: float) -> int:
    """Tokens a layer keeps of the ``n`` it holds under ``compression_ratio = ratio``: ``int(n·(1 − r))``,
    at least 1 (kvpress's ``compute_n_kept``: a short context never empties the cache)."""
    check_fraction("compression_ratio", ratio, upper_open=True)
    return max(1, int(check_int("n", n, 1) * (1 - ratio)))


def pyramid_layer_budgets(n: int, layers: int, *, ratio: float | None = None, budget: int | None = None,
                          window_size: int = 64, beta: float = 20) -> list[int]:
    """The tokens each of ``layers`` layers keeps (layer 0 first, the most): PyramidKV's arithmetic pyramid.

    Give ``ratio`` (then ``n`` is the tokens held and the mean budget ``n·(1 − r)``) or ``budget`` = C (then
    ``n`` is the tokens read so far and the mean budget C). With ``M = w + mean``: ``min = (M − w)/β``,
    ``max = 2(M − w) − min``; if ``max ≥ n − w``: ``max = n − w`` and ``min = 2(M − w) − max``. Unless
    ``n ≥ max ≥ min ≥ w`` every layer keeps ``max(1, round(mean))`` (SnapKV's uniform budget); otherwise layer
    ``l`` keeps ``round(max − l·(max − min)/(L − 1))``. ``round`` is Python's (halves to even), as kvpress's.
    A layer keeps ``min(held, budget)``.
    """
    check_int("n", n, 1)
    check_int("layers", layers, 1)
    check_pyramid(window_size, beta)
    if (ratio is None) == (budget is None):
        raise ValueError(f"layer_budgets=pyramid needs either compression_ratio or a token budget, not both or "
                         f"neither (got ratio={ratio!r}, budget={budget!r})")
    mean = n * (1 - check_fraction("compression_ratio", ratio, upper_open=True)) if budget is None \
        else check_int("budget", budget, 1)
    top = window_size + mean
    low = (top - window_size) / beta
    high = (top - window_size) * 2 - low
    if high >= n - window_size:
        high = n - window_size
        low = (top - window_size) * 2 - high
    if not (n >= high >= low >= window_size):
        return [max(1, round(mean))] * layers
    step = (high - low) / (layers - 1) if layers > 1 else 0.0
    return [round(high - layer * step) for layer in range(layers)]


def uniform_keep(scores: torch.Tensor, budget: int) -> torch.Tensor:
    """bool [heads, n]: every head keeps its ``budget`` best-scored tokens (ties: the oldest goes)."""
    return keep_top(scores, budget)


def adaptive_head_keep(scores: torch.Tensor, budget: int, alpha_safeguard: float = 0.2
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """AdaKV: (bool keep [heads, n], long kept per head [heads]) for ``budget`` = B kept per head on average.

    Each head's ``int(B·α)`` best tokens (at least one when ``α > 0``, as kvpress) are safe; then the
    ``heads·(n − B)`` lowest (head, token) scores of the whole layer go, one by one by the tie rule (the older
    token first, then the lower head). ``scores`` [heads, n], ``+inf`` for tokens the method always keeps.
    """
    alpha = check_fraction("alpha_safeguard", alpha_safeguard)
    check_int("budget", budget, 0)
    heads, n = scores.shape
    if budget >= n:
        keep = torch.ones_like(scores, dtype=torch.bool)
        return keep, keep.sum(1)
    safe = int(budget * alpha)
    if alpha > 0 and budget > 0:
        safe = max(1, safe)
    guarded = scores.float().masked_fill(keep_top(scores, safe), float("inf")) if safe else scores.float()
    # One row for the layer, token-major (token 0 of every head, then token 1, ...): the older token goes first.
    flat = evict_lowest(guarded.T.reshape(1, -1), heads * (n - budget))
    keep = flat.reshape(n, heads).T.contiguous()
    return keep, keep.sum(1)
