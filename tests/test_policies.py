"""Scored eviction policies (TOVA, H2O, key-norm, plug-ins) against the definition, on tiny models.

Every check is parametrised over ``SCORED`` (and both position modes): a new policy is tested by adding
its name there; the paths' own checks (tests/test_paths.py) run over ``streaming_lm.methods.POLICIES``.
"""

import dataclasses
import re

import pytest
import torch
import transformers
from helpers import requests
from helpers.models import tiny_llama
from helpers.scored_reference import scored_logprobs

from streaming_lm import StreamingHFLM
from streaming_lm import methods as policy_mod
from streaming_lm import settings
from streaming_lm.methods.wrappers import WRAPPER_PARAMS
from streaming_lm.continuation import score_continuations
from streaming_lm.generation import generate
from streaming_lm.methods import ScoredPolicy
from streaming_lm.rolling import score
from streaming_lm.settings import resolve
from streaming_lm.streams import open_stream
from streaming_lm.rotary import find_rotary

pytestmark = pytest.mark.usefixtures("one_thread")


POSITIONS = ["shifted", "original"]


def serves_every_token(name: str) -> bool:
    """Whether the policy serves ``evict_every=1`` (the per-token rule these checks are about) in both position
    modes. A method that observes a window of each segment (snapkv) needs longer segments, one that un-rotates
    queries (expected_attention) original positions: tests/test_schedule.py's table covers them."""
    try:
        for positions in POSITIONS:
            resolve(policy=name, heavy_size=1, positions=positions, method="token")
    except ValueError:
        return False
    return True


SCORED = [name for name in settings.SCORED if serves_every_token(name)]
# Scored policies the chunked path serves, with the position mode it serves them in (the registry's answer).
CHUNKED_SCORED = {name: policy_mod.POLICIES[name].paths["chunked"][0] for name in SCORED
                  if "chunked" in policy_mod.POLICIES[name].paths}
S, W, H = 2, 3, 4  # C = 9
N = 28  # 18 evictions


class OldestFirst(ScoredPolicy):
    """A plug-in for the tests: evicts the oldest unprotected token, i.e. a sink+window cache of W + H."""

    observes = frozenset()

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
        # one small class per method, its paper cited (a baseline with none: its reference implementation)
        assert cls.name == name and ("arxiv.org" in cls.__doc__ or "(no paper)" in cls.__doc__ and "https://" in
                                     cls.__doc__)


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
@pytest.mark.parametrize("name", sorted(CHUNKED_SCORED))
def test_the_chunked_path_equals_the_token_loop(name, chunk):
    model = tiny_llama()
    # Repeated tokens: their layer-0 key norms tie but for rounding, which differs between the two paths.
    ids = torch.randint(0, 40, (90,), generator=torch.Generator().manual_seed(5))
    setting = scored(name, CHUNKED_SCORED[name], heavy=11)
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
    with pytest.raises(ValueError, match="must subclass streaming_lm.methods.ScoredPolicy"):
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


# ---------------------------------------------------------------- the registry and policy parameters


def test_every_policy_declares_what_it_is():
    for name, cls in policy_mod.POLICIES.items():
        assert cls.name == name and cls.kind in ("index", "heads", "scored")
        assert all(isinstance(param, policy_mod.Param) for param in cls.params)
        assert cls.default_positions in settings.POSITIONS and "token" in cls.paths
        assert all(m in settings.METHODS and set(p) <= set(settings.POSITIONS) for m, p in cls.paths.items())
        settings.check_declarations(cls, name)
        # the defaults a user gets are served exactly
        method = settings.default_method(name, cls.default_positions)
        assert cls.default_positions in cls.paths[method]


