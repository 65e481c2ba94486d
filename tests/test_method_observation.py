"""What the methods observe at an event, on the engine: Expected Attention's queries before RoPE are the model's own
(its ``q_proj`` output), though the engine sees them only after RoPE and un-rotates them (policy.py)."""

from __future__ import annotations

import pytest
import torch
from helpers.models import tiny_llama
from helpers.policies import RecordingExpectedAttention

from streaming_lm.methods import policy_for
from streaming_lm.rolling import score
from streaming_lm.rotary import find_rotary
from streaming_lm.settings import resolve

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model():
    return tiny_llama()  # built once for the module: the tests only read it


@pytest.mark.parametrize("method", ["token", "chunked"])
def test_expected_attention_sees_the_queries_before_rope(model, method):
    ids = torch.randperm(128, generator=torch.Generator().manual_seed(4))[:30]
    captured = []  # layer 0's q_proj output: independent of the cache (its input is the embeddings)
    handle = model.model.layers[0].self_attn.q_proj.register_forward_hook(lambda m, i, o: captured.append(o))
    try:
        model(ids[None])
    finally:
        handle.remove()
    heads, dim = model.config.num_attention_heads, model.config.hidden_size // model.config.num_attention_heads
    before = captured[0][0].reshape(-1, heads, dim).transpose(0, 1)  # [heads, n, dim]
    RecordingExpectedAttention.seen = []
    setting = resolve(policy="helpers.policies:RecordingExpectedAttention", start_size=0, recent_size=0, heavy_size=6,
                      evict_every=5, policy_params={"n_sink": 1, "n_future_positions": 8}, method=method,
                      chunk_size=7)
    score(model, ids, setting, find_rotary(model))
    layer0 = {}  # layer 0 runs first in every pass: its entry is each step's first
    for step, queries in RecordingExpectedAttention.seen:
        layer0.setdefault(step, queries)
    assert list(layer0) == list(range(9, 29, 5))  # events after tokens 9, 14, ... (C = 6 < 10)
    for step, queries in layer0.items():
        torch.testing.assert_close(queries, before[:, step - 4 : step + 1].float(), rtol=0, atol=1e-5)


def test_expected_attentions_tables_are_shared_by_layers_and_bounded(model):
    """An event's rotation tables are computed once for all its layers, and what is kept stays bounded: a chunk's
    short segments, or one long segment alone (once after a long context)."""
    policy = policy_for(resolve(policy="expected_attention", evict_every="context", compression_ratio=0.5,
                                start_size=0), model, find_rotary(model))
    first = policy._event_tables(100, 1, 16, torch.device("cpu"))
    assert policy._event_tables(100, 1, 16, torch.device("cpu")) is first  # the next layer's: the same
    for step in range(3000):
        policy._event_tables(step, 1, 16, torch.device("cpu"))
    assert len(policy._tables) <= 1024
    for step in (6000, 7000):
        policy._event_tables(step, 8000, 16, torch.device("cpu"))
        assert len(policy._tables) == 1 and policy._table_rows == 8000


@pytest.mark.parametrize("chunk", [1, 5, 16])
@pytest.mark.parametrize("extra", [{}, {"head_budgets": "adaptive"}, {"critical": True}, {"chunk_length": 2}],
                         ids=["uniform", "adakv", "critical", "chunkkv"])
def test_expected_attention_every_token_chunked_equals_the_token_loop(model, monkeypatch, extra, chunk):
    """evict_every=1: the chunked path prepares a chunk's events at once (``row_scorer``, never ``score``); the
    token loop scores the held columns at each event. Same evictions, same numbers (kvpress's wrappers too)."""
    from streaming_lm.methods.expected_attention import ExpectedAttention

    ids = torch.randperm(128, generator=torch.Generator().manual_seed(5))[:40]
    params = {"n_sink": 2, "n_future_positions": 8, "epsilon": 0.1, **extra}

    def run(method, **extra):
        return score(model, ids, resolve(policy="expected_attention", start_size=1, recent_size=1, heavy_size=6,
                                         policy_params=params, method=method, **extra), find_rotary(model))

    token = run("token")
    calls = []
    original = ExpectedAttention.score
    monkeypatch.setattr(ExpectedAttention, "score", lambda self, *a, **k: calls.append(1) or original(self, *a, **k))
    chunked = run("chunked", chunk_size=chunk)
    assert not calls  # every event went through the row scorer
    assert token.evicted == chunked.evicted == 40 - 1 - 8 + ("chunk_length" in extra)  # ChunkKV: whole chunks
    torch.testing.assert_close(chunked.logprobs, token.logprobs, rtol=0, atol=1e-5)


def test_expected_attentions_row_scorer_is_its_score_on_the_held_columns(model):
    """At any row and any held set (the sinks held, as they always are), the row scorer's scores of the held columns
    are ``score``'s on those columns alone."""
    from streaming_lm.methods.event import Observation, held_scores

    policy = policy_for(resolve(policy="expected_attention", start_size=0, recent_size=0, heavy_size=8,
                                policy_params={"n_sink": 3, "n_future_positions": 16, "epsilon": 0.2}),
                        model, find_rotary(model))
    g = torch.Generator().manual_seed(0)
    kv_heads, heads, d, columns, rows, first = 2, 4, 16, 30, 12, 40
    keys, values = torch.randn(kv_heads, columns, d, generator=g), torch.randn(kv_heads, columns, d, generator=g)
    queries = torch.randn(heads, rows, d, generator=g)
    tokens = torch.cat((torch.arange(3), torch.arange(first + rows - columns + 3, first + rows)))
    tokens = tokens.expand(kv_heads, -1)
    scorer = policy.row_scorer(keys, values, queries, first, tokens)
    for r in (0, 5, rows - 1):
        alive = torch.rand(kv_heads, columns, generator=g) < 0.6
        alive[:, :3] = True
        alive[1] = alive[0]  # heads holding as many (held_scores scores those at once) ...
        alive[1, 3:] = alive[1, 3:].roll(1)  # ... but not the same columns
        got = scorer(r, alive)
        want = held_scores(policy, Observation(keys, values, first + r, queries=queries[:, r : r + 1]), alive)
        torch.testing.assert_close(got[alive], want[alive], rtol=1e-5, atol=0)
