"""Scored eviction policies (TOVA, H2O, key-norm, plug-ins) against the definition, on tiny models.

Every check is parametrised over ``SCORED`` (and both position modes): a new policy is tested by adding
its name there; the paths' own checks (tests/test_paths.py) run over ``streaming_lm.policy.POLICIES``.
"""

import dataclasses

import pytest
import torch
import transformers
from helpers import requests
from helpers.models import tiny_llama
from helpers.scored_reference import scored_logprobs

from streaming_lm import StreamingHFLM
from streaming_lm import policy as policy_mod
from streaming_lm import settings
from streaming_lm.continuation import score_continuations
from streaming_lm.generation import generate
from streaming_lm.policy import ScoredPolicy
from streaming_lm.rolling import score
from streaming_lm.settings import resolve
from streaming_lm.streams import open_stream
from streaming_lm.rotary import find_rotary

pytestmark = pytest.mark.usefixtures("one_thread")

SCORED = [name for name in settings.POLICIES if name != "sink_window"]
POSITIONS = ["shifted", "original"]
S, W, H = 2, 3, 4  # C = 9
N = 28  # 18 evictions


class OldestFirst(ScoredPolicy):
    """A plug-in for the tests: evicts the oldest unprotected token, i.e. a sink+window cache of W + H."""

    needs_attention = False

    def score(self, keys, values, attention):
        return torch.arange(keys.shape[1], dtype=torch.float32)


def gemma2_softcap():
    config = transformers.Gemma2Config(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=512, initializer_range=0.1,
        sliding_window=64, attn_logit_softcapping=1.0)
    torch.manual_seed(0)
    return transformers.Gemma2ForCausalLM(config).eval()


MODELS = {"llama-gqa": tiny_llama, "gemma2-softcap": gemma2_softcap}  # 2 query heads per key/value head


@pytest.fixture(scope="module", params=list(MODELS))
def model(request):
    return MODELS[request.param]()


@pytest.fixture(scope="module")
def ids():
    # Distinct tokens: a repeated token has the same layer-0 key norm, an exact tie in exact arithmetic that
    # float rounding (of keys rotated to different positions) breaks either way, here and in the reference.
    return torch.randperm(128, generator=torch.Generator().manual_seed(3))[:N]


def scored(name, positions, start=S, recent=W, heavy=H, **extra):
    return resolve(policy=name, start_size=start, recent_size=recent, heavy_size=heavy, positions=positions,
                   **extra)


def test_the_policy_names_agree():
    assert tuple(policy_mod.POLICIES) == settings.POLICIES
    for name, cls in policy_mod.POLICIES.items():
        assert cls.name == name and "arxiv.org" in cls.__doc__  # one small class per method, its paper cited


@pytest.mark.parametrize("positions", POSITIONS)
@pytest.mark.parametrize("name", SCORED)
def test_equals_the_naive_loop(model, ids, name, positions):
    reference = scored_logprobs(model, ids, name, S, W, H, positions)
    got = score(model, ids, scored(name, positions), find_rotary(model))
    torch.testing.assert_close(got.logprobs, reference, rtol=0, atol=2e-5)
    assert got.evicted == N - 1 - (S + W + H) and got.max_held == S + W + H


@pytest.mark.parametrize("positions", POSITIONS)
@pytest.mark.parametrize("name", SCORED)
def test_a_cache_as_long_as_the_stream_is_dense(model, ids, name, positions):
    got = score(model, ids, scored(name, positions, start=0, recent=0, heavy=N), find_rotary(model))
    dense = score(model, ids, resolve(start_size=0, recent_size=N, positions=positions, method="token"),
                  find_rotary(model))
    assert got.evicted == 0
    torch.testing.assert_close(got.logprobs, dense.logprobs, rtol=0, atol=2e-5)


@pytest.mark.parametrize("positions", POSITIONS)
@pytest.mark.parametrize("name", [*SCORED, "test_policies:OldestFirst"])
def test_no_heavy_slots_is_sink_window(model, ids, name, positions):
    sink_window = score(model, ids, resolve(start_size=S, recent_size=W + H, positions=positions, method="token"),
                        find_rotary(model))
    # With H = 0 the one unprotected token is t - W; the plug-in evicts the oldest unprotected one anyway.
    heavy = H if name.endswith("OldestFirst") else 0
    got = score(model, ids, scored(name, positions, recent=W + H - heavy, heavy=heavy), find_rotary(model))
    torch.testing.assert_close(got.logprobs, sink_window.logprobs, rtol=0, atol=2e-5)


