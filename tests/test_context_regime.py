"""Once after the context (``evict_every=context``, kvpress's regime; docs/semantics.md "Events"): for one table of
method cases on a tiny Llama, nothing evicted equals dense, the engine's reading equals the definition written
without it (one dense forward in which the question and continuation see only the kept prefill tokens), the token
method equals the chunked one, one event every K tokens (the other implementation, storage/scored.py) equals one
event after the context, and shared prefixes and questions are read once with the same numbers. kvpress's own numbers
on SmolLM2: tests/test_context_kvpress.py."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from helpers.models import CharTokenizer, tiny_llama
from helpers.context_regime import engine_greedy, engine_logprobs, masked_logprobs
from helpers.reference import dense_logprobs

from streaming_lm.continuation import score_requests
from streaming_lm.rotary import find_rotary
from streaming_lm.settings import resolve
from streaming_lm.streams import context as context_stream

pytestmark = pytest.mark.usefixtures("one_thread")

CONTEXT = 40  # context tokens (the prefill is CONTEXT - Q)
CONTINUATION = 6
TOL = 2e-5
SNAP = {"window_size": 4, "kernel_size": 3}
EA = {"n_future_positions": 8, "n_sink": 1}
COMPACTOR = {"sink_size_start": 2, "sink_size_end": 1, "attention_chunk_size": 8, "sketch_dimension": 8}
# policy, parameters, budget (compression_ratio, or (start, recent, heavy) tokens), query_size
CASES = [
    pytest.param("sink_window", {}, 0.5, 3, id="sink_window"),
    pytest.param("sink_window", {}, (2, 10, 0), 1, id="sink_window-tokens"),
    pytest.param("knorm", {}, 0.5, 1, id="knorm"),
    pytest.param("knorm", {}, (1, 2, 9), 4, id="knorm-tokens"),
    pytest.param("tova", {}, 0.6, 4, id="tova"),
    pytest.param("snapkv", SNAP, 0.5, 2, id="snapkv"),
    pytest.param("snapkv", SNAP | {"layer_budgets": "pyramid", "beta": 2.0}, 0.5, 2, id="pyramidkv"),
    pytest.param("snapkv", SNAP | {"head_budgets": "adaptive"}, 0.5, 3, id="adakv-snapkv"),
    pytest.param("expected_attention", EA, 0.5, 3, id="expected_attention"),
    pytest.param("expected_attention", EA | {"head_budgets": "adaptive", "alpha_safeguard": 0.5}, 0.25, 1,
                 id="adakv-expected_attention"),
    pytest.param("duo", {"head_compression_ratio": 0.5}, None, 2, id="duo"),
    pytest.param("leverage", {"sketch_dimension": 8}, 0.5, 2, id="leverage"),
    pytest.param("compactor", COMPACTOR, 0.5, 3, id="compactor"),
    pytest.param("compactor", COMPACTOR | {"head_budgets": "adaptive"}, 0.25, 1, id="adakv-compactor"),
    pytest.param("snapkv", SNAP | {"chunk_length": 3}, 0.5, 2, id="chunkkv"),
    pytest.param("knorm", {"critical": True, "first_stage_ratio": 0.25}, (1, 2, 9), 3, id="critical-knorm-tokens"),
    pytest.param("snapkv", SNAP | {"critical": True, "head_budgets": "adaptive"}, 0.5, 2, id="critical-adakv-snapkv"),
    pytest.param("helpers.policies:Recency", {"step": -1.0}, (1, 1, 10), 2, id="plugin"),
    pytest.param("kvzip", {"replay_chunk_size": 7}, 0.5, 2, id="kvzip"),
    pytest.param("qfilter", {"filters": "tests/data/qfilter_tiny"}, 0.5, 2, id="qfilter"),
    pytest.param("kvzip", {"layerwise": True, "kvzip_plus_normalization": True, "n_sink": 2}, (0, 2, 9), 1,
                 id="kvzip-plus-layerwise-tokens"),
]
TOKENIZER = CharTokenizer()  # KVzip's replay prompt


@pytest.fixture(scope="module")
def model():
    return tiny_llama(seed=3)


@pytest.fixture(scope="module")
def ids():
    torch.manual_seed(7)
    return torch.randint(0, 128, (CONTEXT + CONTINUATION,)).tolist()


@pytest.fixture(scope="module")
def duo_pattern(tmp_path_factory):
    """A DuoAttention pattern for the tiny model (2 layers x 2 key/value heads), distinct scores."""
    folder = tmp_path_factory.mktemp("duo")
    (folder / "config.json").write_text(json.dumps({"sink_size": 2, "recent_size": 6}))
    (folder / "full_attention_heads.tsv").write_text("0.9\t0.2\n0.4\t0.7\n")
    return str(folder)


def settings_for(policy, params, budget, q, duo_pattern, method="chunked", nothing_evicted=False):
    params = dict(params)
    if policy == "duo":
        params["pattern"] = duo_pattern
        if nothing_evicted:
            params["head_compression_ratio"] = 0.0
        return resolve(policy=policy, evict_every="context", query_size=q, method=method, chunk_size=5,
                       policy_params=params)
    if isinstance(budget, tuple):
        start, recent, heavy = budget
        if nothing_evicted:
            heavy += CONTEXT
            recent += CONTEXT if policy == "sink_window" else 0
        sizes = dict(start_size=start, recent_size=recent, heavy_size=None if policy == "sink_window" else heavy)
    else:
        sizes = dict(start_size=1 if policy == "sink_window" else 0, compression_ratio=0.0 if nothing_evicted else budget)
    return resolve(policy=policy, evict_every="context", query_size=q, method=method, chunk_size=5,
                   policy_params=params, **sizes)


@pytest.mark.parametrize("policy, params, budget, q", CASES)
def test_nothing_evicted_is_dense(model, ids, duo_pattern, policy, params, budget, q):
    settings = settings_for(policy, params, budget, q, duo_pattern, nothing_evicted=True)
    context, continuation = ids[:CONTEXT], ids[CONTEXT:]
    ours, kept = engine_logprobs(model, find_rotary(model), context, continuation, settings, tokenizer=TOKENIZER)
    assert all(k.all() for k in kept)
    dense = dense_logprobs(model, torch.tensor(ids))[CONTEXT - 1:].tolist()
    assert np.allclose(ours, dense, atol=TOL, rtol=0)


@pytest.mark.parametrize("prefill_pass", [None, 5], ids=["prefill-one-pass", "prefill-5-a-pass"])
@pytest.mark.parametrize("policy, params, budget, q", CASES)
def test_engine_equals_the_definition_and_token_equals_chunked(model, ids, duo_pattern, monkeypatch, policy, params,
                                                               budget, q, prefill_pass):
    """The chunked reading (the prefill in one causal pass, or 5 tokens a pass after the first; 5 a pass after the
    event) equals the token method (one a pass) and the masked dense forward on the kept sets; something was evicted,
    and it changed the numbers."""
    if prefill_pass is not None:
        monkeypatch.setattr(context_stream, "PREFILL_PASS", prefill_pass)
    shift = find_rotary(model)
    context, continuation = ids[:CONTEXT], ids[CONTEXT:]
    chunked, kept = engine_logprobs(model, shift, context, continuation,
                                    settings_for(policy, params, budget, q, duo_pattern), tokenizer=TOKENIZER)
    token, kept_token = engine_logprobs(model, shift, context, continuation,
                                        settings_for(policy, params, budget, q, duo_pattern, method="token"),
                                        tokenizer=TOKENIZER)
    assert all((a == b).all() for a, b in zip(kept, kept_token))
    assert np.allclose(chunked, token, atol=TOL, rtol=0)
    assert not all(k.all() for k in kept), "nothing was evicted"
    reference = masked_logprobs(model, context, continuation, CONTEXT - q, kept, monkeypatch)
    assert np.allclose(chunked, reference, atol=TOL, rtol=0)
    assert not np.allclose(chunked, dense_logprobs(model, torch.tensor(ids))[CONTEXT - 1:].tolist(), atol=1e-4)
    counts = np.array([k.sum(1) for k in kept])  # (layers, kv heads)
    if "head_budgets" in params or policy == "duo":
        assert (counts != counts[:, :1]).any(), "heads should hold different counts"
    if params.get("layer_budgets") == "pyramid":
        assert counts[0, 0] > counts[-1, 0], "the first layer should keep the most"
    if isinstance(budget, float):  # kvpress's int(n (1 - r)) per layer, per head on average
        expected = max(1, int((CONTEXT - q) * (1 - budget)))
        if params.get("chunk_length"):  # ChunkKV: whole chunks, max(1, int(chunks (1 - r))) of them, the last short
            length = params["chunk_length"]
            chunks = -(-(CONTEXT - q) // length)
            kept_chunks = max(1, int(chunks * (1 - budget)))
            expected = (kept_chunks * length - length + (CONTEXT - q) % length, kept_chunks * length)
            assert (counts == counts[0, 0]).all() and counts[0, 0] in expected
        else:
            assert np.allclose(counts.mean(), expected)


@pytest.mark.parametrize("policy, params, budgets", [
    pytest.param("sink_window", {}, (2, 10, 0), id="sink_window"),
    pytest.param("knorm", {}, (1, 2, 9), id="knorm"),
    pytest.param("snapkv", SNAP, (0, 0, 12), id="snapkv"),
    pytest.param("snapkv", SNAP | {"layer_budgets": "pyramid", "beta": 2.0}, (0, 0, 12), id="pyramidkv"),
    pytest.param("snapkv", SNAP | {"head_budgets": "adaptive"}, (0, 0, 12), id="adakv-snapkv"),
    pytest.param("expected_attention", EA, (1, 0, 11), id="expected_attention"),
    pytest.param("snapkv", SNAP | {"chunk_length": 3}, (0, 0, 12), id="chunkkv"),
    pytest.param("knorm", {"critical": True}, (1, 2, 9), id="critical-knorm"),
])
def test_one_event_every_k_equals_one_event_after_the_context(model, ids, policy, params, budgets):
    """compression-methods.md's check: every K tokens, K the prefill, with no second event before the stream ends,
    is once after the context with the same segment (the token loop's scored storage vs the context path)."""
    q = 3
    prefill = CONTEXT - q
    start, recent, heavy = budgets
    sizes = dict(start_size=start, recent_size=recent, heavy_size=None if policy == "sink_window" else heavy)
    every = resolve(policy=policy, evict_every=prefill, method="token", positions="original", policy_params=params,
                    **sizes)
    assert 2 * prefill > len(ids) - 1
    shift = find_rotary(model)
    scores, _ = score_requests(model, [(ids[:CONTEXT], ids[CONTEXT:])], every, shift)
    once = resolve(policy=policy, evict_every="context", query_size=q, policy_params=params, **sizes)
    ours, _ = engine_logprobs(model, shift, ids[:CONTEXT], ids[CONTEXT:], once)
    assert scores[0].evicted > 0
    assert abs(scores[0].logprob - sum(ours)) <= TOL * len(ours)


@pytest.mark.parametrize("prefill_pass", [None, 5], ids=["one-pass", "5-a-pass"])
def test_a_prefill_is_written_into_one_allocation(model, ids, monkeypatch, prefill_pass):
    """A prefill read in many passes is written in place into one allocation of its length (concatenating at every
    pass copies the whole cache each time: quadratic in the context), and a short query window is a copy, not a view
    holding every pass's queries."""
    if prefill_pass is not None:
        monkeypatch.setattr(context_stream, "PREFILL_PASS", prefill_pass)
    settings = resolve(policy="snapkv", evict_every="context", compression_ratio=0.5, start_size=0,
                       policy_params=SNAP, chunk_size=4)
    stream = context_stream.ContextStream(model, settings, find_rotary(model))
    storage = set()
    for _ in stream.read_passes(ids[:CONTEXT]):
        storage.add(stream.cache.layers[0].keys.data_ptr())
    assert len(storage) == 1
    for layer in stream.cache.layers:
        for states in (layer.keys, layer.values):
            assert states.shape[-2] == CONTEXT
            assert states.untyped_storage().nbytes() == states.numel() * states.element_size()
        window = layer.queries
        assert window.shape[1] == SNAP["window_size"]
        assert window.untyped_storage().nbytes() == window.numel() * window.element_size()
    stream.compress()
    stream.extend(ids[CONTEXT:])  # after the event: the kept keys, then the new ones
    for layer in stream.cache.layers:
        assert layer.keys.shape[-2] == CONTEXT // 2 + len(ids) - CONTEXT


def test_shared_prefixes_and_questions_are_read_once(model, ids):
    """Requests sharing prefills (and questions) through the walk equal each request read alone."""
    settings = resolve(policy="snapkv", evict_every="context", query_size=3, compression_ratio=0.5, start_size=0,
                       policy_params=SNAP, chunk_size=4)
    a, b = ids[:CONTEXT], ids[:30] + ids[CONTEXT:]
    requests = [(a, ids[CONTEXT:CONTEXT + 2]), (a, ids[CONTEXT + 2:]),  # one context: one event, one question read
                (a[:-1] + [5], ids[CONTEXT:]),  # same prefill, another question
                (b, ids[:3]),  # a shorter context sharing 30 tokens
                (ids[:2], ids[2:5])]  # a context of at most query_size tokens: nothing to compress
    shift = find_rotary(model)
    shared, stats = score_requests(model, requests, settings, shift)
    alone = [score_requests(model, [request], settings, shift, share=False)[0][0] for request in requests]
    assert [s.logprob for s in shared] == pytest.approx([s.logprob for s in alone], abs=TOL)
    assert stats.tokens_read < stats.tokens_unshared
    assert shared[0].evicted > 0 and shared[4].evicted == 0
    assert len(shared[0].kept_per_layer) == 2 and shared[0].kept_per_layer[0] == int((CONTEXT - 3) * 0.5)


def test_generation_reads_against_the_compressed_cache(model, ids, duo_pattern):
    """Greedy tokens are the argmax of the regime's own log-probabilities: scoring them as a continuation says greedy."""
    settings = resolve(policy="knorm", evict_every="context", query_size=2, compression_ratio=0.5, start_size=0)
    shift = find_rotary(model)
    tokens = engine_greedy(model, shift, ids[:CONTEXT], 6, settings)
    assert len(tokens) == 6
    scored, _ = score_requests(model, [(ids[:CONTEXT], tokens)], settings, shift)
    assert scored[0].is_greedy
    dense = resolve(policy="knorm", evict_every="context", query_size=2, compression_ratio=0.0, start_size=0)
    assert score_requests(model, [(ids[:CONTEXT], tokens)], dense, shift)[0][0].logprob != scored[0].logprob


def test_adapter_reports_the_regime(tiny_dir):
    """streaming_hf: the results file's config says evict_every=context, query_size and what each layer held after
    the events; a rolling task is refused at request time (tests/test_bad_inputs.py)."""
    from helpers.requests import pairs

    from streaming_lm import StreamingHFLM

    lm = StreamingHFLM(pretrained=str(tiny_dir), device="cpu", evict_every="context", query_size=2,
                       compression_ratio=0.5, policy="knorm", start_size=0)
    out = lm.loglikelihood(pairs(("one two three four five six seven eight nine ten", " eleven"),
                                 ("one two three four five six seven eight nine ten", " twelve")))
    assert len(out) == 2
    info = lm.get_model_info()["streaming"]
    assert info["evict_every"] == "context" and info["query_size"] == 2 and info["positions"] == "original"
    assert len(info["held_tokens_after_event_per_layer"]) == lm.model.config.num_hidden_layers
    assert info["evicted_tokens"] > 0


@pytest.mark.parametrize("policy, params, q", [("knorm", {}, 3), ("snapkv", SNAP, 2), ("sink_window", {}, 1),
                                               ("keydiff", {}, 4)])
def test_shifted_rerotates_the_kept_keys(model, ids, policy, params, q):
    """positions=shifted (kvpress's KeyRerotationPress): the engine's numbers are the definition's (helpers'
    ``rerotated_logprobs`` on the engine's own kept sets), the token method's equal the chunked one's, the kept sets
    are positions=original's, and with nothing evicted (r = 0) the numbers are original's."""
    from helpers.context_regime import rerotated_logprobs

    shift = find_rotary(model)
    context, continuation = ids[:CONTEXT], ids[CONTEXT:]

    def settings(positions, method="chunked", ratio=0.5):
        return resolve(policy=policy, policy_params=params, evict_every="context", query_size=q,
                       compression_ratio=ratio, start_size=0 if policy != "sink_window" else 2, positions=positions,
                       method=method, chunk_size=7)

    ours, kept = engine_logprobs(model, shift, context, continuation, settings("shifted"))
    token, kept_token = engine_logprobs(model, shift, context, continuation, settings("shifted", "token"))
    _, kept_original = engine_logprobs(model, shift, context, continuation, settings("original"))
    assert all((a == b).all() and (a == c).all() for a, b, c in zip(kept, kept_token, kept_original))
    assert all(row.sum() < CONTEXT - q for layer in kept for row in layer)  # it evicted
    reference = rerotated_logprobs(model, context, continuation, CONTEXT - q, kept)
    np.testing.assert_allclose(ours, reference, rtol=0, atol=TOL)
    np.testing.assert_allclose(token, ours, rtol=0, atol=TOL)
    original = engine_logprobs(model, shift, context, continuation, settings("original"))[0]
    assert max(abs(a - b) for a, b in zip(ours, original)) > 5 * TOL  # the keys did move
    dense = engine_logprobs(model, shift, context, continuation, settings("original", ratio=0.0))[0]
    np.testing.assert_allclose(engine_logprobs(model, shift, context, continuation, settings("shifted", ratio=0.0))[0],
                               dense, rtol=0, atol=TOL)


@pytest.mark.parametrize("method", ["chunked", "token"])
def test_the_keys_before_rope_are_recorded_as_the_projection_wrote_them(model, ids, method):
    """Leverage and Compactor score the prefill's keys before RoPE: recorded from each layer's k_proj while the prefill
    is read (one pass or a token at a time), in token order; the cached keys rotated back from their positions give
    the same up to float rounding. The event consumes them."""
    from streaming_lm.methods.prerope import before_rope
    from streaming_lm.streams import open_stream

    n = CONTEXT - 2
    settings = resolve(policy="leverage", evict_every="context", compression_ratio=0.5, start_size=0, query_size=2,
                       method=method, chunk_size=5, policy_params={"sketch_dimension": 8})
    shift = find_rotary(model)
    stream = open_stream(model, settings, shift)
    stream.extend(ids[:n])
    for layer in stream.cache.layers:
        recorded = torch.cat(layer.prerope, dim=1)
        assert recorded.shape == layer.keys[0].shape
        torch.testing.assert_close(recorded.float(), before_rope(shift, 1.0, layer.keys[0], torch.arange(n)),
                                   atol=1e-5, rtol=1e-5)
    stream.compress()
    assert all(layer.prerope == [] for layer in stream.cache.layers)
