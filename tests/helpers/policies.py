"""Plug-in policies for the tests, declared as a user's would be (docs/policies.md): a ``ScoredPolicy`` with a
``score`` and, here, parameters of its own."""

from __future__ import annotations

import torch

from streaming_lm.policy import ExpectedAttention, Param, ScoredPolicy


def _not_zero(value: float) -> None:
    if value == 0:
        raise ValueError("step must not be 0")


class Recency(ScoredPolicy):
    """Scores by age: ``step * (position among the held tokens)``. ``step > 0`` evicts the oldest unprotected
    token (a sink+window cache of W + H), ``step < 0`` the newest one."""

    name = "recency"
    needs_attention = False
    params = (Param("step", float, 1.0, "score per slot of age (> 0: the oldest goes; < 0: the newest)",
                    check=_not_zero),
              Param("label", str, "plain", "a string parameter", choices=("plain", "fancy")))

    def score(self, keys, values, attention):
        return self.step * torch.arange(keys.shape[1], dtype=torch.float32)


class QueryAffinity(ScoredPolicy):
    """Scores at an event from the segment's observation: a held key's mean dot product with the segment's queries
    (those of its key/value head), the shape of SnapKV's and Expected Attention's scores. It checks that it is
    handed exactly the segment: as many queries as tokens read since the last event."""

    name = "query_affinity"
    needs_attention = False
    needs_queries = True
    paths = {"token": ("shifted", "original"), "chunked": ("original",)}

    def score(self, keys, values, attention, queries):
        if queries.shape[1] != self.settings.evict_every:
            raise AssertionError(f"an event got {queries.shape[1]} queries, not the segment's {self.settings.evict_every}")
        kv_heads = keys.shape[0]
        grouped = queries.reshape(kv_heads, -1, queries.shape[-1])  # [kv_heads, group * s, dim]
        return (grouped @ keys.float().transpose(-1, -2)).mean(1)  # [kv_heads, K]


class RecordingExpectedAttention(ExpectedAttention):
    """Expected Attention that records, at every event, the queries before RoPE it scored with (one entry per
    layer and event, in the order layers run)."""

    name = "recording_expected_attention"
    seen: list = []

    def score(self, keys, values, attention, queries, step):
        index = torch.arange(step - queries.shape[1] + 1, step + 1)
        type(self).seen.append((step, self.before_rope(queries, index)))
        return super().score(keys, values, attention, queries, step)
