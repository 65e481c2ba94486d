"""Every eviction policy on every execution path, on a tiny random model (seconds).

Parametrised over ``streaming_lm.methods.POLICIES`` x the paths of ``streaming_lm.streams``: registering a
policy tests it here, once its independent reference visibility is added to ``REFERENCE_VISIBILITY``
(``test_every_policy_has_a_reference`` fails until then). The checks are the engine's contract
(docs/semantics.md): a stream of at most C + 1 tokens gives the dense numbers on every path; every fast
path gives the token loop's numbers on a stream that evicts; between steps a cache holds exactly
``min(n, C)`` tokens (``held_tokens()``, ``kv_bytes()``) and has evicted ``n - C``; and the policy's own
``held`` / ``evicted_after`` / ``visible_mask`` agree with each other and with the reference.
"""

from __future__ import annotations

import pytest
import torch
from helpers.engine import score_stream
from helpers.models import tiny_llama
from helpers.reference import dense_logprobs, perplexity, sink_window_allowed

from streaming_lm.methods import POLICIES, EvictionPolicy
from streaming_lm.settings import StreamingSettings
from streaming_lm.streams import open_stream
from streaming_lm.rotary import find_rotary

pytestmark = pytest.mark.usefixtures("one_thread")

START, RECENT, CHUNK = 4, 16, 7  # C = 20; chunks of 7 cross the eviction boundary at odd places
CAPACITY = START + RECENT
LONG = 70  # 3.5 C: 49 evictions
CONTEXT = 9  # tokens the decode path reads (chunked) before it steps
TOL = 2e-5  # float32 log-probs; the paths differ by ~2e-6

# policy name -> the independent reference: bool [n, n], may query t see key s (docs/semantics.md)
REFERENCE_VISIBILITY = {
    "sink_window": lambda n, settings: sink_window_allowed(n, settings.start_size, settings.recent_size),
}


def policy_params():
    """Every registered index-only policy. Scored ones (TOVA, H2O, key-norm) have no ``held(n)``: the same checks
    (dense when C >= n, the chunked path equals the token loop, C keys per head between steps) are made for them
    in tests/test_policies.py, parametrised over ``settings.POLICIES``."""
    for name, cls in POLICIES.items():
        if issubclass(cls, EvictionPolicy):  # held() from token indices: the every-K index rule (duo is once only)
            yield pytest.param(name, id=name)


@pytest.fixture(scope="module")
def model():
    return tiny_llama()


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, 128, (LONG,), generator=torch.Generator().manual_seed(3))


@pytest.fixture(params=list(policy_params()))
def policy(request):
    """The policy under test: the settings name it, and every path builds it from them."""
    return request.param


# ---------------------------------------------------------------- the paths


def read_in_pieces(stream, ids, piece: int, after):
    """Read ``ids[:-1]`` ``piece`` tokens per ``read`` (the chunked path splits them into its chunks);
    ``after(stream)`` runs between reads. Returns the log-probs of ``ids[1:]``."""
    logits = []
    for a in range(0, ids.numel() - 1, piece):
        logits.append(stream.read(ids[a : min(a + piece, ids.numel() - 1)]))
        after(stream)
    return torch.log_softmax(torch.cat(logits), -1).gather(-1, ids[1:, None])[:, 0]


def token_loop_path(stream, ids, after):
    return read_in_pieces(stream, ids, 1, after)  # between every two steps


def chunked_path(stream, ids, after):
    return read_in_pieces(stream, ids, 2 * CHUNK + 3, after)  # reads that end mid-chunk


def decode_path(stream, ids, after):
    """Generation's path: a chunked read of the context, then one ``step`` per token."""
    logits = [stream.read(ids[:CONTEXT])]
    after(stream)
    for token in ids[CONTEXT:-1].tolist():
        logits.append(stream.step(token)[None])
        after(stream)
    return torch.log_softmax(torch.cat(logits), -1).gather(-1, ids[1:, None])[:, 0]


