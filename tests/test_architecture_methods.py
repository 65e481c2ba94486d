"""A method with an observation window (SnapKV) and one with per-head budgets (AdaKV) on every supported
architecture (issue #18 item 5).

On the tiny model of every type the chunked path serves (tests/test_architectures.py's ``model`` fixture), a
stream of N = 18 tokens with C = 5 and an event every 4 tokens (11 evictions per head, at three events):

- ``policy=snapkv`` (the segment's last ``window_size=2`` queries vote, pooled over 3 keys): the token loop equals
  the naive scored loop of tests/helpers/scored_reference.py in both position modes, the chunked path (original
  positions, the one mode it serves SnapKV in) and the decode steps equal the token loop, and a budget as long as
  the stream is dense;
- ``head_budgets=adaptive`` (AdaKV; original positions, the one mode it runs in) over SnapKV, which every type
  serving a scored policy serves: the token loop equals the naive loop with AdaKV's rule, each head's count after
  every step included, those counts differ somewhere, and the chunked path equals the token loop; over Expected Attention, on the types with one RoPE for
  every layer (refused elsewhere, asserted): the heads' counts differ and C is kept on average; a budget as long as
  the stream is dense for both.

The naive loop's shifted positions move a key with ``rotary.find_rotary``'s shift: the one piece taken from
streaming_lm, proven against each model's own rotation in test_architectures.py
(``test_rotary_shift_moves_keys_like_the_model``); which keys each query sees, the scores and the evictions are
the naive loop's own. gpt_oss refuses scored policies (its learned sink logits are not in their weights), and the
token-loop-only types (Falcon, MPT, BLOOM: attention in model code, which exposes no queries) refuse both methods:
those refusals are asserted instead. The last tests are bugs found here and fixed: between events a step attends to
C + K keys at positions up to C + K - 1, which the support checks used to bound by C (now ``keys_attended``).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import transformers
from helpers.reference import dense_logprobs, original_positions_logprobs
from helpers.scored_reference import scored_logprobs
from helpers.stepping import stepped
from test_architectures import ARCHITECTURES as ARCHITECTURE_CONFIGS
from test_architectures import _decoder, arch, build, model  # noqa: F401 (fixtures: the tiny model of every type)
from test_token_loop_architectures import ARCHITECTURES as TOKEN_LOOP_TYPES
from test_token_loop_architectures import ROTARY, models  # noqa: F401 (fixture)

from streaming_lm.rolling import score
from streaming_lm.rotary import find_rotary
from streaming_lm.settings import resolve
from streaming_lm.streams import open_stream
from streaming_lm.support import ARCHITECTURE_OF, check_model_supported

pytestmark = pytest.mark.usefixtures("one_thread")

N = 18  # tokens read: 17; events after 4, 8, 12 and 16 tokens
BUDGETS = (1, 0, 4)  # start, recent, heavy: C = 5 (C + K = 9 keys fit the tiny models' sliding windows of 32)
CAPACITY = sum(BUDGETS)
EVERY = 4
# Per head: 11 = 3 + 4 + 4, an event evicting at most the K = 4 tokens its segment added: three events evicted.
EVICTED = (N - 1) // EVERY * EVERY - CAPACITY
SNAPKV = {"window_size": 2, "kernel_size": 3}
ADAKV = SNAPKV | {"head_budgets": "adaptive", "alpha_safeguard": 0.25}
SHORT = 2 * EVERY + 2  # the dense check's stream: two events
CHUNK = 4  # passes end across the events at odd places
TOL = 2e-5
LEARNED_SINKS = "learned sink logits"  # gpt_oss: scored policies refused, not run without its sink logits


def test_every_supported_model_type_is_covered():
    """The chunked path's types through test_architectures.py's models, the token-loop-only types through
    test_token_loop_architectures.py's: together, every row of support.ARCHITECTURES."""
    covered = {config(128).model_type for config, _ in ARCHITECTURE_CONFIGS.values()}
    covered |= {config(64).model_type for config in TOKEN_LOOP_TYPES.values()}
    assert covered == set(ARCHITECTURE_OF)


