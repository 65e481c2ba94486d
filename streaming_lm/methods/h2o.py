"""H2O: keep the heavy hitters, the tokens with the most attention accumulated while held.

Zhang et al., *H2O: Heavy-Hitter Oracle for Efficient Generative Inference of Large Language Models*,
NeurIPS 2023, https://arxiv.org/abs/2306.14048
"""

from __future__ import annotations

from .base import BOTH, ScoredPolicy


class H2O(ScoredPolicy):
    """H2O: keep the heavy hitters, the tokens with the most attention accumulated while held (each key/value head
    sums its query heads' weights).

    Zhang et al., *H2O: Heavy-Hitter Oracle for Efficient Generative Inference of Large Language Models*,
    NeurIPS 2023, https://arxiv.org/abs/2306.14048
    """

    name = "h2o"
    reaches_budget = True
    paths = {"token": BOTH, "chunked": ("original",)}
    observes = frozenset({"attention", "history"})

    def score(self, keys, values, attention):
        group = attention.shape[0] // keys.shape[0]
        return attention.reshape(keys.shape[0], group, -1).sum(1)
