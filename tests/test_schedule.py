"""Compression every K tokens (``evict_every``; docs/semantics.md, "Events"), for every policy on every path.

One table of policy cases (policy, parameters, budgets), parametrised over the paths and position modes that
serve each policy (the registry's ``paths``): the token loop equals an independent reference written from the
definition (a masked dense pass or a hand-rotated loop for sink_window, the naive scored loop for the others),
every faster path equals the token loop, a layer holds at most ``C + K`` keys (exactly ``min(e, C) + n - e``
between steps, ``e`` the last event), and a stream that reaches no event with more than ``C`` tokens is the dense
model. ``evict_every=1`` is covered by the whole suite unchanged (tests/test_paths.py, tests/test_policies.py).
"""

from __future__ import annotations

import pytest
import torch
from helpers.models import tiny_llama
from helpers.reference import dense_logprobs, original_positions_logprobs, shifted_llama_logprobs
from helpers.scored_reference import pyramid, scored_logprobs

from streaming_lm.policy import policy_class
from streaming_lm.rolling import score
from streaming_lm.rotary import find_rotary
from streaming_lm.settings import resolve
from streaming_lm.streams import open_stream

pytestmark = pytest.mark.usefixtures("one_thread")

N = 34  # stream length
TOL = 2e-5


# policy, its parameters, budgets (start, recent, heavy), evict_every
CASES = [
    pytest.param("sink_window", {}, (2, 6, 0), 4, id="sink_window-K4"),
    pytest.param("sink_window", {}, (0, 5, 0), 3, id="sink_window-nosinks-K3"),
    pytest.param("tova", {}, (1, 2, 5), 4, id="tova-K4"),
    pytest.param("h2o", {}, (1, 2, 5), 3, id="h2o-K3"),
    pytest.param("knorm", {}, (2, 0, 6), 5, id="knorm-K5"),
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
    # AdaKV: the heads of a layer keep C per head on average (token loop, original positions).
    pytest.param("snapkv", {"window_size": 2, "kernel_size": 3, "head_budgets": "adaptive", "alpha_safeguard": 0.25},
                 (0, 0, 8), 5, id="adakv-snapkv-K5"),
    pytest.param("expected_attention", {"n_future_positions": 8, "n_sink": 1, "head_budgets": "adaptive"}, (1, 0, 7),
                 4, id="adakv-expected-K4"),
    # PyramidKV: C = 8 split over the 2 layers as [12, 4] once n >= 14 (uniform before: the rule's fallback).
    pytest.param("snapkv", {"window_size": 2, "kernel_size": 3, "layer_budgets": "pyramid", "beta": 2.0}, (0, 0, 8),
                 5, id="pyramidkv-K5"),
]


def served(case, method: str) -> list[str]:
    """The position modes in which ``method`` serves the case: the registry's paths, less what the settings refuse
    for its parameters (layer_budgets=pyramid: original positions only)."""
    policy, params, budgets, every = case.values
    modes = []
    for positions in policy_class(policy).paths.get(method, ()):
        try:
            settings_of(policy, params, budgets, every, positions, method)
        except ValueError:
            continue
        modes.append(positions)
    return modes


def settings_of(policy, params, budgets, every, positions, method, chunk_size=5):
    start, recent, heavy = budgets
    return resolve(policy=policy, policy_params=params, start_size=start, recent_size=recent, heavy_size=heavy,
                   evict_every=every, positions=positions, method=method, chunk_size=chunk_size)


def cases_on(method: str):
    """(case, positions) for every position mode in which ``method`` serves the case's policy."""
    for case in CASES:
        for positions in served(case, method):
            yield pytest.param(*case.values, positions, id=f"{case.id}-{positions}")


@pytest.fixture(scope="module")
def model():
    return tiny_llama()


@pytest.fixture(scope="module")
def ids():
    # Distinct tokens: no layer-0 key-norm ties (see tests/test_policies.py).
    return torch.randperm(128, generator=torch.Generator().manual_seed(11))[:N]


@pytest.fixture(scope="module")
def token_loop(model, ids):
    """The reference path's scores per (case, positions), computed once."""
    done = {}

    def get(policy, params, budgets, every, positions):
        key = (policy, tuple(params.items()), budgets, every, positions)
        if key not in done:
            done[key] = score(model, ids, settings_of(policy, params, budgets, every, positions, "token"),
                              find_rotary(model))
        return done[key]

    return get


def reference(model, ids, policy, params, budgets, every, positions):
    """The definition, computed without the engine."""
    start, recent, heavy = budgets
    if policy == "sink_window":
        if positions == "original":
            return original_positions_logprobs(model, ids, start, recent, every)
        return shifted_llama_logprobs(model, ids, start, recent, every)
    if policy in ("tova", "h2o", "knorm", "snapkv"):
        return scored_logprobs(model, ids, policy, start, recent, heavy, positions, evict_every=every, params=params)
    return None  # a plug-in: no independent reference (its H = 0 case is tests/test_policies.py's)


def held_per_layer(policy, params, budgets, every, n, layers=2) -> list[int]:
    """Tokens each layer holds after ``n`` read: at each event ``e`` a layer keeps ``min(held, its budget at e)``
    (C, or the pyramid's share: the reference's rule), then adds the segment read since."""
    capacity = sum(budgets)
    held = []
    for layer in range(layers):
        kept = 0
        for event in range(every, n - n % every + 1, every):
            budget = capacity if params.get("layer_budgets", "uniform") == "uniform" else \
                pyramid(event, layers, capacity, params["window_size"], params["beta"])[layer]
            kept = min(kept + every, budget)
        held.append(kept + n % every)
    return held