def settings(params, positions, method="token", budgets=BUDGETS, policy="snapkv"):
    start, recent, heavy = budgets
    return resolve(policy=policy, policy_params=params, start_size=start, recent_size=recent, heavy_size=heavy,
                   evict_every=EVERY, positions=positions, method=method, chunk_size=CHUNK)


@pytest.fixture(scope="module")
def ids():
    # Distinct tokens: no two keys of layer 0 alike, so no scores tie but by the method's own choice.
    return torch.randperm(125, generator=torch.Generator().manual_seed(6))[:N] + 3


@pytest.fixture(scope="module")
def dense(model, ids):
    return dense_logprobs(model, ids)


@pytest.fixture(scope="module")
def snapkv_token_loop(arch, model, ids):
    """SnapKV's token loop per position mode, once per architecture (gpt_oss: None, refused)."""
    done = {}

    def run(positions):
        if positions not in done:
            done[positions] = None if arch == "gpt_oss" else score(model, ids, settings(SNAPKV, positions),
                                                                  find_rotary(model))
        return done[positions]
    return run


def rotate_like(model):
    """The naive loop's ``rotate`` for ``model``: each layer's rotary shift; keys of layers without RoPE, and
    learned absolute positions, never move."""
    shift = find_rotary(model)

    def rotate(x, delta, layer):
        one = shift.for_layer(layer) if shift is not None else None
        return x if one is None else one.rotate(x, delta)
    return rotate


def refused(arch, model, ids, setting) -> bool:
    """gpt_oss: the scored policy is refused on this path, with the reason; True when it was."""
    if arch != "gpt_oss":
        return False
    with pytest.raises(NotImplementedError, match=LEARNED_SINKS):
        score(model, ids, setting, find_rotary(model))
    return True


@pytest.mark.parametrize("positions", ["original", "shifted"])
def test_snapkv_token_loop_equals_the_naive_loop(arch, model, ids, dense, snapkv_token_loop, positions):
    if refused(arch, model, ids, settings(SNAPKV, positions)):
        return
    got = snapkv_token_loop(positions)
    assert got.evicted == EVICTED and got.max_held == CAPACITY + EVERY - 1  # evicted at events, none between
    expected = scored_logprobs(model, ids, "snapkv", *BUDGETS, positions, evict_every=EVERY, params=SNAPKV,
                               rotate=rotate_like(model))
    torch.testing.assert_close(got.logprobs, expected, rtol=0, atol=TOL)
    assert (got.logprobs - dense).abs().max() > 1e-2  # it streamed


def test_snapkv_chunked_equals_the_token_loop(arch, model, ids, snapkv_token_loop):
    chunked = settings(SNAPKV, "original", "chunked")
    if refused(arch, model, ids, chunked):
        return
    expected = snapkv_token_loop("original")
    got = score(model, ids, chunked, find_rotary(model))
    assert got.evicted == expected.evicted == EVICTED
    torch.testing.assert_close(got.logprobs, expected.logprobs, rtol=0, atol=TOL)


def test_snapkv_decode_steps_equal_the_token_loop(arch, model, ids, snapkv_token_loop):
    """Generation's path: a chunked read that ends inside a segment (6 tokens, events every 4), then one step per
    token; the window's queries span the read and the steps."""
    setting = settings(SNAPKV, "original", "chunked")
    if refused(arch, model, ids, setting):
        return
    stream = open_stream(model, setting, find_rotary(model))
    logits = torch.cat([stream.read(ids[:6])] + [stream.step(int(token))[None] for token in ids[6:-1]])
    got = torch.log_softmax(logits, -1).gather(-1, ids[1:, None])[:, 0]
    token = snapkv_token_loop("original")
    torch.testing.assert_close(got, token.logprobs, rtol=0, atol=TOL)
    assert stream.evicted == token.evicted == EVICTED


