"""CUR (CurDKV): keep the tokens whose keys and values carry the most leverage.

Sengupta et al., *Value-Guided KV Compression for LLMs via Approximated CUR Decomposition*, 2025,
https://arxiv.org/abs/2509.15038
"""

from __future__ import annotations

import math

from .base import BOTH, ScoredPolicy
from .lazy_torch import F, torch
from .params import Param

LEVERAGE_TYPES = ("key", "value", "kv_avg", "kv_product")
SKETCH = 20  # the random projection's width (kvpress's r)


class CUR(ScoredPolicy):
    """CUR (kvpress's ``CURPress``): a held token's leverage is its squared key norm (and value norm), normalised
    within blocks of ``local_window_size`` held tokens (``use_local_approximation``), combined by ``leverage_type``
    and normalised over the held tokens; the first ``num_sinks`` held tokens score 1, the most. With
    ``use_random_leverage`` keys and values are first projected by a random Gaussian matrix of width 20, drawn here
    from a generator seeded with ``seed`` at each event (kvpress draws it unseeded, so its runs differ).

    Sengupta et al., *Value-Guided KV Compression for LLMs via Approximated CUR Decomposition*, 2025,
    https://arxiv.org/abs/2509.15038
    """

    name = "cur"
    reaches_budget = True
    params = (Param("num_sinks", int, 4, "first held tokens that always score the most", minimum=0),
              Param("leverage_type", str, "kv_product", "how key and value leverage combine", choices=LEVERAGE_TYPES),
              Param("use_random_leverage", bool, False, "project keys and values by a seeded random sketch first"),
              Param("use_local_approximation", bool, True, "normalise the leverage within local windows"),
              Param("local_window_size", int, 16, "the local window, in held tokens", minimum=1),
              Param("seed", int, 0, "the random sketch's seed (use_random_leverage)", minimum=0))
    paths = {"token": BOTH, "chunked": ("original",)}
    observes = frozenset()

    def score(self, keys, values, attention):
        return cur_scores(keys, values, self.num_sinks, self.leverage_type, self.use_random_leverage,
                          self.use_local_approximation, self.local_window_size, self.seed)


def _local(x: torch.Tensor, w: int) -> torch.Tensor:
    """Each row of ``x`` [heads, n] normalised within consecutive windows of ``w`` (the last one padded by zeros)."""
    n = x.shape[-1]
    blocks = F.pad(x, (0, (w - n % w) % w)).reshape(x.shape[0], -1, w)
    return (blocks / blocks.sum(dim=-1, keepdim=True)).reshape(x.shape[0], -1)[:, :n]


def cur_scores(keys: torch.Tensor, values: torch.Tensor, num_sinks: int = 4, leverage_type: str = "kv_product",
               use_random_leverage: bool = False, use_local_approximation: bool = True, local_window_size: int = 16,
               seed: int = 0) -> torch.Tensor:
    """[kv_heads, n] in the keys' dtype: kvpress's ``CURPress.score`` of the held ``keys``, ``values`` [kv_heads, n,
    d], without its batch dimension (the random sketch seeded)."""
    if use_random_leverage:
        generator = torch.Generator(device=keys.device).manual_seed(seed)
        sketch = torch.randn(keys.shape[-1], SKETCH, generator=generator, device=keys.device,
                             dtype=keys.dtype) / math.sqrt(SKETCH)
        keys, values = keys @ sketch, values @ sketch
    k2, v2 = (keys**2).sum(dim=-1), (values**2).sum(dim=-1)
    if use_local_approximation:
        k2, v2 = _local(k2, local_window_size), _local(v2, local_window_size)
    scores = {"key": k2, "value": v2, "kv_avg": (k2 + v2) / 2, "kv_product": k2 * v2}[leverage_type]
    scores = scores / scores.sum(dim=-1, keepdim=True)
    scores[:, :num_sinks] = 1.0
    return scores
