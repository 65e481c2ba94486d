"""Key-norm: keep the keys of lowest L2 norm.

Devoto et al., *A Simple and Effective L2 Norm-Based Strategy for KV Cache Compression*, EMNLP 2024,
https://arxiv.org/abs/2406.11430
"""

from __future__ import annotations

from .base import BOTH, ScoredPolicy


class KeyNorm(ScoredPolicy):
    """Key-norm: keep the keys of lowest L2 norm (score ``-||k_j||``).

    Devoto et al., *A Simple and Effective L2 Norm-Based Strategy for KV Cache Compression*, EMNLP 2024,
    https://arxiv.org/abs/2406.11430
    """

    name = "knorm"
    reaches_budget = True
    paths = {"token": BOTH, "chunked": ("original",)}
    observes = frozenset()
    per_token = True

    def score(self, keys, values, attention):
        return -keys.float().norm(dim=-1)
