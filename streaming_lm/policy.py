"""Eviction policies: which tokens a cache holds. The one place that decides what is visible.

Two kinds (docs/policies.md; the team's definitions: shared/docs/eviction-policies.md):

- **index-only** (``SinkWindow``): the held set is known from token indices alone;
- **scored** (``ScoredPolicy``: TOVA, H2O, key-norm, user plug-ins): after every step the protected
  tokens (the first ``S``, the last ``W``) stay and, once the cache is full, the held token with the
  lowest score goes (ties: the older). A scored policy only says how to score held tokens; the storage
  (storage/scored.py) applies the rule.

An index-only policy answers one question, ``held(n)``: the token indices a cache holds after reading
``n`` tokens (between steps). Everything else follows from it and is derived here, once:

- step ``t`` attends to ``held(t) ∪ {t}`` (``visible_mask``, for the chunked path's mask);
- after step ``t`` the cache keeps ``held(t + 1)`` (the dynamic storage's trim, the static storage's
  free slot: ``evicted_after``);
- ``method=recompute`` re-encodes ``held(end + 1)`` as the window that ends at ``end``.

``index_only`` policies decide from token indices alone, so the chunked path can serve them; a
policy that needs attention scores would set it False and run on the token loop only.
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod

import torch

from .positions import first_recent
from .settings import StreamingSettings

Runs = list[tuple[int, int]]  # ascending, disjoint half-open ranges [a, b) of token indices


class EvictionPolicy(ABC):
    """What a cache of ``capacity`` tokens keeps; implement ``held``."""

    name: str
    index_only: bool = True

    def __init__(self, settings: StreamingSettings):
        self.settings = settings
        self.capacity = settings.capacity

    @abstractmethod
    def held(self, n: int) -> Runs:
        """Token indices held after reading tokens ``0 .. n-1``: at most ``capacity`` of them, ascending."""

    def evicted_count(self, n: int) -> int:
        """Tokens evicted after reading ``n`` tokens: each token read is either held or was evicted once."""
        return n - sum(b - a for a, b in self.held(n))

    def held_index(self, n: int) -> torch.Tensor:
        """``held(n)`` as a tensor of token indices."""
        return torch.cat([torch.arange(a, b) for a, b in self.held(n)])

    def evicted_after(self, t: int) -> list[int]:
        """Tokens dropped after step ``t``: those of ``held(t) ∪ {t}`` not in ``held(t + 1)``."""
        dropped = []
        for a, b in [*self.held(t), (t, t + 1)]:
            for c, d in self.held(t + 1):  # cut every kept run out of [a, b), run by run
                if c > a:
                    dropped.extend(range(a, min(b, c)))
                a = max(a, d)
                if a >= b:
                    break
            dropped.extend(range(a, b))
        return dropped

    def visible_mask(self, queries: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        """bool [Q, K]: query token ``t`` sees key token ``j`` iff ``j ∈ held(t) ∪ {t}``."""
        runs = [self.held(int(t)) for t in queries]
        width = max(len(r) for r in runs)
        lo = torch.tensor([[a for a, _ in r] + [0] * (width - len(r)) for r in runs])
        hi = torch.tensor([[b for _, b in r] + [0] * (width - len(r)) for r in runs])
        k = keys[None, :, None]
        inside = ((k >= lo[:, None, :]) & (k < hi[:, None, :])).any(-1)
        return inside | (keys[None, :] == queries[:, None])


class SinkWindow(EvictionPolicy):
    """StreamingLLM: the first ``start_size`` tokens (attention sinks) and the last ``recent_size`` ones.

    Xiao et al., *Efficient Streaming Language Models with Attention Sinks*, ICLR 2024,
    https://arxiv.org/abs/2309.17453
    """

    name = "sink_window"

    def held(self, n: int) -> Runs:
        sinks = min(self.settings.start_size, n)
        return [(0, sinks), (min(first_recent(n, self.settings), n), n)]


class ScoredPolicy:
    """Evicts by a score; implement ``score`` (the shape of kvpress's ``ScorerPress.score``).

    Class attributes: ``needs_attention`` (``score`` reads this step's attention weights: the token loop
    then computes them in its own attention function), ``accumulate`` (a held token's score is the sum of
    its scores over every step since it was read, as H2O's). Whether heads decide alone follows from the
    shape ``score`` returns.
    """

    name = "scored"
    index_only = False
    needs_attention = True
    accumulate = False

    def __init__(self, settings: StreamingSettings):
        self.settings = settings
        self.capacity = settings.capacity

    def score(self, keys: torch.Tensor, values: torch.Tensor, attention: torch.Tensor | None) -> torch.Tensor:
        """Scores of the held tokens of one layer (low goes first): [kv_heads, K] (each key/value head evicts on its
        own), or [K] (the whole layer evicts one token).

        ``keys``/``values``: [kv_heads, K, head_dim] as held (this step's token last); ``attention``: float32
        [query_heads, K], this step's softmax weights (None unless ``needs_attention``). Query head ``q``
        reads key/value head ``q // (query_heads // kv_heads)``.
        """
        raise NotImplementedError


class TOVA(ScoredPolicy):
    """TOVA: keep the tokens this step's query attends to most, averaged over the layer's heads.

    Oren et al., *Transformers are Multi-State RNNs*, 2024, https://arxiv.org/abs/2401.06104
    """

    name = "tova"

    def score(self, keys, values, attention):
        return attention.mean(0)


class H2O(ScoredPolicy):
    """H2O: keep the heavy hitters, the tokens with the most attention accumulated while held.

    Zhang et al., *H2O: Heavy-Hitter Oracle for Efficient Generative Inference of Large Language Models*,
    NeurIPS 2023, https://arxiv.org/abs/2306.14048
    """

    name = "h2o"
    accumulate = True

    def score(self, keys, values, attention):
        group = attention.shape[0] // keys.shape[0]
        return attention.reshape(keys.shape[0], group, -1).sum(1)


class KeyNorm(ScoredPolicy):
    """Key-norm: keep the keys of lowest L2 norm (score ``-||k_j||``).

    Devoto et al., *A Simple and Effective L2 Norm-Based Strategy for KV Cache Compression*, EMNLP 2024,
    https://arxiv.org/abs/2406.11430
    """

    name = "knorm"
    needs_attention = False

    def score(self, keys, values, attention):
        return -keys.float().norm(dim=-1)


POLICIES = {cls.name: cls for cls in (SinkWindow, TOVA, H2O, KeyNorm)}


def policy_class(name: str) -> type:
    """The class a ``policy`` knob names: a built-in, or ``package.module:Class`` (a ``ScoredPolicy``).

    Called before any model loads, so a bad plug-in fails first."""
    if name in POLICIES:
        return POLICIES[name]
    module_name, _, class_name = name.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise ValueError(f"policy={name}: cannot import module {module_name!r} ({error})") from None
    cls = getattr(module, class_name, None)
    if cls is None:
        raise ValueError(f"policy={name}: module {module_name!r} has no attribute {class_name!r}")
    if not (isinstance(cls, type) and issubclass(cls, ScoredPolicy)) or cls.score is ScoredPolicy.score:
        raise ValueError(
            f"policy={name}: {class_name} must subclass streaming_lm.policy.ScoredPolicy and implement "
            "score(keys, values, attention) (see docs/policies.md)"
        )
    return cls


def policy_for(settings: StreamingSettings) -> EvictionPolicy | ScoredPolicy:
    """The policy the settings name."""
    return policy_class(settings.policy)(settings)