@pytest.mark.parametrize("policy,params,budgets,every,positions", list(cases_on("token")))
def test_the_token_loop_follows_the_definition(model, ids, token_loop, policy, params, budgets, every, positions):
    got = token_loop(policy, params, budgets, every, positions)
    events = (N - 1) // every * every  # tokens read at the last event
    # every event compresses to the layer's budget (C unless budgets differ by layer), nothing in between
    assert got.evicted == events - held_per_layer(policy, params, budgets, every, events)[0]
    most = max(max(held_per_layer(policy, params, budgets, every, n)) for n in range(N))
    if params.get("head_budgets") == "adaptive":  # a head may hold more than C, another fewer: the most any holds
        assert got.max_held > most  # the heads did differ
        uniform = token_loop(policy, params | {"head_budgets": "uniform"}, budgets, every, positions)
        assert (got.logprobs - uniform.logprobs).abs().max() > 1e-3
    else:
        assert sum(budgets) < got.max_held == most  # between steps: the budget plus the segment so far
        assert most <= sum(budgets) + every - 1 or params.get("layer_budgets") == "pyramid"
    expected = reference(model, ids, policy, params, budgets, every, positions)
    if expected is not None:
        torch.testing.assert_close(got.logprobs, expected, rtol=0, atol=TOL)
    # It streamed, and it is not the per-token cache (nor, for a windowed method, a shorter schedule).
    other = 1 if "window_size" not in params else params["window_size"] + 1
    shorter = token_loop(policy, params, budgets, other, positions)
    assert (got.logprobs - shorter.logprobs).abs().max() > 1e-3


@pytest.mark.parametrize("chunk", [1, 4, 7])
@pytest.mark.parametrize("policy,params,budgets,every,positions", list(cases_on("chunked")))
def test_the_chunked_path_equals_the_token_loop(model, ids, token_loop, policy, params, budgets, every, positions,
                                                chunk):
    token = token_loop(policy, params, budgets, every, positions)
    setting = settings_of(policy, params, budgets, every, positions, "chunked", chunk_size=chunk)
    chunked = score(model, ids, setting, find_rotary(model))
    torch.testing.assert_close(chunked.logprobs, token.logprobs, rtol=0, atol=TOL)
    assert chunked.evicted == token.evicted
    # Between passes a layer holds at most its budget + K - 1 tokens (a pass adds its chunk while it runs).
    assert chunked.max_held <= max(max(held_per_layer(policy, params, budgets, every, n)) for n in range(N))


@pytest.mark.parametrize("policy,params,budgets,every,positions", list(cases_on("chunked")))
def test_decoding_equals_the_token_loop(model, ids, token_loop, policy, params, budgets, every, positions):
    """Generation's path: a chunked read of a context, then one ``step`` per token (index-only policies hand over
    to the decode slots), with the memory bound checked after every step."""
    token = token_loop(policy, params, budgets, every, positions)
    stream = open_stream(model, settings_of(policy, params, budgets, every, positions, "chunked"), find_rotary(model))
    logits = [stream.read(ids[:9])]
    for token_id in ids[9:-1].tolist():
        logits.append(stream.step(token_id)[None])
        held = held_per_layer(policy, params, budgets, every, stream.n)
        assert stream.cache.held_tokens() == held, stream.n
    got = torch.log_softmax(torch.cat(logits), -1).gather(-1, ids[1:, None])[:, 0]
    torch.testing.assert_close(got, token.logprobs, rtol=0, atol=TOL)
    assert stream.evicted == token.evicted


def dense_cases():
    for method in ("token", "chunked"):
        for case in CASES:
            positions = policy_class(case.values[0]).default_positions
            if positions in served(case, method):
                yield pytest.param(*case.values, method, positions, id=f"{case.id}-{method}")


@pytest.mark.parametrize("policy,params,budgets,every,method,positions", list(dense_cases()))
def test_no_event_beyond_the_budget_is_dense(model, ids, policy, params, budgets, every, method, positions):
    """K at least the stream: the only segment is the whole stream, so nothing is evicted whatever C is (and with
    C >= n, whatever K is)."""
    dense = dense_logprobs(model, ids)
    whole = (0, N, 0) if policy_class(policy).index_only else (0, 0, N)  # C = N: a recent window, or heavy slots
    for every, budgets_used in ((N, budgets), (every, whole)):
        got = score(model, ids, settings_of(policy, params, budgets_used, every, positions, method),
                    find_rotary(model))
        assert got.evicted == 0
        torch.testing.assert_close(got.logprobs, dense, rtol=0, atol=TOL)


@pytest.mark.parametrize("policy,params,budgets,every,positions",
                         [case for case in cases_on("chunked") if case.values[4] == "original"])
def test_requests_read_the_same_stream(model, ids, policy, params, budgets, every, positions):
    """Continuations of one context (read as a batch on the chunked path, from forks elsewhere) are the whole
    stream's numbers: events fall at the same token indices however the stream is split into reads."""
    from streaming_lm.continuation import score_continuations

    setting = settings_of(policy, params, budgets, every, positions, "chunked")
    context, continuations = ids[:13].tolist(), [ids[13:].tolist(), ids[13:18].tolist(), ids[13:14].tolist()]
    for continuation, got in zip(continuations, score_continuations(model, context, continuations, setting,
                                                                       find_rotary(model)), strict=True):
        whole = score(model, context + continuation, settings_of(policy, params, budgets, every, positions, "token"),
                      find_rotary(model))
        assert got.logprob == pytest.approx(float(whole.logprobs[len(context) - 1 :].double().sum()), abs=1e-4)
        assert got.evicted == whole.evicted
