"""How many tokens each layer and key/value head keeps at an event: kvpress's ``int(n·(1 − r))``, PyramidKV's budgets
by layer and AdaKV's by head, and the parameters that choose them (declared by the methods they apply to).

PyramidKV: Cai et al., *PyramidKV: Dynamic KV Cache Compression based on Pyramidal Information Funneling*,
2024, https://arxiv.org/abs/2406.02069. AdaKV: Feng et al., *Ada-KV: Optimizing KV Cache Eviction by
Adaptive Budget Allocation for Efficient LLM Inference*, 2024, https://arxiv.org/abs/2407.11550.
"""

from __future__ import annotations

from ..values import as_count, as_float, as_fraction
from .lazy_torch import torch
from .params import Param
from .ties import evict_lowest, keep_top


def kept_count(n: int, ratio: float) -> int:
    """Tokens a layer keeps of the ``n`` it holds under ``compression_ratio = ratio``: ``int(n·(1 − r))``,
    at least 1 (kvpress's ``compute_n_kept``: a short context never empties the cache)."""
    ratio = as_fraction("compression_ratio", ratio, upper_open=True)
    return max(1, int(as_count("n", n, 1) * (1 - ratio)))


def check_pyramid(window_size, beta) -> None:
    """PyramidKV's knobs: ``window_size >= 1`` and ``beta >= 1`` (the pyramid's steepness, as kvpress)."""
    as_count("window_size", window_size, 1)
    as_float("beta", beta, 1)


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
    as_count("n", n, 1)
    as_count("layers", layers, 1)
    check_pyramid(window_size, beta)
    if (ratio is None) == (budget is None):
        raise ValueError(f"layer_budgets=pyramid needs either compression_ratio or a token budget, not both or "
                         f"neither (got ratio={ratio!r}, budget={budget!r})")
    mean = n * (1 - as_fraction("compression_ratio", ratio, upper_open=True)) if budget is None \
        else as_count("budget", budget, 1)
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


def safeguard_count(budget: int, alpha_safeguard: float) -> int:
    """AdaKV's safeguard: each head's ``int(B·α)`` best tokens are safe, at least one when ``α > 0`` (kvpress)."""
    safe = int(budget * alpha_safeguard)
    return max(1, safe) if alpha_safeguard > 0 and budget > 0 else safe


def adaptive_head_keep(scores: torch.Tensor, budget: int, alpha_safeguard: float = 0.2
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """AdaKV: (bool keep [heads, n], long kept per head [heads]) for ``budget`` = B kept per head on average.

    Each head's ``int(B·α)`` best tokens (at least one when ``α > 0``, as kvpress) are safe; then the
    ``heads·(n − B)`` lowest (head, token) scores of the whole layer go, one by one by the tie rule (the older
    token first, then the lower head). ``scores`` [heads, n], ``+inf`` for tokens the method always keeps.
    """
    alpha = as_fraction("alpha_safeguard", alpha_safeguard)
    as_count("budget", budget, 0)
    heads, n = scores.shape
    if budget >= n:
        keep = torch.ones_like(scores, dtype=torch.bool)
        return keep, keep.sum(1)
    safe = safeguard_count(budget, alpha)
    guarded = scores.float().masked_fill(keep_top(scores, safe), float("inf")) if safe else scores.float()
    # One row for the layer, token-major (token 0 of every head, then token 1, ...): the older token goes first.
    flat = evict_lowest(guarded.T.reshape(1, -1), heads * (n - budget))
    keep = flat.reshape(n, heads).T.contiguous()
    return keep, keep.sum(1)


# Budgets across layers, declared by the methods they apply to (those with an observation window): model args like
# the method's own parameters, written with them in config.streaming.policy_params.
LAYER_BUDGETS = (
    Param("layer_budgets", str, "uniform", "uniform: every layer keeps C; pyramid: PyramidKV's arithmetic pyramid "
          "of per-layer budgets averaging C (the first layers keep the most)", choices=("uniform", "pyramid")),
    Param("beta", float, 20.0, "layer_budgets=pyramid: the pyramid's steepness (its smallest layer budget is "
          "C / beta)", minimum=1.0),
)

# Budgets across the key/value heads of a layer, declared by the per-head methods they apply to (a method deciding
# per layer, as TOVA, does not declare them: its heads hold the same tokens).
HEAD_BUDGETS = (
    Param("head_budgets", str, "uniform", "uniform: every key/value head keeps C; adaptive: AdaKV, the heads of a "
          "layer keep C on average, the layer's lowest (head, token) scores going first", choices=("uniform",
                                                                                                    "adaptive")),
    Param("alpha_safeguard", float, 0.2, "head_budgets=adaptive: each head's int(C * alpha) best tokens are safe",
          minimum=0.0, check=lambda value: as_fraction("alpha_safeguard", value)),
)


def check_head_budgets(settings) -> None:
    """``head_budgets=adaptive``: heads hold different counts in a padded layout that the attention functions mask;
    original positions only (a shifted query's position, the count of tokens held, would differ by head)."""
    if settings.policy_params["head_budgets"] != "adaptive" or settings.context_regime:  # once: original, any method
        return
    if settings.positions == "shifted":
        raise ValueError("head_budgets=adaptive needs positions=original (heads hold different counts, so a shifted "
                         "position would differ by head); got positions=shifted")


def check_layer_budgets(settings, window: int) -> None:
    """``layer_budgets=pyramid`` must be able to split ``C``: its smallest layer budget ``C / beta`` reaches the
    window (else PyramidKV's rule falls back to uniform budgets at every event, a pyramid that never is); that it
    holds the tokens an event never evicts is ``SnapKV.check_kept_always``."""
    params = settings.policy_params
    if params["layer_budgets"] != "pyramid" or settings.ratio_budget:  # a ratio: kvpress's own rule at each event
        return
    if settings.positions == "shifted":
        raise ValueError("layer_budgets=pyramid needs positions=original: with shifted positions a query's position "
                         "is the count of tokens held, which then differs by layer")
    low = settings.capacity / params["beta"]
    if low < window:
        raise ValueError(
            f"layer_budgets=pyramid cannot split C={settings.capacity} tokens: its smallest layer budget C / beta = "
            f"{low:g} (beta={params['beta']:g}) is below window_size={window}; it needs C >= beta * window_size = "
            f"{params['beta'] * window:g} (raise heavy_size, lower beta or window_size)"
        )


def lowest_cells_keep(scores: torch.Tensor, evict: int, per_layer: bool = False) -> torch.Tensor:
    """bool [layers, heads, n]: what is left of ``scores`` [layers, heads, n] after the ``evict`` lowest (layer, head,
    token) cells of the whole model go (``per_layer``: ``evict`` of each layer), one by one by the tie rule: the older
    token first, then the lower layer, then the lower head (KVzip's budget). ``+inf`` cells go last."""
    layers, heads, n = scores.shape
    if per_layer:
        rows = scores.float().permute(0, 2, 1).reshape(layers, n * heads)  # each layer token-major
        return evict_lowest(rows, min(evict, n * heads)).reshape(layers, n, heads).permute(0, 2, 1)
    row = scores.float().permute(2, 0, 1).reshape(1, -1)  # the model token-major: token, then layer, then head
    return evict_lowest(row, min(evict, row.shape[1])).reshape(n, layers, heads).permute(1, 2, 0)