def test_the_registry_imports_no_torch():
    import subprocess
    import sys

    code = ("import sys, streaming_lm.settings as s; s.resolve(policy='tova', heavy_size=4); "
            "s.pop_policy_params('knorm', {}); assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


PLUGIN = "helpers.policies:Recency"
WRAPPERS = {param.name: param.default for param in WRAPPER_PARAMS}  # ChunkKV and CriticalKV, off


def test_policy_parameters_are_resolved_checked_and_reach_the_policy(ids):
    setting = resolve(policy=PLUGIN, start_size=S, recent_size=W, heavy_size=H, policy_params={"step": "-2"})
    # parsed, defaults filled, in order: its own, then the wrappers every scored method takes (methods/wrappers.py)
    assert setting.policy_params == {"step": -2.0, "label": "plain"} | WRAPPERS
    assert list(setting.policy_params) == ["step", "label", *WRAPPERS]
    assert setting.as_dict()["policy_params"] == {"step": -2.0, "label": "plain"} | WRAPPERS  # the results file's
    model = tiny_llama()
    assert open_stream(model, setting, find_rotary(model)).policy.step == -2.0
    with pytest.raises(ValueError, match="step must not be 0"):
        resolve(policy=PLUGIN, policy_params={"step": 0})
    with pytest.raises(ValueError, match="label must be one of plain, fancy; got 'odd'"):
        resolve(policy=PLUGIN, policy_params={"label": "odd"})
    with pytest.raises(ValueError, match=r"policy=helpers.policies:Recency has no parameter 'steps'; "
                                         r"its parameters: step, label"):
        resolve(policy=PLUGIN, policy_params={"steps": 1})
    with pytest.raises(ValueError, match="policy=tova has no parameter 'step'; its parameters: chunk_length, critical, "):
        resolve(policy="tova", policy_params={"step": 1})


def test_a_parameter_changes_the_numbers(ids):
    model, shift = tiny_llama(), None
    shift = find_rotary(model)
    setting = dict(policy=PLUGIN, start_size=S, recent_size=W, heavy_size=H, positions="original")
    oldest = score(model, ids, resolve(**setting), shift).logprobs
    newest = score(model, ids, resolve(**setting, policy_params={"step": -1}), shift).logprobs
    sink_window = score(model, ids, resolve(start_size=S, recent_size=W + H, positions="original", method="token"),
                        shift).logprobs
    torch.testing.assert_close(oldest, sink_window, rtol=0, atol=2e-5)
    assert (newest - oldest).abs().max() > 1e-3


def test_parameters_are_model_args_refused_before_loading(tiny, monkeypatch):
    from helpers.policies import Recency

    model, tokenizer = tiny
    lm = StreamingHFLM(pretrained=model, tokenizer=tokenizer, policy=PLUGIN, start_size=2, recent_size=8,
                       heavy_size=8, step=-1.5)
    assert lm.streaming.policy_params == {"step": -1.5, "label": "plain"} | WRAPPERS
    assert lm.get_model_info()["streaming"]["policy_params"] == {"step": -1.5, "label": "plain"} | WRAPPERS
    nowhere = "/nonexistent/model"  # refused before anything loads
    with pytest.raises(ValueError, match="has no parameter 'stpe'; did you mean 'step'"):
        StreamingHFLM(pretrained=nowhere, policy=PLUGIN, stpe=2)
    # A parameter of another registered policy, given to one that lacks it.
    monkeypatch.setitem(policy_mod.POLICIES, "recency", Recency)
    with pytest.raises(ValueError, match=r"policy=tova has no parameter 'step' \(it is a parameter of recency\); "
                                         "its parameters: chunk_length, critical, "):
        StreamingHFLM(pretrained=nowhere, policy="tova", step=2)


def test_parameters_are_grid_axes():
    from streaming_lm import compare
    from streaming_lm.compare.errors import CompareError

    runs = compare.build_grid(["0"], ["4"], [], [], policies=["tova", PLUGIN], heavy_sizes=["8"],
                              params={"step": ["1", "-1"]})
    assert [r.name for r in runs] == ["hf", "streaming_tova_s0_r4_h8_original",
                                      "streaming_helpers-policies-Recency_s0_r4_h8_original_step1.0",
                                      "streaming_helpers-policies-Recency_s0_r4_h8_original_step-1.0"]
    assert runs[3].stream["step"] == -1.0  # validated, passed on as a model arg
    with pytest.raises(CompareError, match="--param window: no policy of the grid has it"):
        compare.build_grid(["0"], ["4"], [], [], policies=["tova"], params={"window": ["1"]})
    with pytest.raises(CompareError, match="step must not be 0"):
        compare.build_grid(["0"], ["4"], [], [], policies=[PLUGIN], params={"step": ["0"]})


@pytest.mark.parametrize("param,given,expected", [
    (policy_mod.Param("w", int, 64, "", minimum=1), "32", 32),
    (policy_mod.Param("w", int, 64, "", minimum=1), 0, "w must be an integer >= 1, got 0"),
    (policy_mod.Param("w", int, 64, "", minimum=1), 2.5, "w must be an integer >= 1, got 2.5"),
    (policy_mod.Param("r", float, 0.5, "", minimum=0.0), "0.25", 0.25),
    (policy_mod.Param("r", float, 0.5, "", minimum=0.0), "half", "r must be a number >= 0.0, got 'half'"),
    (policy_mod.Param("flag", bool, False, ""), "true", True),
    (policy_mod.Param("flag", bool, False, ""), 1, "flag must be true or false, got 1"),
    (policy_mod.Param("path", str, "", ""), "/a/b", "/a/b"),
    (policy_mod.Param("path", str, "", ""), 3, "path must be a string, got 3"),
])
def test_a_parameter_is_parsed_as_its_kind(param, given, expected):
    """lm-eval hands model args as int/float/bool/str, the compare grid as strings: one parse for both."""
    if isinstance(expected, str) and expected.startswith(param.name + " must"):
        with pytest.raises(ValueError, match=re.escape(expected)):
            param.parse(given)
    else:
        assert param.parse(given) == expected and type(param.parse(given)) is param.kind


@pytest.fixture(scope="module")
def llama():
    return tiny_llama()


@pytest.mark.parametrize("method, every", [("token", 1), ("chunked", 1), ("chunked", 3)])
def test_an_event_that_cannot_reach_the_budget_raises(llama, method, every):
    """A plug-in that keeps more tokens than C (infinite scores) makes an event unable to evict down to C: the
    storage raises instead of keeping more (built-in policies are refused before that by their settings checks)."""
    model = llama
    setting = resolve(policy="helpers.policies:Keeper", policy_params={"keep": 6}, start_size=0, recent_size=0,
                      heavy_size=4, evict_every=every, positions="original", method=method)
    with pytest.raises(RuntimeError, match="fewer are evictable: the tokens it never evicts"):
        score(model, torch.arange(3, 20), setting, find_rotary(model))
    fits = dataclasses.replace(setting, policy_params={"keep": 2})
    assert score(model, torch.arange(3, 20), fits, find_rotary(model)).evicted > 0


def test_chunk_size_defaults_to_the_policys():
    """chunk_size left out is the policy's ``default_chunk_size`` (sink_window's mask-only path: longer passes; a
    scored path decides its rows one by one: shorter ones); given, it is the user's for every policy."""
    from streaming_lm.methods import POLICIES

    assert resolve().chunk_size == POLICIES["sink_window"].default_chunk_size == 256
    assert resolve(policy="knorm", heavy_size=8).chunk_size == POLICIES["knorm"].default_chunk_size == 128
    assert resolve(policy="knorm", evict_every="context", compression_ratio=0.5).chunk_size == 128
    assert resolve(chunk_size=64).chunk_size == resolve(policy="knorm", heavy_size=8, chunk_size=64).chunk_size == 64
