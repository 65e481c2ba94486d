"""Random: evict held tokens at random, the baseline every compression method is compared with (kvpress's
``RandomPress``)."""

from __future__ import annotations

from .base import BOTH, ScoredPolicy
from .lazy_torch import torch
from .params import Param


class Random(ScoredPolicy):
    """Random scores, drawn at each layer's event from a generator seeded with ``seed``: kvpress's ``RandomPress``
    with the same ``seed`` gives the same draws (``torch.rand`` over ``[kv_heads, K]`` in the keys' dtype); kvpress's
    default is unseeded, ours ``seed=0``, so that a run can be repeated.

    The baseline of kvpress's leaderboard, https://github.com/NVIDIA/kvpress (no paper).
    """

    name = "random"
    reaches_budget = True
    params = (Param("seed", int, 0, "the seed of the generator drawn from at each layer's event", minimum=0),)
    paths = {"token": BOTH, "chunked": ("original",)}
    observes = frozenset()

    def score(self, keys, values, attention):
        generator = torch.Generator(device=keys.device)
        generator.manual_seed(self.seed)
        return torch.rand(*keys.shape[:-1], generator=generator, device=keys.device, dtype=keys.dtype)
