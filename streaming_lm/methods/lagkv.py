"""LagKV: score each token by how its key and value stand out against the next partition of the sequence.

Liang et al., *LagKV: Lag-Relative Information of the KV Cache Tells Which Tokens Are Important*, 2025,
https://arxiv.org/abs/2504.04704
"""

from __future__ import annotations

from .base import BOTH, ScoredPolicy
from .lazy_torch import torch
from .params import Param


class LagKV(ScoredPolicy):
    """LagKV (kvpress's ``LagKVPress``): after the first ``n_sink`` held tokens, the held sequence is cut into
    partitions of ``lag_size``; a token's key (and value) is min-max normalised by the *next* partition's range per
    feature, and the standard deviation over features, softmaxed within its partition, is its score (key and value
    averaged); without ``cross_scoring`` a token then scores its rank within its partition over ``lag_size``. The sinks
    and the last partition (and the tail that fills no partition) score 1, the most. Fewer held tokens than
    ``n_sink + 2 * lag_size``: the older non-sink tokens go first (kvpress's ramp). Ranks tie across partitions: the
    tie rule (the older goes) decides among them where kvpress's ``topk`` order does.

    Liang et al., *LagKV: Lag-Relative Information of the KV Cache Tells Which Tokens Are Important*, 2025,
    https://arxiv.org/abs/2504.04704
    """

    name = "lagkv"
    reaches_budget = True
    params = (Param("n_sink", int, 4, "first held tokens that always score the most", minimum=0),
              Param("lag_size", int, 128, "the partition length: a partition is scored against the next one",
                    minimum=1),
              Param("cross_scoring", bool, False, "keep the normalised scores across partitions instead of ranks"))
    paths = {"token": BOTH, "chunked": ("original",)}
    observes = frozenset()

    def score(self, keys, values, attention):
        return lagkv_scores(keys, values, self.n_sink, self.lag_size, self.cross_scoring)


def _partition_scores(states: torch.Tensor, lag_size: int) -> torch.Tensor:
    """[heads, partitions - 1, lag_size]: each partition but the last normalised by the next one's range."""
    ref, own = states[:, 1:], states[:, :-1]
    low = ref.min(dim=-2, keepdim=True).values
    high = ref.max(dim=-2, keepdim=True).values
    return ((own - low) / (high - low)).std(dim=-1).softmax(dim=-1)


def lagkv_scores(keys: torch.Tensor, values: torch.Tensor, n_sink: int = 4, lag_size: int = 128,
                 cross_scoring: bool = False) -> torch.Tensor:
    """[kv_heads, n] in the keys' dtype: LagKV's score of each held token (``keys``, ``values`` [kv_heads, n, d]),
    kvpress's ``LagKVPress.score`` without its batch dimension."""
    heads, n, d = keys.shape
    if n < n_sink + 2 * lag_size:
        score = torch.ones((heads, n), dtype=keys.dtype, device=keys.device)
        if n > n_sink:  # the sliding part: the newer, the more
            score[:, n_sink:] = (torch.arange(n - n_sink, device=keys.device) / (n - n_sink)).to(keys.dtype)
        return score
    end = n_sink + ((n - n_sink) // lag_size) * lag_size
    tail = lag_size + n - end
    partitioned = [x[:, n_sink:end].reshape(heads, -1, lag_size, d) for x in (keys, values)]
    score = (_partition_scores(partitioned[0], lag_size) + _partition_scores(partitioned[1], lag_size)) / 2
    if not cross_scoring:
        score = (score.argsort(dim=-1).argsort(dim=-1) / lag_size).to(keys.dtype)
    ones = torch.ones((heads, n_sink), dtype=score.dtype, device=score.device)
    return torch.cat((ones, score.reshape(heads, -1), torch.ones((heads, tail), dtype=score.dtype,
                                                                  device=score.device)), dim=-1)
