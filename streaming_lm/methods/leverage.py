"""Leverage: keep the tokens whose keys (before RoPE) are statistical outliers, by approximate leverage scores.

Chari and Van Durme, *Compactor: Calibrated Query-Agnostic KV Cache Compression with Approximate Leverage Scores*,
2025, https://arxiv.org/abs/2507.08143
"""

from __future__ import annotations

import math

from .base import ScoredPolicy, check_context_regime
from .lazy_torch import torch
from .params import Param
from .prerope import before_rope, bind_rotary

# Why Leverage and Compactor are defined once after the context only (check_context_regime's reason)
PRE_ROPE = "scores the prefill's keys before RoPE, each at its text position,"


class Leverage(ScoredPolicy):
    """Leverage (kvpress's ``LeverageScorePress``): the held keys before RoPE, centred over the held tokens, sketched
    on the right by a Gaussian ``[head_dim, sketch_dimension]`` matrix (scaled by ``1/sqrt(sketch_dimension)``), and
    each token's leverage ``x (XᵀX)⁻¹ xᵀ`` (by Cholesky, with kvpress's jitter); z-scored over every head and token of
    the layer. The sketch is drawn at each layer's event from a generator seeded with ``seed`` (kvpress draws it
    unseeded; seeded, its numbers are these). Once after the context only.

    Chari and Van Durme, *Compactor: Calibrated Query-Agnostic KV Cache Compression with Approximate Leverage
    Scores*, 2025, https://arxiv.org/abs/2507.08143
    """

    name = "leverage"
    reaches_budget = True
    params = (Param("sketch_dimension", int, 48, "the width of the Gaussian sketch", minimum=1),
              Param("seed", int, 0, "the sketch's seed, drawn from at each layer's event", minimum=0))
    paths = {"token": ("original",), "chunked": ("original",)}
    observes = frozenset({"prerope_keys"})

    @classmethod
    def check_settings(cls, settings) -> None:
        check_context_regime(cls, settings, PRE_ROPE)

    def bind(self, model, shift) -> None:
        self.rotary, self.attention_scaling = bind_rotary(self.name, model, shift)

    def keys_before_rope(self, keys: torch.Tensor, recorded: torch.Tensor | None) -> torch.Tensor:
        """The held keys before RoPE: as the model's projection wrote them (``recorded``, kvpress's numbers), or,
        where it is fused, rotated back from the prefill's positions 0 .. n - 1 (equal up to float rounding)."""
        if recorded is not None:
            return recorded
        return before_rope(self.rotary, self.attention_scaling, keys, torch.arange(keys.shape[1], device=keys.device))

    def score(self, keys, values, attention, prerope_keys):
        return zscore(leverage_scores(self.keys_before_rope(keys, prerope_keys), self.sketch_dimension, self.seed))


def _cholesky_with_jitter(gram: torch.Tensor, jitter: float = 1e-2, tries: int = 5) -> torch.Tensor:
    """kvpress's ``chol_with_jitter``: the lower Cholesky factor of ``gram + jitter·I``, the jitter raised tenfold
    until it exists."""
    identity = torch.eye(gram.shape[-1], device=gram.device, dtype=gram.dtype)
    for _ in range(tries):
        factor, info = torch.linalg.cholesky_ex(gram + jitter * identity, upper=False)
        if bool((info == 0).all()):
            return factor
        jitter = max(1e-8, 1e-2 if jitter == 0.0 else 10.0 * jitter)
    raise RuntimeError(f"leverage: the sketched Gram matrix has no Cholesky factor after {tries} jitters")


def leverage_scores(keys: torch.Tensor, sketch_dimension: int = 48, seed: int = 0) -> torch.Tensor:
    """float32 [kv_heads, n]: the approximate leverage of each key of ``keys`` [kv_heads, n, d] (before RoPE), as
    kvpress's ``compute_leverage_scores`` (clamped at 0), its Gaussian sketch ``[kv_heads, d, k]`` seeded."""
    generator = torch.Generator(device=keys.device).manual_seed(seed)
    sketch = torch.randn(keys.shape[0], keys.shape[-1], sketch_dimension, generator=generator, device=keys.device,
                         dtype=keys.dtype) * (1 / math.sqrt(sketch_dimension))
    x = torch.matmul(keys - keys.mean(dim=-2, keepdim=True), sketch).float()  # [heads, n, k]
    gram = x.transpose(-2, -1) @ x
    factor = _cholesky_with_jitter(0.5 * (gram + gram.transpose(-2, -1)))
    solved = torch.cholesky_solve(x.transpose(-2, -1), factor, upper=False)  # (XᵀX)⁻¹ Xᵀ
    return (x * solved.transpose(-2, -1)).sum(dim=-1).clamp_min(0)


def zscore(scores: torch.Tensor) -> torch.Tensor:
    """Scores standardised over the whole layer (every head and token at once, as kvpress's)."""
    return (scores - scores.mean()) / scores.std().clamp_min(1e-6)