def recompute_path(stream, ids, after):
    return stream.score(ids).logprobs  # a group's window depends on where the group ends: the whole stream at once


def dense_path(stream, ids, after):
    return read_in_pieces(stream, ids, 5, after)


# path -> (method of the settings (None: the dense baseline), run(stream, ids, after) -> log-probs of ids[1:])
PATHS = {"token": ("token", token_loop_path), "chunked": ("chunked", chunked_path), "decode": ("chunked", decode_path),
         "recompute": ("recompute", recompute_path), "dense": (None, dense_path)}
FAST = ["chunked", "decode"]  # the paths that must give the token loop's numbers on an evicting stream
CACHED = ["token", "chunked", "decode"]  # the paths that hold a sink+window cache between steps


def settings_for(path, start=START, recent=RECENT, positions="shifted", policy="sink_window"):
    method = PATHS[path][0]
    return None if method is None else StreamingSettings(start, recent, positions, method=method, chunk_size=CHUNK,
                                                          policy=policy)


def run_path(model, path, ids, positions="shifted", start=START, recent=RECENT, after=lambda stream: None,
             policy="sink_window"):
    """Open an empty stream on ``path`` and run it over ``ids``: (log-probs of ids[1:], the stream)."""
    stream = open_stream(model, settings_for(path, start, recent, positions, policy), find_rotary(model))
    return PATHS[path][1](stream, ids, after), stream


# ---------------------------------------------------------------- numbers


# positions apply to the cache paths only: recompute windows always sit at 0 .. C-1, dense at 0 .. n-1
PATH_POSITIONS = [(path, positions) for path in PATHS
                  for positions in (["shifted", "original"] if path in CACHED else ["shifted"])]


@pytest.mark.parametrize("path,positions", PATH_POSITIONS)
@pytest.mark.parametrize("start,recent,length", [
    (4, 35, 40),  # n = C + 1: the longest stream that must be dense
    (0, 39, 40),  # no sinks
    (4, 60, 40),  # C > n
])
def test_short_stream_equals_dense(model, ids, policy, path, positions, start, recent, length):
    short = ids[:length]
    got, stream = run_path(model, path, short, positions, start, recent, policy=policy)
    # recompute counts every token of the stream outside the last window, the last target included
    assert stream.evicted == (max(0, length - start - recent) if path == "recompute" else 0)
    expected = dense_logprobs(model, short)
    torch.testing.assert_close(got, expected, rtol=0, atol=TOL)
    assert perplexity(got) == pytest.approx(perplexity(expected), rel=1e-5)


@pytest.fixture(scope="module")
def token_loop(model, ids):
    """The reference: the token loop's scores, per (policy, positions), computed once."""
    cache = {}

    def get(policy, positions):
        if (policy, positions) not in cache:
            cache[policy, positions] = score_stream(model, ids, StreamingSettings(START, RECENT, positions,
                                                                                  policy=policy), find_rotary(model))
        return cache[policy, positions]

    return get


@pytest.mark.parametrize("path", FAST)
@pytest.mark.parametrize("positions", ["shifted", "original"])
def test_fast_path_equals_the_token_loop(model, ids, policy, token_loop, path, positions):
    token = token_loop(policy, positions)
    # It streamed: the reference itself is not the dense model's numbers.
    assert token.evicted == LONG - 1 - CAPACITY
    assert (token.logprobs - dense_logprobs(model, ids)).abs().max() > 1e-2
    got, stream = run_path(model, path, ids, positions, policy=policy)
    torch.testing.assert_close(got, token.logprobs, rtol=0, atol=TOL)
    assert perplexity(got) == pytest.approx(perplexity(token.logprobs), rel=1e-5)
    assert stream.evicted == token.evicted


# ---------------------------------------------------------------- memory


