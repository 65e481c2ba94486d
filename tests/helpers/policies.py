"""The tests' table of policy cases (``CASES``), and plug-in policies declared as a user's would be
(docs/policies.md): a ``ScoredPolicy`` with a ``score`` and, here, parameters of its own."""

from __future__ import annotations

import pytest
import torch

from streaming_lm.methods import ExpectedAttention, Param, ScoredPolicy


def _not_zero(value: float) -> None:
    if value == 0:
        raise ValueError("step must not be 0")


class Recency(ScoredPolicy):
    """Scores by age: ``step * (position among the held tokens)``. ``step > 0`` evicts the oldest unprotected
    token (a sink+window cache of W + H), ``step < 0`` the newest one."""

    name = "recency"
    observes = frozenset()
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
    observes = frozenset({"queries"})
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
        type(self).seen.append((step, self.before_rope(queries, step)[0]))
        return super().score(keys, values, attention, queries, step)


# The one table of policy cases (tests/test_schedule.py parametrises every path, schedule and position mode over it,
# each position mode where the settings serve the case).
# policy, its parameters, budgets (start, recent, heavy), evict_every
CASES = [
    pytest.param("sink_window", {}, (2, 6, 0), 4, id="sink_window-K4"),
    pytest.param("sink_window", {}, (0, 5, 0), 3, id="sink_window-nosinks-K3"),
    pytest.param("tova", {}, (1, 2, 5), 4, id="tova-K4"),
    pytest.param("h2o", {}, (1, 2, 5), 3, id="h2o-K3"),
    pytest.param("knorm", {}, (2, 0, 6), 5, id="knorm-K5"),
    pytest.param("random", {"seed": 3}, (1, 1, 6), 4, id="random-K4"),
    pytest.param("keydiff", {}, (1, 0, 7), 3, id="keydiff-K3"),
    pytest.param("observed_attention", {}, (1, 1, 6), 3, id="observed-K3"),
    pytest.param("cur", {"num_sinks": 1, "local_window_size": 3}, (0, 1, 7), 4, id="cur-K4"),
    # LagKV: partitions of 2 after 1 sink; held 8 + the segment, so every event scores partitions.
    pytest.param("lagkv", {"n_sink": 1, "lag_size": 2}, (1, 0, 7), 4, id="lagkv-K4"),
    pytest.param("lagkv", {"n_sink": 0, "lag_size": 3, "cross_scoring": True}, (0, 1, 8), 5, id="lagkv-cross-K5"),
    pytest.param("qfilter", {"filters": "tests/data/qfilter_tiny"}, (1, 0, 7), 4, id="qfilter-K4"),
    pytest.param("helpers.policies:Recency", {"step": -1.0}, (1, 1, 6), 4, id="plugin-K4"),
    # A method scored from the segment's observation (its queries), on the token loop and the chunked path.
    pytest.param("helpers.policies:QueryAffinity", {}, (1, 1, 6), 4, id="queries-K4"),
    # SnapKV: the segment's last window_size queries vote (evict_every > window_size).
    pytest.param("snapkv", {"window_size": 3, "kernel_size": 3}, (0, 0, 8), 5, id="snapkv-K5"),
    pytest.param("snapkv", {"window_size": 2, "kernel_size": 5}, (1, 1, 9), 7, id="snapkv-K7"),
    # Expected Attention: the segment's queries before RoPE (un-rotated), original positions.
    pytest.param("expected_attention", {"n_future_positions": 8, "n_sink": 1}, (1, 0, 7), 4, id="expected-K4"),
    pytest.param("expected_attention", {"n_future_positions": 16, "n_sink": 0, "use_covariance": False,
                                        "use_vnorm": False, "epsilon": 0.5}, (0, 1, 6), 6, id="expected-plain-K6"),
    # AdaKV: the heads of a layer keep C per head on average (original positions).
    pytest.param("snapkv", {"window_size": 2, "kernel_size": 3, "head_budgets": "adaptive", "alpha_safeguard": 0.25},
                 (0, 0, 8), 5, id="adakv-snapkv-K5"),
    pytest.param("expected_attention", {"n_future_positions": 8, "n_sink": 1, "head_budgets": "adaptive"}, (1, 0, 7),
                 4, id="adakv-expected-K4"),
    # PyramidKV: C = 8 split over the 2 layers as [12, 4] once n >= 14 (uniform before: the rule's fallback).
    pytest.param("snapkv", {"window_size": 2, "kernel_size": 3, "layer_budgets": "pyramid", "beta": 2.0}, (0, 0, 8),
                 5, id="pyramidkv-K5"),
]


class Keeper(ScoredPolicy):
    """Never lets its last ``keep`` tokens go (score +inf), as a method that keeps a window would: with ``keep`` above
    the budget an event cannot reach it, and the storage must say so rather than hold more."""

    name = "keeper"
    observes = frozenset()
    paths = {"token": ("shifted", "original"), "chunked": ("original",)}
    params = (Param("keep", int, 4, "tokens at the end that always stay", minimum=0),)

    def score(self, keys, values, attention):
        score = torch.zeros(keys.shape[1])
        score[max(keys.shape[1] - self.keep, 0):] = float("inf")
        return score
