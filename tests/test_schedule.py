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
from helpers.policies import CASES
from helpers.reference import dense_logprobs, original_positions_logprobs, shifted_llama_logprobs
from helpers.scored_reference import pyramid, scored_logprobs

from streaming_lm.methods import policy_class
from streaming_lm.rolling import score
from streaming_lm.rotary import find_rotary
from streaming_lm.settings import resolve
from streaming_lm.streams import open_stream

pytestmark = pytest.mark.usefixtures("one_thread")

N = 34  # stream length
TOL = 2e-5




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


WITHOUT_REFERENCE = ("expected_attention",)


def reference(model, ids, policy, params, budgets, every, positions):
    """The definition, computed without the engine."""
    start, recent, heavy = budgets
    if policy == "sink_window":
        if positions == "original":
            return original_positions_logprobs(model, ids, start, recent, every)
        return shifted_llama_logprobs(model, ids, start, recent, every)
    if policy == "qfilter":  # the filters as read by safetensors, not by the method
        from safetensors.torch import load_file

        params = dict(params, q_filters=load_file(f"{params['filters']}/model.safetensors")["q_filters"])
    if policy in ("tova", "h2o", "knorm", "snapkv", "keydiff", "random", "lagkv",
                  "observed_attention", "cur", "qfilter"):
        return scored_logprobs(model, ids, policy, start, recent, heavy, positions, evict_every=every, params=params)
    # No reference here, said so rather than skipped quietly: a plug-in (its H = 0 case is tests/test_policies.py's),
    # Expected Attention (its observation: tests/test_method_observation.py; its numbers: kvpress's, in
    # tests/test_context_kvpress.py). A method added to CASES without a reference fails here.
    assert ":" in policy or policy in WITHOUT_REFERENCE, f"{policy}: add its reference (or a reason) here"
    return None


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
    # Between passes a layer holds at most what the token loop holds after some step (its budget + K - 1 tokens,
    # test above; more for one head of AdaKV's): a pass's end is a step's.
    assert chunked.max_held <= token.max_held


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
        if params.get("head_budgets") == "adaptive":  # the heads' counts differ; on average they are the layer's
            assert [layer.held_per_head().float().mean().item() for layer in stream.cache.layers] == held, stream.n
        else:
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
    whole = (0, N, 0) if policy_class(policy).kind == "index" else (0, 0, N)  # C = N: a recent window, or heavy slots
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
