"""KeyDiff: keep the tokens whose keys differ most from the layer's average key direction.

Park et al., *KeyDiff: Key Similarity-Based KV Cache Eviction for Long-Context LLM Inference in Resource-Constrained
Environments*, 2025, https://arxiv.org/abs/2504.15364
"""

from __future__ import annotations

from .base import BOTH, ScoredPolicy
from .lazy_torch import F


class KeyDiff(ScoredPolicy):
    """KeyDiff: a held key's score is minus its cosine similarity with the anchor, the mean of every held key of its
    head normalised (kvpress's ``KeyDiffPress``: the most typical keys go first). Every ``K`` tokens it is the paper's
    block-wise eviction with blocks of ``K``.

    Park et al., *KeyDiff: Key Similarity-Based KV Cache Eviction for Long-Context LLM Inference in
    Resource-Constrained Environments*, 2025, https://arxiv.org/abs/2504.15364
    """

    name = "keydiff"
    reaches_budget = True
    paths = {"token": BOTH, "chunked": ("original",)}
    observes = frozenset()

    def score(self, keys, values, attention):
        anchor = F.normalize(keys, p=2, dim=-1).mean(dim=1, keepdim=True)
        return -F.cosine_similarity(keys, anchor, dim=-1)