def kv_bytes_per_token(model) -> int:
    config = model.config
    head_dim = config.hidden_size // config.num_attention_heads
    return 2 * config.num_hidden_layers * config.num_key_value_heads * head_dim * 4  # float32 keys + values


@pytest.mark.parametrize("path", CACHED)
@pytest.mark.parametrize("positions", ["shifted", "original"])
def test_memory_is_exactly_the_cache_between_steps(model, ids, policy, path, positions):
    per_token = kv_bytes_per_token(model)
    caches, checked = [], []

    def record_cache(module, args, kwargs):
        caches.append(kwargs.get("cache", kwargs.get("past_key_values")))

    def check(stream):
        held = min(stream.n, CAPACITY)
        assert caches[-1].held_tokens() == [held] * model.config.num_hidden_layers, stream.n
        assert stream.kv_bytes() == held * per_token, stream.n
        assert stream.evicted == max(0, stream.n - CAPACITY), stream.n
        assert stream.max_held == held, stream.n
        checked.append(stream.n)

    handle = model.register_forward_pre_hook(record_cache, with_kwargs=True)
    try:
        _, stream = run_path(model, path, ids, positions, after=check, policy=policy)
    finally:
        handle.remove()
    assert checked[-1] == LONG - 1 and max(checked) > CAPACITY  # checked while evicting, to the end
    if path == "decode":
        # Preallocated slots: one free slot for the token being read, plus the unrotated sink keys
        # (keys only: half a token's bytes per sink).
        assert stream.kv_allocated_bytes() == (CAPACITY + 1) * per_token + START * per_token // 2
    else:
        assert stream.kv_allocated_bytes() == stream.kv_bytes()  # a growing cache allocates what it holds


# ---------------------------------------------------------------- the policy itself


def test_every_policy_has_a_reference():
    assert set(REFERENCE_VISIBILITY) == {name for name, cls in POLICIES.items() if issubclass(cls, EvictionPolicy)}


@pytest.mark.parametrize("start,recent", [(4, 16), (0, 7), (3, 1)])
def test_held_is_within_the_budget_and_ascending(policy, start, recent):
    settings = StreamingSettings(start, recent, policy=policy)
    rule = POLICIES[policy](settings)
    for n in range(4 * settings.capacity):
        runs = rule.held(n)
        flat = [i for a, b in runs for i in range(a, b)]
        assert all(a <= b for a, b in runs), (n, runs)
        assert flat == sorted(set(flat)) and all(0 <= i < n for i in flat), (n, runs)  # ascending, disjoint, read
        assert len(flat) == min(n, settings.capacity), (n, runs)  # the budget, filled
        assert rule.held_index(n).tolist() == flat


@pytest.mark.parametrize("start,recent", [(4, 16), (0, 7), (3, 1)])
def test_evicted_after_and_visible_mask_follow_held(policy, start, recent):
    settings = StreamingSettings(start, recent, policy=policy)
    rule = POLICIES[policy](settings)
    n = 4 * settings.capacity
    for t in range(n):
        before, after = set(rule.held_index(t).tolist()) | {t}, set(rule.held_index(t + 1).tolist())
        assert after <= before, t  # an evicted token never comes back
        assert rule.evicted_after(t) == sorted(before - after), t
    # One chunk's mask (keys: what the cache holds, then the chunk) against held, query by query.
    for a, b in [(0, 5), (3, 3 + CHUNK), (n - CHUNK, n)]:
        queries, keys = torch.arange(a, b), torch.cat((rule.held_index(a), torch.arange(a, b)))
        mask = rule.visible_mask(queries, keys)
        for row, t in zip(mask, queries.tolist(), strict=True):
            visible = set(rule.held_index(t).tolist()) | {t}
            assert row.tolist() == [k in visible for k in keys.tolist()], (a, t)
    # The whole stream against the independent reference.
    everything = torch.arange(n)
    assert torch.equal(rule.visible_mask(everything, everything), REFERENCE_VISIBILITY[policy](n, settings))