@pytest.mark.parametrize("name", SCORED)
def test_exactly_c_keys_per_head_between_steps(ids, name):
    model = tiny_llama()
    stream = open_stream(model, scored(name, "shifted"), find_rotary(model))
    for t, token in enumerate(ids.tolist()):
        stream.step(token)
        for layer in stream.cache.layers:
            held = min(t + 1, S + W + H)
            assert layer.keys.shape[-2] == layer.values.shape[-2] == held
            assert all(len(set(row)) == held for row in layer.tokens.tolist())  # distinct tokens per head
            rows = layer.tokens.tolist()
            assert all(row[:S] == list(range(min(S, t + 1))) for row in rows)  # sinks never go
            assert all(row[-W:] == list(range(t + 1 - W, t + 1)) for row in rows if t + 1 >= S + W)  # nor recent
    assert stream.kv_bytes() == sum(layer.keys.nbytes + layer.values.nbytes for layer in stream.cache.layers)


@pytest.mark.parametrize("positions", POSITIONS)
@pytest.mark.parametrize("name", SCORED)
def test_requests_equal_the_token_loop(ids, name, positions):
    model, setting = tiny_llama(), scored(name, positions)
    shift = find_rotary(model)
    context, continuations = ids[:20].tolist(), [ids[20:].tolist(), ids[20:23].tolist()]
    for continuation, got in zip(continuations, score_continuations(model, context, continuations, setting, shift)):
        whole = score(model, context + continuation, setting, shift).logprobs
        assert got.logprob == pytest.approx(float(whole[len(context) - 1 :].double().sum()), abs=1e-5)
    tokens = generate(model, context, setting, shift, 12).tokens
    logits = open_stream(model, setting, shift).read(context + tokens[:-1])[len(context) - 1 :]
    assert logits.argmax(-1).tolist() == tokens  # greedy: each token the argmax of the stream so far


@pytest.mark.parametrize("chunk", [1, 5, 64])
@pytest.mark.parametrize("name", sorted(settings.CHUNKED_SCORED))
def test_the_chunked_path_equals_the_token_loop(name, chunk):
    model = tiny_llama()
    # Repeated tokens: their layer-0 key norms tie but for rounding, which differs between the two paths.
    ids = torch.randint(0, 40, (90,), generator=torch.Generator().manual_seed(5))
    setting = scored(name, settings.CHUNKED_SCORED[name], heavy=11)
    token = score(model, ids, dataclasses.replace(setting, method="token"), find_rotary(model))
    chunked = score(model, ids, dataclasses.replace(setting, method="chunked", chunk_size=chunk), find_rotary(model))
    torch.testing.assert_close(chunked.logprobs, token.logprobs, rtol=0, atol=1e-5)
    assert chunked.evicted == token.evicted == 90 - 1 - (S + W + 11) and chunked.max_held == S + W + 11


def test_plug_in_loads_and_bad_ones_are_refused():
    assert policy_mod.policy_class("test_policies:OldestFirst") is OldestFirst
    with pytest.raises(ValueError, match="cannot import module 'no_such_module'"):
        policy_mod.policy_class("no_such_module:Policy")
    with pytest.raises(ValueError, match="has no attribute 'Missing'"):
        policy_mod.policy_class("test_policies:Missing")
    with pytest.raises(ValueError, match="must subclass streaming_lm.policy.ScoredPolicy"):
        policy_mod.policy_class("dataclasses:dataclass")


def test_the_adapter_serves_every_request_type(tiny):
    """``streaming_hf`` with a scored policy: rolling, loglikelihood and generation, the engine's numbers."""
    model, tokenizer = tiny
    lm = StreamingHFLM(pretrained=model, tokenizer=tokenizer, policy="h2o", start_size=2, recent_size=8, heavy_size=8)
    assert (lm.streaming.positions, lm.streaming.method) == ("original", "chunked")  # the scored defaults
    text = "the quick brown fox jumps over the lazy dog " * 3
    (rolling,) = lm.loglikelihood_rolling(requests.rolling(text))
    token_loop = dataclasses.replace(lm.streaming, method="token")
    assert rolling == pytest.approx(float(score(model, lm.rolling_ids(text), token_loop, None).logprobs.double().sum()),
                                    abs=1e-4)
    [(logprob, _)] = lm.loglikelihood(requests.pairs((text, " again and again")))
    context, continuation = lm._encode_pair(text, " again and again")  # lm-eval's own split
    (expected,) = score_continuations(model, context, [continuation], token_loop, None)
    assert logprob == pytest.approx(expected.logprob, abs=1e-4)
    request = requests.generations((text, {"until": [], "max_gen_toks": 8}))
    token_lm = StreamingHFLM(pretrained=model, tokenizer=tokenizer, policy="h2o", start_size=2, recent_size=8,
                             heavy_size=8, method="token")
    [generated] = lm.generate_until(request)
    assert generated and generated == token_lm.generate_until(request)[0]
    assert lm.get_model_info()["streaming"]["policy"] == "h2o"