@pytest.mark.parametrize("name", ["gemma2", "granite"])
def test_snapkv_votes_with_the_model_scale_not_kvpress_s(name, ids):
    """SnapKV's window attention uses the model's own attention scaling (the attention the model computes; no
    soft-cap; docs/methods.md), not kvpress's fixed 1/sqrt(head_dim): gemma2 (query_pre_attn_scalar) and granite
    (attention_multiplier) scale otherwise, so there the two choices evict differently. The engine equals the naive
    loop with the model's scale and differs from it with kvpress's (on default-scaled models the two agree, and
    kvpress's own numbers stand: tests/test_context_kvpress.py)."""
    model = build(name)
    got = score(model, ids, settings(SNAPKV, "original"), find_rotary(model))
    by_scale = scored_logprobs(model, ids, "snapkv", *BUDGETS, "original", evict_every=EVERY, params=SNAPKV)
    by_kvpress = scored_logprobs(model, ids, "snapkv", *BUDGETS, "original", evict_every=EVERY, params=SNAPKV,
                                 snapkv_votes="kvpress")
    torch.testing.assert_close(got.logprobs, by_scale, rtol=0, atol=TOL)
    assert (got.logprobs - by_kvpress).abs().max() > 1e-2


def check_head_budgets(counts) -> None:
    """The heads' budgets did differ somewhere (where a layer has several key/value heads: Falcon-7B's one is shared
    by every query head), and at every event the heads of a layer kept C on average."""
    several = any(len(heads) > 1 for step in counts for heads in step)
    assert not several or any(len(set(heads)) > 1 for step in counts for heads in step)
    for event in range(EVERY, N, EVERY):
        assert all(sum(heads) <= CAPACITY * len(heads) for heads in counts[event - 1])
    assert all(sum(heads) == CAPACITY * len(heads) for heads in counts[(N - 1) // EVERY * EVERY - 1])


def test_adakv_token_loop_equals_the_naive_loop(arch, model, ids, dense):
    setting = settings(ADAKV, "original")
    if refused(arch, model, ids, setting):
        return
    got, counts, evicted = stepped(model, ids, setting)
    assert evicted == EVICTED  # per head on average
    trace = []
    expected = scored_logprobs(model, ids, "snapkv", *BUDGETS, "original", evict_every=EVERY, params=ADAKV,
                               trace=trace)
    torch.testing.assert_close(got, expected, rtol=0, atol=TOL)
    assert counts == trace  # every head of every layer holds what the definition says after every step
    check_head_budgets(counts)
    assert (got - dense).abs().max() > 1e-2
    # The chunked path (rows in order; passes end across the events) is the token loop.
    chunked = score(model, ids, dataclasses.replace(setting, method="chunked", chunk_size=CHUNK), find_rotary(model))
    torch.testing.assert_close(chunked.logprobs, got, rtol=0, atol=TOL)


# Expected Attention un-rotates the segment's queries with the model's one RoPE: refused without one.
EXPECTED_ATTENTION = {"n_future_positions": 16, "n_sink": 0, "head_budgets": "adaptive", "alpha_safeguard": 0.25}
ONE_ROPE = r"policy=expected_attention needs one rotary embedding for every layer \(RoPE\); {cls} has {what}"
EXPECTED_ATTENTION_REFUSED = {"gpt2": "none"} | {name: "different ones by layer" for name in (
    "gemma3-local-global", "exaone4-hybrid", "smollm3", "cohere2")}  # local/global RoPE, layers without RoPE


def test_adakv_on_expected_attention_where_one_rope_serves_it(arch, model, ids, dense):
    """AdaKV over Expected Attention, on every type with one RoPE for every layer (every layout: interleaved,
    partial, scaled): its events evict, its heads keep different counts, C on average, and a budget as long as the
    stream is dense. The naive loop has no Expected Attention (its scores are checked against kvpress in
    test_compression_math.py, its observation in test_method_observation.py); the refusals are asserted."""
    setting = settings(EXPECTED_ATTENTION, "original", policy="expected_attention")
    if arch in EXPECTED_ATTENTION_REFUSED:
        message = ONE_ROPE.format(cls=type(model).__name__, what=EXPECTED_ATTENTION_REFUSED[arch])
        with pytest.raises(ValueError, match=message):
            score(model, ids, setting, find_rotary(model))
        return
    if refused(arch, model, ids, setting):
        return
    got, counts, evicted = stepped(model, ids, setting)
    assert evicted == EVICTED  # per head on average
    check_head_budgets(counts)
    assert (got - dense).abs().max() > 1e-2
    short = ids[:SHORT]
    whole = score(model, short, settings(EXPECTED_ATTENTION, "original", budgets=(1, 0, SHORT),
                                         policy="expected_attention"), find_rotary(model))
    assert whole.evicted == 0
    torch.testing.assert_close(whole.logprobs, dense_logprobs(model, short), rtol=0, atol=TOL)


@pytest.mark.parametrize("method, positions, params", [
    ("token", "shifted", SNAPKV), ("chunked", "original", SNAPKV), ("token", "original", ADAKV)],
    ids=["snapkv-token-shifted", "snapkv-chunked-original", "adakv-token-original"])
def test_a_budget_as_long_as_the_stream_is_dense(arch, model, ids, method, positions, params):
    """Events fall (after 4 and 8 tokens) but never find more than C: nothing is evicted, the numbers are dense.
    (SnapKV's token loop in original positions is AdaKV's path less the budgets: the naive loop proves it above.)"""
    short = ids[:SHORT]
    setting = settings(params, positions, method, budgets=(1, 0, SHORT))
    if refused(arch, model, short, setting):
        return
    got = score(model, short, setting, find_rotary(model))
    assert got.evicted == 0
    torch.testing.assert_close(got.logprobs, dense_logprobs(model, short), rtol=0, atol=TOL)


# --- the token-loop-only types: their own attention code exposes no queries ----------------------------

QUERIES_REFUSED = r"policy={policy} scores with the queries of each segment, which {cls}'s own attention code " \
                  r"does not expose .*use a policy that scores by weights or keys"
ALIBI_ORIGINAL = r"positions=original cannot serve {type} \(ALiBi\).*Use positions=shifted"
TOKEN_LOOP_CASES = [
    ("snapkv", SNAPKV, "shifted"), ("snapkv", SNAPKV, "original"), ("snapkv", ADAKV, "original"),
    ("expected_attention", {"n_future_positions": 8, "n_sink": 1, "head_budgets": "adaptive"}, "original"),
]


@pytest.mark.parametrize("policy, params, positions", TOKEN_LOOP_CASES,
                         ids=["snapkv-shifted", "snapkv-original", "adakv-snapkv", "adakv-expected"])
@pytest.mark.parametrize("name", [name for name in TOKEN_LOOP_TYPES if name not in ROTARY])
def test_token_loop_types_refuse_methods_scored_by_queries(models, name, policy, params, positions):
    """The attention of MPT, BLOOM and falcon-rw does not reach the engine's functions (model code; ALiBi in the
    mask): it hands a scored policy its weights (output_attentions), never its queries, so SnapKV and AdaKV are
    refused when the stream opens, naming the policy and what serves instead; these ALiBi types refuse original
    positions first, whatever the policy. (Falcon with RoPE reaches them: test_architectures.py's models.)"""
    model = models[name]
    setting = settings(params, positions, policy=policy)
    if positions == "original" and name not in ROTARY:
        with pytest.raises(NotImplementedError, match=ALIBI_ORIGINAL.format(type=model.config.model_type)):
            check_model_supported(model, setting)
        return
    check_model_supported(model, setting)  # the type and position mode are served: the policy is what is refused
    with pytest.raises(ValueError, match=QUERIES_REFUSED.format(policy=policy, cls=type(model).__name__)):
        score(model, torch.arange(3, 3 + N), setting, find_rotary(model))


# --- sliding windows between events -------------------------------------------------------------------


def test_a_sliding_window_of_c_plus_1_between_events(one_thread):
    """Mistral with sliding_window = C + 1, the smallest window check_model_supported accepts, and an event every 4
    tokens: either the settings are refused, naming the window, or the token loop and the decode steps give the
    masked dense pass of the definition (docs/semantics.md, "Events")."""
    start, recent = 2, 4
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(
        transformers.MistralConfig(**_decoder(128), sliding_window=start + recent + 1)).eval()
    stream_ids = torch.randperm(125, generator=torch.Generator().manual_seed(6))[:30] + 3
    setting = resolve(start_size=start, recent_size=recent, evict_every=EVERY, positions="original", method="token")
    try:
        check_model_supported(model, setting)
    except NotImplementedError as error:
        assert "sliding" in str(error) and "evict_every" in str(error)
        return
    expected = original_positions_logprobs(model, stream_ids, start, recent, EVERY)
    token = score(model, stream_ids, setting, find_rotary(model))
    torch.testing.assert_close(token.logprobs, expected, rtol=0, atol=TOL)
    stream = open_stream(model, dataclasses.replace(setting, method="chunked", chunk_size=CHUNK), find_rotary(model))
    logits = torch.cat([stream.read(stream_ids[:9])] + [stream.step(int(t))[None] for t in stream_ids[9:-1]])
    decoded = torch.log_softmax(logits, -1).gather(-1, stream_ids[1:, None])[:, 0]
    torch.testing.assert_close(decoded, expected, rtol=0, atol=TOL)


# --- positions between events: shifted positions reach C + K - 1 -------------------------------------

POSITIONS_BEYOND = {
    # learned positions 0..63; C = 20 < 64 is accepted, but an event every 50 tokens reads tokens at slot 69
    "gpt2": (lambda: transformers.GPT2Config(vocab_size=128, n_embd=32, n_layer=1, n_head=2, n_positions=64,
                                             bos_token_id=1, eos_token_id=2), 50),
    # dynamic RoPE, fixed below 512: C + max(chunk_size, 256) = 276 < 512 is accepted, but slots reach 539
    "llama-dynamic": (lambda: ARCHITECTURE_CONFIGS["llama-dynamic"][0](128), 540),
    # a rotary table of 512 positions: the same bound, the same reach
    "gptj": (lambda: ARCHITECTURE_CONFIGS["gptj"][0](128), 540),
}


@pytest.mark.parametrize("name", list(POSITIONS_BEYOND))
def test_positions_between_events_stay_where_the_model_has_them(name, one_thread):
    """Shifted positions reach min(e, C) + t - e <= C + K - 1 (docs/semantics.md, "Events"): settings whose
    positions pass the model's learned or fixed-frequency positions are refused before anything is read."""
    config, every = POSITIONS_BEYOND[name]
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config()).eval()
    setting = resolve(start_size=4, recent_size=16, evict_every=every, positions="shifted", method="token")
    with pytest.raises(NotImplementedError, match="evict_every"):
        check_model_supported(model, setting)


def test_mpt_bias_table_holds_the_keys_between_events():
    """MPT with max_seq_len = 16 and C = 12 (C + 1 = 13 keys fit), an event every 6 tokens (18 keys): refused."""
    mpt = transformers.AutoModelForCausalLM.from_config(transformers.MptConfig(
        vocab_size=64, d_model=32, n_layers=1, n_heads=2, max_seq_len=16, bos_token_id=1, eos_token_id=2)).eval()
    setting = resolve(start_size=3, recent_size=9, evict_every=6, positions="shifted", method="token")
    with pytest.raises(NotImplementedError, match="evict_every"):
        check_model_supported(mpt, setting)


def test_model_code_attention_refuses_duo_every_k(tmp_path):
    """duo every K tokens holds different tokens in different heads; a model whose attention runs in its own code
    (here a Llama whose second layer bypasses transformers' attention interface) cannot mask the padding of the
    heads holding fewer, so the stream refuses when it opens (evict_every=context serves it where the interface
    is reached)."""
    from helpers.models import bypassing_llama
    from streaming_lm.forward_args import num_decoder_layers

    model = bypassing_llama()
    kv_heads = model.config.num_key_value_heads
    (tmp_path / "config.json").write_text('{"sink_size": 1, "recent_size": 2}')
    rows = ["\t".join(["0.5"] * kv_heads)] * num_decoder_layers(model)
    (tmp_path / "full_attention_heads.tsv").write_text("\n".join(rows))
    setting = resolve(policy="duo", policy_params={"pattern": str(tmp_path)}, evict_every=2, positions="original",
                      method="token")
    with pytest.raises(ValueError, match=rf"policy=duo holds different tokens in different heads, which "
                                         rf"{type(model).__name__}'s own attention code cannot mask"):
        score(model, torch.arange(3, 3 + N), setting, find_rotary(model))
