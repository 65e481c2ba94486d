"""SnapKV: keys the last queries of the segment (the observation window) attend to are kept; with
``layer_budgets=pyramid`` it is PyramidKV, with ``head_budgets=adaptive`` AdaKV (methods/budgets.py).

Li et al., *SnapKV: LLM Knows What You are Looking for Before Generation*, 2024, https://arxiv.org/abs/2404.14469
"""

from __future__ import annotations

import math

from ..values import as_count, as_odd
from .base import Param, ScoredPolicy
from .lazy_torch import F, torch
from .budgets import HEAD_BUDGETS, LAYER_BUDGETS, check_head_budgets, check_layer_budgets, pyramid_layer_budgets


class SnapKV(ScoredPolicy):
    """SnapKV: at an event the segment's last ``window_size`` queries (the observation window) vote for the held
    keys; the votes are pooled over neighbouring keys (``kernel_size``) and the window's own keys always stay
    (docs/methods.md). The segment must be longer than the window: ``evict_every > window_size``. With
    ``layer_budgets=pyramid`` this is PyramidKV.

    Li et al., *SnapKV: LLM Knows What You are Looking for Before Generation*, 2024,
    https://arxiv.org/abs/2404.14469
    """

    name = "snapkv"
    reaches_budget = True
    params = (Param("window_size", int, 64, "the observation window: the segment's last queries that score",
                    minimum=1),
              Param("kernel_size", int, 5, "average pooling of the scores over neighbouring keys (odd)", minimum=1,
                    check=lambda value: as_odd("kernel_size", value)),
              *LAYER_BUDGETS, *HEAD_BUDGETS)
    paths = {"token": ("shifted", "original"), "chunked": ("original",)}
    observes = frozenset({"queries", "scale"})

    @classmethod
    def check_settings(cls, settings) -> None:
        window = settings.policy_params["window_size"]
        if not settings.context_regime and settings.evict_every <= window:  # once: checked against each request's prefill
            raise ValueError(
                f"policy=snapkv observes the last window_size={window} queries of each segment of evict_every="
                f"{settings.evict_every} tokens: the window must be shorter than the segment (evict_every > "
                f"window_size; lower window_size or raise evict_every)"
            )
        check_layer_budgets(settings, window)
        check_head_budgets(settings)
        cls.check_kept_always(settings, window)

    @staticmethod
    def check_kept_always(settings, window: int) -> None:
        """An event never evicts the sinks, the recent window or SnapKV's observation window (the last
        ``window_size`` tokens): a token budget must hold them in every layer (else an event could not reach it)."""
        if settings.ratio_budget:
            return
        params = settings.policy_params
        always = settings.start_size + max(settings.recent_size, window)
        smallest = settings.capacity
        where = f"C = {smallest}"
        if params["layer_budgets"] == "pyramid":
            smallest = settings.capacity / params["beta"]
            where = f"its smallest layer budget C / beta = {smallest:g} (layer_budgets=pyramid, beta={params['beta']:g})"
        if always > smallest:
            raise ValueError(
                f"policy=snapkv keeps start_size + max(recent_size, window_size) = {always} tokens at every event (the "
                f"sinks, then the recent or observation window, whichever is longer), more than {where}: raise "
                f"heavy_size, or lower start_size, recent_size, window_size or beta")

    def layer_capacity(self, layer, layers, n):
        if self.layer_budgets == "uniform":
            return self.budget(n)
        mean = {"ratio": self.settings.compression_ratio} if self.settings.ratio_budget else {"budget": self.capacity}
        return pyramid_layer_budgets(n, layers, window_size=self.window_size, beta=self.beta, **mean)[layer]

    @property
    def query_window(self):
        return self.window_size

    def score(self, keys, values, attention, queries, scale):
        if keys.shape[1] <= self.window_size:
            raise ValueError(f"policy=snapkv: an event holds {keys.shape[1]} tokens, not more than window_size="
                             f"{self.window_size}: the observation window must be shorter than what it scores "
                             f"(lower window_size or give a longer context)")
        # The model's own attention scaling (kvpress's is always 1/sqrt(d): the same on most models; docs/methods.md)
        return snapkv_scores(queries[:, -self.window_size:], keys, self.kernel_size, scale)


def check_snapkv(window_size, kernel_size, segment_length: int | None = None) -> None:
    """SnapKV's knobs: ``window_size >= 1``, an odd ``kernel_size >= 1`` (the pooling keeps the length only for
    odd kernels; kvpress fails on even ones), and a segment longer than the window."""
    as_count("window_size", window_size, 1)
    as_odd("kernel_size", as_count("kernel_size", kernel_size, 1))
    if segment_length is not None and segment_length <= window_size:
        raise ValueError(f"window_size must be smaller than the segment it observes: window_size={window_size}, "
                         f"segment of {segment_length} tokens (lower window_size or use longer segments)")


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
    # Each key/value head's query heads as rows of one matmul (no copies of the keys per query head), in place.
    grouped = queries.to(work).reshape(kv_heads, heads // kv_heads * w, d)
    logits = torch.matmul(grouped, keys.to(work).transpose(1, 2)).reshape(heads, w, n).mul_(scale)
    future = torch.arange(n, device=keys.device)[None, :] > (n - w + torch.arange(w, device=keys.device))[:, None]
    return torch.softmax(logits.masked_fill_(future, float("-inf")), dim=-1)


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
