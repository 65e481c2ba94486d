"""Every supported architecture on a tiny random model, and a clear refusal of the rest (issue #7).

For each model type the chunked path serves (``streaming_lm.support.ARCHITECTURES``; the token-loop-only
types are in test_token_loop_architectures.py): a stream of C + 1 tokens gives
the dense model's numbers (token loop and chunked path), the chunked path gives the token loop's numbers
on a stream of 4.5 C tokens in both position modes, the cache stays within C, ``original`` equals the
independent masked single pass of tests/helpers/reference.py, ``shifted`` is what docs/semantics.md says, and the
lm-eval adapter equals dense ``hf`` on a short request. The weights are drawn with a larger spread than
transformers' default (0.02), so that attention is sharp and positions change log-probs by O(1).
"""

import copy
import dataclasses
import inspect
import sys

import pytest
import torch
import transformers
from lm_eval.models.huggingface import HFLM
from helpers.models import save_tiny, tiny_tokenizer
from helpers.requests import rolling
from helpers.engine import score_stream, score_stream_chunked
from helpers.reference import (
    dense_logprobs,
    original_positions_logprobs,
    perplexity,
    shifted_llama_logprobs,
    shifted_one_layer_logprobs,
    sink_window_mask,
)

from streaming_lm import StreamingHFLM
from streaming_lm.rotary import LayerShifts
from streaming_lm.rotary import find_rotary
from streaming_lm.support import ARCHITECTURE_OF, REFUSED_ARCHITECTURES, check_model_supported
from streaming_lm.rolling import score
from streaming_lm.settings import StreamingSettings
from streaming_lm.streams import open_stream
from streaming_lm.storage import static

START, RECENT, CHUNK = 4, 16, 7  # C = 20; chunks of 7 cross the eviction boundary at odd places
CAPACITY = START + RECENT
LONG = 90  # 4.5 C: 69 evictions
WINDOW = 32  # sliding windows of the tiny models: >= C + 1, so a sink+window cache can stand in for them
TOL = 2e-5  # float32; measured differences are ~2e-6


def _decoder(vocab, **extra):
    return dict(
        vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, initializer_range=0.1,
        bos_token_id=1, eos_token_id=2, pad_token_id=0,
    ) | extra


def _falcon(vocab, **extra):
    return transformers.FalconConfig(vocab_size=vocab, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                     initializer_range=0.1, bos_token_id=1, eos_token_id=2, **extra)


def _one_rope(theta=10000.0):
    return {"rope_type": "default", "rope_theta": theta}


# name -> (config from vocabulary size, rotary dimensions RotaryShift must find: None = no RoPE)
ARCHITECTURES = {
    "llama": (lambda v: transformers.LlamaConfig(**_decoder(v)), 16),
    "mistral": (lambda v: transformers.MistralConfig(**_decoder(v), sliding_window=None), 16),
    "mistral-window": (lambda v: transformers.MistralConfig(**_decoder(v), sliding_window=WINDOW), 16),
    "qwen2": (lambda v: transformers.Qwen2Config(**_decoder(v)), 16),
    "qwen3": (lambda v: transformers.Qwen3Config(**_decoder(v), head_dim=16), 16),
    # Like Phi-3-mini-4k: a sliding window on every layer; half of each head rotated.
    "phi3": (lambda v: transformers.Phi3Config(
        **_decoder(v), sliding_window=WINDOW + 16,
        rope_parameters=_one_rope() | {"partial_rotary_factor": 0.5}), 8),
    # Frequencies fixed below original_max_position_embeddings (short factors), YaRN-like attention factor.
    "phi3-longrope": (lambda v: transformers.Phi3Config(
        **_decoder(v) | {"max_position_embeddings": 4096}, original_max_position_embeddings=512,
        rope_parameters=_one_rope() | {
            "rope_type": "longrope", "short_factor": [1.0 + i / 8 for i in range(8)], "long_factor": [4.0] * 8}), 16),
    "llama-dynamic": (lambda v: transformers.LlamaConfig(  # fixed below max_position_embeddings
        **_decoder(v), rope_parameters=_one_rope() | {"rope_type": "dynamic", "factor": 2.0}), 16),
    # Layers alternate sliding / full; a soft-cap small enough to matter in a tiny model.
    "gemma2": (lambda v: transformers.Gemma2Config(
        **_decoder(v), head_dim=16, sliding_window=WINDOW, attn_logit_softcapping=1.0), 16),
    "gemma3": (lambda v: transformers.Gemma3TextConfig(
        **_decoder(v), head_dim=16, sliding_window=WINDOW, layer_types=["sliding_attention", "full_attention"],
        rope_parameters={"sliding_attention": _one_rope(), "full_attention": _one_rope()}), 16),
    # As released: local RoPE base 10k on sliding layers, 1M on global ones (one shift per layer).
    "gemma3-local-global": (lambda v: transformers.Gemma3TextConfig(
        **_decoder(v), head_dim=16, sliding_window=WINDOW, layer_types=["sliding_attention", "full_attention"],
        rope_parameters={"sliding_attention": _one_rope(), "full_attention": _one_rope(1e6)}), 16),
    "gpt_neox": (lambda v: transformers.GPTNeoXConfig(**_decoder(v)), 4),  # rotary_pct 0.25
    "phi": (lambda v: transformers.PhiConfig(**_decoder(v), qk_layernorm=True), 8),  # phi-2: partial 0.5
    "olmo": (lambda v: transformers.OlmoConfig(**_decoder(v), clip_qkv=2.0), 16),
    "olmo2": (lambda v: transformers.Olmo2Config(**_decoder(v)), 16),  # q/k RMSNorm over all heads
    "olmo3": (lambda v: transformers.Olmo3Config(
        **_decoder(v), sliding_window=WINDOW, layer_types=["sliding_attention", "full_attention"]), 16),
    # Every multiplier away from 1, so that dropping one would show.
    "granite": (lambda v: transformers.GraniteConfig(
        **_decoder(v), embedding_multiplier=2.0, attention_multiplier=0.5, residual_multiplier=0.7,
        logits_scaling=3.0), 16),
    "starcoder2": (lambda v: transformers.Starcoder2Config(**_decoder(v), sliding_window=WINDOW), 16),
    "ministral": (lambda v: transformers.MinistralConfig(
        **_decoder(v), head_dim=16, sliding_window=WINDOW, layer_types=["sliding_attention", "full_attention"]), 16),
    "exaone4": (lambda v: transformers.Exaone4Config(
        **_decoder(v), sliding_window=None, layer_types=["full_attention"] * 2), 16),
    # Layers without RoPE (their keys never move): exaone4's global layers, smollm3's no_rope_layers.
    "exaone4-hybrid": (lambda v: transformers.Exaone4Config(
        **_decoder(v), sliding_window=WINDOW, layer_types=["sliding_attention", "full_attention"]), 16),
    "smollm3": (lambda v: transformers.SmolLM3Config(**_decoder(v), no_rope_layers=[1, 0]), 16),
    # MoE: every token routed alone, so chunking cannot change the experts a token meets.
    "mixtral": (lambda v: transformers.MixtralConfig(**_decoder(v), num_local_experts=4, num_experts_per_tok=2), 16),
    "qwen2_moe": (lambda v: transformers.Qwen2MoeConfig(
        **_decoder(v), num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
        shared_expert_intermediate_size=32), 16),
    "qwen3_moe": (lambda v: transformers.Qwen3MoeConfig(
        **_decoder(v), head_dim=16, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32), 16),
    # Interleaved pairs (2i, 2i + 1); cohere with its logit scale, glm/glm4 partial (half of each head).
    "cohere": (lambda v: transformers.CohereConfig(**_decoder(v), logit_scale=0.5, use_qk_norm=True), 16),
    "helium": (lambda v: transformers.HeliumConfig(**_decoder(v), head_dim=16), 16),
    "glm": (lambda v: transformers.GlmConfig(**_decoder(v), head_dim=16), 8),
    "glm4": (lambda v: transformers.Glm4Config(**_decoder(v), head_dim=16), 8),
    "cohere2": (lambda v: transformers.Cohere2Config(  # interleaved RoPE on sliding layers, none on global ones
        **_decoder(v), sliding_window=WINDOW, layer_types=["sliding_attention", "full_attention"], logit_scale=1.0), 16),
    "gptj": (lambda v: transformers.GPTJConfig(
        vocab_size=v, n_embd=64, n_layer=2, n_head=4, rotary_dim=8, n_positions=512, initializer_range=0.1,
        bos_token_id=1, eos_token_id=2), 8),
    # Learned sink logits in every softmax, YaRN RoPE, MoE; its released window (128) shrunk like the others.
    "gpt_oss": (lambda v: transformers.GptOssConfig(
        **_decoder(v), head_dim=16, num_local_experts=4, num_experts_per_tok=2, sliding_window=WINDOW,
        layer_types=["sliding_attention", "full_attention"], rope_parameters={
            "rope_type": "yarn", "rope_theta": 150000.0, "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0,
            "truncate": False, "original_max_position_embeddings": 16}), 16),
    "gpt2": (lambda v: transformers.GPT2Config(
        vocab_size=v, n_embd=64, n_layer=2, n_head=4, n_positions=512, initializer_range=0.1,
        bos_token_id=1, eos_token_id=2), None),
    # The StreamingLLM paper's Falcon: its attention reaches transformers' interface since 5.25 (through a decoder
    # layer that drops the forward's keyword arguments: the engine hands its plan over in a context variable).
    "falcon-7b-style": (lambda v: _falcon(v, multi_query=True, parallel_attn=True), 16),
    "falcon-40b-style": (lambda v: _falcon(v, new_decoder_architecture=True, num_kv_heads=2), 16),
    # A decoder layer that drops the forward's keyword arguments (refused while the plan travelled in them).
    "stablelm": (lambda v: transformers.StableLmConfig(**_decoder(v), qk_layernorm=True), 4),  # partial 0.25
}
INTERLEAVED = {"cohere", "cohere2", "helium", "glm", "glm4", "gptj"}  # the layout RotaryShift must read off the model
SLIDING = {"mistral-window", "phi3", "gemma2", "gemma3", "gemma3-local-global", "olmo3", "starcoder2", "ministral",
           "exaone4-hybrid", "cohere2", "gpt_oss"}
NAIVE_SHIFTED = {"llama", "mistral", "mistral-window", "qwen2"}  # the layer layout reference.py re-implements


def build(name, vocab=128):
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(ARCHITECTURES[name][0](vocab)).eval()


def settings(positions="shifted"):
    return StreamingSettings(START, RECENT, positions)


@pytest.fixture(scope="module", params=list(ARCHITECTURES))
def arch(request):
    return request.param


@pytest.fixture(scope="module")
def model(arch, one_thread):
    return build(arch)


@pytest.fixture(scope="module")
def ids():
    torch.manual_seed(1)
    return torch.randint(3, 128, (LONG,))


@pytest.fixture(scope="module")
def token_loop(model, ids):
    """The reference token loop on the long stream, once per architecture and position mode (it is the slow part)."""
    done = {}

    def run(positions):
        if positions not in done:
            done[positions] = score_stream(model, ids, settings(positions), find_rotary(model))
        return done[positions]
    return run


def test_every_supported_model_type_is_covered():
    """Every type the chunked path serves is proven here; the token-loop-only types in test_token_loop_architectures."""
    covered = {ARCHITECTURES[name][0](128).model_type for name in ARCHITECTURES}
    assert covered == {name for name, arch in ARCHITECTURE_OF.items() if "chunked" in arch.paths}


def rotary_layers(shift):
    """(layer, its shift) for every rotary layer: one shift serves all, LayerShifts one per layer."""
    if isinstance(shift, LayerShifts):
        return [(i, layer) for i, layer in enumerate(shift.layers) if layer is not None]
    return [(None, shift)]


def test_accepted_with_its_position_scheme(arch, model):
    check_model_supported(model, settings())
    shift = rotary_layers(find_rotary(model))[0][1]
    assert (shift.rotary_dim if shift is not None else None) == ARCHITECTURES[arch][1]
    if shift is not None:
        assert shift.layout == ("interleaved" if arch in INTERLEAVED else "rotate_half")


@pytest.mark.parametrize("rotary_arch", [name for name in ARCHITECTURES if ARCHITECTURES[name][1] is not None])
def test_rotary_shift_moves_keys_like_the_model(rotary_arch, one_thread):
    """A key the model rotated to p, moved by d, equals the model's own rotation to p + d (tail included)."""
    model = build(rotary_arch)
    layer, shift = rotary_layers(find_rotary(model))[-1]  # per-layer shifts: the last rotary layer's
    rotary = next(module for name, module in model.named_modules() if name.endswith("rotary_emb"))
    apply = sys.modules[type(model).__module__].apply_rotary_pos_emb
    extra = {}
    if "layer_type" in inspect.signature(rotary.forward).parameters:
        extra["layer_type"] = model.config.layer_types[layer] if layer is not None else "full_attention"

    def model_rotation(x, positions):
        cos, sin = rotary(x, positions[None], **extra)
        rot = shift.rotary_dim  # phi's attention hands apply_rotary_pos_emb the rotary part of each head only
        if rotary_arch == "gptj":  # its module returns (sin, cos); apply(tensor, sin, cos) on [batch, seq, heads, dim]
            turned = apply(x[..., :rot].transpose(1, 2), cos, sin).transpose(1, 2)
        else:
            turned = apply(x[..., :rot], x[..., :rot], cos, sin)[0]
        return torch.cat((turned, x[..., rot:]), dim=-1)

    torch.manual_seed(2)
    x = torch.randn(1, 2, 6, 16)
    positions = torch.tensor([0, 3, 17, 40, 100, 250])
    for delta in (-3, 7, -40):
        moved = shift.rotate(model_rotation(x, positions - min(0, delta)), delta)
        torch.testing.assert_close(moved, model_rotation(x, positions - min(0, delta) + delta), rtol=0, atol=1e-4)
    deltas = torch.tensor([0, -1, 5, -20, 30, -100])
    torch.testing.assert_close(
        shift.rotate(model_rotation(x, positions + 100), deltas), model_rotation(x, positions + 100 + deltas),
        rtol=0, atol=1e-4,
    )


@pytest.mark.parametrize("positions", ["shifted", "original"])
def test_short_stream_equals_dense(model, ids, positions):
    short = ids[: CAPACITY + 1]
    dense = dense_logprobs(model, short)
    token = score_stream(model, short, settings(positions), find_rotary(model))
    chunked = score_stream_chunked(model, short, settings(positions), find_rotary(model), CHUNK)
    for scored in (token, chunked):
        assert scored.evicted == 0
        torch.testing.assert_close(scored.logprobs, dense, rtol=0, atol=TOL)


@pytest.mark.parametrize("positions", ["shifted", "original"])
def test_long_stream_chunked_equals_token_and_stays_bounded(model, ids, positions, token_loop):
    token = token_loop(positions)
    chunked = score_stream_chunked(model, ids, settings(positions), find_rotary(model), CHUNK)
    for scored in (token, chunked):
        assert scored.evicted == LONG - 1 - CAPACITY > 0
        assert scored.max_held == CAPACITY
    torch.testing.assert_close(chunked.logprobs, token.logprobs, rtol=0, atol=TOL)
    assert perplexity(chunked.logprobs) == pytest.approx(perplexity(token.logprobs), rel=1e-5)
    # It streamed: not the dense numbers.
    assert (token.logprobs - dense_logprobs(model, ids)).abs().max() > 1e-2


@pytest.mark.parametrize("positions", ["shifted", "original"])
def test_decode_steps_equal_the_token_loop(model, ids, positions, token_loop, monkeypatch):
    """Generation's path (chunked read, then RingWindowCache steps with frame resets) gives the token loop's numbers."""
    monkeypatch.setattr(static, "REBASE_EVERY", 6)
    stream = open_stream(model, settings(positions), find_rotary(model))
    logits = torch.cat([stream.read(ids[:25])] + [stream.step(int(token))[None] for token in ids[25:-1]])
    stepped = torch.log_softmax(logits, -1).gather(-1, ids[1:, None])[:, 0]
    token = token_loop(positions)
    torch.testing.assert_close(stepped, token.logprobs, rtol=0, atol=TOL)
    assert stream.evicted == token.evicted and stream.max_held == CAPACITY


def test_original_equals_masked_single_pass(model, ids, token_loop):
    """positions=original (position t, also for learned absolute positions) is one masked dense pass."""
    token = token_loop("original")
    reference = original_positions_logprobs(model, ids, START, RECENT)
    torch.testing.assert_close(token.logprobs, reference, rtol=0, atol=TOL)


@pytest.mark.parametrize("positions", ["shifted", "original"])
def test_scored_storage_without_heavy_slots_is_the_sink_window(arch, model, ids, positions, token_loop):
    """TOVA with no heavy slots evicts what sink+window evicts (the oldest unprotected token), but through the
    scored storage (per-head token lists, shifted re-rotation) and the weights attention function (grouped heads,
    soft-capping): on every architecture it must give the proven token loop's numbers."""
    tova = dataclasses.replace(settings(positions), method="token", policy="tova", heavy_size=0)
    if arch == "gpt_oss":  # its learned sink logits are not in a scored policy's weights: refused, not ignored
        with pytest.raises(NotImplementedError, match="learned sink logits"):
            score(model, ids, tova, find_rotary(model))
        return
    scored = score(model, ids, tova, find_rotary(model))
    assert scored.evicted == token_loop(positions).evicted and scored.max_held == CAPACITY
    torch.testing.assert_close(scored.logprobs, token_loop(positions).logprobs, rtol=0, atol=TOL)


def test_scored_chunked_equals_the_scored_token_loop(arch, model, ids):
    """With heavy slots (scores decide), the scored chunked path (original positions) equals the scored token loop."""
    tova = StreamingSettings(START, RECENT // 2, "original", "token", chunk_size=CHUNK, policy="tova",
                             heavy_size=RECENT - RECENT // 2)
    short = ids[: 2 * CAPACITY + CHUNK]  # 26 evictions are enough here
    if arch == "gpt_oss":  # refused on both paths (learned sink logits), not a vacuous pass
        for method in ("token", "chunked"):
            with pytest.raises(NotImplementedError, match="learned sink logits"):
                score(model, short, dataclasses.replace(tova, method=method), find_rotary(model))
        return
    token = score(model, short, tova, find_rotary(model))
    chunked = score(model, short, dataclasses.replace(tova, method="chunked"), find_rotary(model))
    assert token.evicted == chunked.evicted == len(short) - 1 - CAPACITY
    torch.testing.assert_close(chunked.logprobs, token.logprobs, rtol=0, atol=TOL)


def absolute_shifted_logprobs(model, ids, start, recent):
    """positions=shifted for learned absolute positions: token s read at position min(s, C), sink+window mask.

    A token's position embedding is added once, when it is read; nothing in the cache can move it, so one
    masked dense pass with position ids min(s, C) is the token loop.
    """
    n = ids.numel()
    mask = sink_window_mask(n, start, recent)
    position_ids = torch.arange(n).clamp(max=start + recent)[None]
    with torch.no_grad():
        logits = model(ids[None], attention_mask=mask, position_ids=position_ids).logits[0].float()
    return torch.log_softmax(logits, -1)[:-1].gather(-1, ids[1:, None])[:, 0]


def test_shifted_positions(arch, model, ids, token_loop):
    shifted, original = token_loop("shifted"), token_loop("original")
    # Up to step C both modes use position t; from then on the query sits at C instead of t.
    torch.testing.assert_close(shifted.logprobs[:CAPACITY], original.logprobs[:CAPACITY], rtol=0, atol=TOL)
    assert (shifted.logprobs[CAPACITY:] - original.logprobs[CAPACITY:]).abs().max() > 1e-2


# Full-depth references for positions=shifted, where one exists: learned absolute positions (one masked pass)
# and the Llama layer layout that reference.py re-implements. Every rotary architecture, these included, is
# also checked against the one-layer reference below.
FULL_SHIFTED_REFERENCE = {"gpt2": absolute_shifted_logprobs} | {name: shifted_llama_logprobs for name in NAIVE_SHIFTED}


@pytest.mark.parametrize("name", sorted(FULL_SHIFTED_REFERENCE))
def test_shifted_equals_the_full_reference(name, ids, one_thread):
    model = build(name)
    shifted = score_stream(model, ids, settings("shifted"), find_rotary(model))
    reference = FULL_SHIFTED_REFERENCE[name](model, ids, START, RECENT)
    torch.testing.assert_close(shifted.logprobs, reference, rtol=0, atol=TOL)


def test_every_architecture_has_a_shifted_reference():
    one_layer = {name for name in ARCHITECTURES if ARCHITECTURES[name][1] is not None}
    assert set(FULL_SHIFTED_REFERENCE) | one_layer == set(ARCHITECTURES)


@pytest.mark.parametrize("rotary_arch", [name for name in ARCHITECTURES if ARCHITECTURES[name][1] is not None])
def test_shifted_equals_the_one_layer_reference(rotary_arch, ids, one_thread):
    """Every rotary architecture (partial rotary, sliding windows, soft-cap included) against a definition
    that needs no knowledge of its layer code: with one layer, step t is a fresh pass over what is held."""
    config = ARCHITECTURES[rotary_arch][0](128)
    config.num_hidden_layers = 1
    for per_layer in ("layer_types", "no_rope_layers"):
        if getattr(config, per_layer, None):
            setattr(config, per_layer, getattr(config, per_layer)[:1])
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    shifted = score_stream(model, ids, settings("shifted"), find_rotary(model))
    reference = shifted_one_layer_logprobs(model, ids, START, RECENT)
    torch.testing.assert_close(shifted.logprobs, reference, rtol=0, atol=TOL)
    original = score_stream(model, ids, settings("original"), find_rotary(model))
    assert (shifted.logprobs[CAPACITY:] - original.logprobs[CAPACITY:]).abs().max() > 1e-2  # the check can tell


def test_gemma2_softcap_is_exercised(one_thread):
    """The cap moves log-probs by far more than TOL, so a chunked path that dropped it would fail above."""
    capped = build("gemma2")
    config = copy.deepcopy(capped.config)
    config.attn_logit_softcapping = None
    uncapped = type(capped)(config).eval()
    uncapped.load_state_dict(capped.state_dict())
    ids = torch.randint(3, 128, (CAPACITY + 1,))
    assert (dense_logprobs(capped, ids) - dense_logprobs(uncapped, ids)).abs().max() > 50 * TOL


# --- refusals -------------------------------------------------------------------------------------

SUPPORTED_LIST = "Supported model types: llama .*gpt2 \\(learned absolute positions\\)"
_BASE = dict(
    vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
    num_key_value_heads=1, max_position_embeddings=256, bos_token_id=1, eos_token_id=2, pad_token_id=0,
)
REFUSED = {
    "mistral window < C+1": (
        lambda: transformers.MistralConfig(**_BASE, sliding_window=CAPACITY), settings(),
        r"mistral has sliding-window attention layers \(DynamicSlidingWindowLayer, window 20 tokens\).*"
        r"here C = 20; use start_size \+ recent_size <= 19",
    ),
    "mistral without settings": (  # a sliding window with no cache settings to compare it against
        lambda: transformers.MistralConfig(**_BASE, sliding_window=16), None,
        r"mistral has sliding-window attention layers \(DynamicSlidingWindowLayer.*Supported",
    ),
    "mamba (recurrent)": (
        lambda: transformers.MambaConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, state_size=4), settings(),
        r"mamba has cache layers of kind \['LinearAttentionLayer'\]",
    ),
    "jamba (hybrid: Mamba and attention)": (
        lambda: transformers.JambaConfig(
            **_BASE, attn_layer_period=2, attn_layer_offset=1, expert_layer_period=2, expert_layer_offset=1,
            num_experts=2, mamba_d_state=4, mamba_expand=1, mamba_dt_rank=4),
        settings(), r"jamba has cache layers of kind \['DynamicLayer', 'LinearAttentionLayer'\]",
    ),
    "falcon_h1 (hybrid: Mamba and attention in one layer)": (
        lambda: transformers.FalconH1Config(**_BASE, head_dim=16, mamba_d_ssm=32, mamba_n_heads=2, mamba_d_head=16,
                                            mamba_d_state=4, mamba_n_groups=1, mamba_chunk_size=16),
        settings(), r"falcon_h1 has cache layers of kind \['LinearAttentionAndFullAttentionLayer'\]",
    ),
    "qwen3_next (hybrid: linear attention)": (
        lambda: transformers.Qwen3NextConfig(
            **_BASE, head_dim=16, linear_num_value_heads=2, linear_num_key_heads=1, linear_key_head_dim=8,
            linear_value_head_dim=8, num_experts=2, num_experts_per_tok=1, moe_intermediate_size=16,
            shared_expert_intermediate_size=16, layer_types=["linear_attention", "full_attention"]),
        settings(), r"qwen3_next has cache layers of kind \['DynamicLayer', 'LinearAttentionLayer'\]",
    ),
    "gpt_oss with C = 128 (window 128)": (
        lambda: transformers.GptOssConfig(**_BASE, head_dim=16, num_local_experts=2, num_experts_per_tok=1),
        StreamingSettings(4, 124), r"gpt_oss has sliding-window attention layers \(DynamicSlidingWindowLayer, "
                                   r"window 128 tokens\).*use start_size \+ recent_size <= 127",
    ),
    "gemma2 without settings": (
        lambda: transformers.Gemma2Config(**_BASE, head_dim=16, sliding_window=WINDOW), None,
        r"gemma2 has sliding-window .*the cache settings were not given.*Supported: decoder-only models",
    ),
    "gemma3 bidirectional": (
        lambda: transformers.Gemma3TextConfig(
            **_BASE, head_dim=16, sliding_window=2 * WINDOW, use_bidirectional_attention=True,
            layer_types=["sliding_attention", "full_attention"]),
        settings(), r"gemma3_text with bidirectional or chunked attention .*Supported: causal decoders",
    ),
    "llama dynamic RoPE, C + 256 >= 512": (
        lambda: transformers.LlamaConfig(
            **_BASE | {"max_position_embeddings": 512}, rope_parameters=_one_rope() | {"rope_type": "dynamic", "factor": 2.0}),
        StreamingSettings(4, 296), r"llama uses rope_type 'dynamic', whose frequencies change with the sequence length "
                                   r"once positions reach 512 .*= 556\. Supported: start_size \+ recent_size <= 255",
    ),
    "phi3 longrope, C + 256 >= 384": (
        lambda: transformers.Phi3Config(**_BASE, original_max_position_embeddings=384, rope_parameters=_one_rope() | {
            "rope_type": "longrope", "short_factor": [1.0] * 8, "long_factor": [2.0] * 8}),
        StreamingSettings(4, 196), r"phi3 uses rope_type 'longrope', whose frequencies change with the sequence length "
                                   r"once positions reach 384 .*Supported: start_size \+ recent_size <= 127",
    ),
    "gpt2 positions < C": (
        lambda: transformers.GPT2Config(vocab_size=64, n_embd=32, n_layer=1, n_head=2, n_positions=CAPACITY),
        settings(), r"gpt2 has learned absolute positions 0\.\.19, but streaming positions reach C = 20",
    ),
    "gptj table shorter than C + 256": (
        lambda: transformers.GPTJConfig(vocab_size=64, n_embd=32, n_layer=1, n_head=2, rotary_dim=8, n_positions=256),
        settings(), r"gptj reads its rotary angles from a table of positions 0\.\.255, but the streaming paths reach "
                    r"position C \+ max\(chunk_size, 256\) = 276",
    ),
    "deepseek_v3 (MLA)": (
        lambda: transformers.DeepseekV3Config(
            **_BASE, kv_lora_rank=16, q_lora_rank=None, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16,
            n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=16, first_k_dense_replace=2),
        settings(), "does not support model_type 'deepseek_v3': multi-head latent attention caches.*" + SUPPORTED_LIST,
    ),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_unsupported_is_refused_with_what_is_supported(case, one_thread):
    config, given, message = REFUSED[case]
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config())
    with pytest.raises(NotImplementedError, match=message):
        check_model_supported(model, given)
    with pytest.raises(NotImplementedError, match=message):  # a known refusal is not overridden
        check_model_supported(model, given, trust_positions="rope")


def test_chunked_attention_is_refused_even_when_trusted(one_thread):
    """llama4_text is unlisted; trust_positions=rope does not let its chunked attention (attention_chunk_size)
    through: a query there sees only its own chunk, not a sink+window set."""
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(transformers.Llama4TextConfig(
        **_BASE, head_dim=16, intermediate_size_mlp=64, num_local_experts=2, attention_chunk_size=64))
    with pytest.raises(NotImplementedError, match="does not support model_type 'llama4_text'.*not verified"):
        check_model_supported(model, settings())
    with pytest.raises(NotImplementedError, match="llama4_text with bidirectional or chunked attention"):
        check_model_supported(model, settings(), trust_positions="rope")


def test_every_known_refusal_is_tested():
    tested = {REFUSED[case][0]().model_type for case in REFUSED}
    assert all(set(refusal.model_types) & tested for refusal in REFUSED_ARCHITECTURES)


def test_the_chunked_path_cannot_reach_model_code_attention(one_thread):
    """MPT computes attention in model code: the chunked path, run anyway, fails loudly instead of silently
    (support.check_model_supported refuses it before it gets here: tests/test_support.py)."""
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(transformers.MptConfig(
        vocab_size=64, d_model=32, n_layers=2, n_heads=4, max_seq_len=128)).eval()
    ids = torch.randint(3, 64, (CAPACITY + 4,))
    with pytest.raises(RuntimeError, match=r"0 of 2 layers ran the streaming_lm_chunked attention function"):
        score_stream_chunked(model, ids, settings(), find_rotary(model), CHUNK)


# --- trust_positions=rope: an unlisted type accepted after a self-check on its own weights -----------

class _Exaone4Copy(transformers.Exaone4Config):
    """A new model type no structural check knows: exaone4's hybrid layers under another name."""

    model_type = "exaone4_copy"


def test_trusted_unlisted_type_passes_the_self_check(one_thread):
    """arcee (not listed: llama attention, ReLU² MLP) streams exactly, so the self-check accepts it."""
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(transformers.ArceeConfig(**_BASE)).eval()
    with pytest.raises(NotImplementedError, match="does not support model_type 'arcee'.*trust_positions=rope"):
        check_model_supported(model, settings())
    check_model_supported(model, settings(), trust_positions="rope")


def test_trusted_unlisted_type_failing_the_self_check_is_refused(one_thread):
    """Global layers without RoPE under an unknown name: only running the model can tell, and the self-check does."""
    config = _Exaone4Copy(**_BASE, sliding_window=WINDOW, layer_types=["sliding_attention", "full_attention"])
    torch.manual_seed(0)
    model = transformers.Exaone4ForCausalLM(config).eval()
    with pytest.raises(NotImplementedError, match=r"trust_positions=rope: exaone4_copy failed the start-up self-check "
                                                  r"\(\d+ tokens, positions=original, chunked vs token loop"):
        check_model_supported(model, settings(), trust_positions="rope")


# --- through lm-eval ------------------------------------------------------------------------------

SHORT_TEXT = "The tower is 324 metres tall."  # 29 bytes: with the prefix token, a stream of 30 <= C + 1
LONG_TEXT = " The tower is 324 metres tall, about the same height as an 81-storey building."
ADAPTER = dict(start_size=START, recent_size=26, chunk_size=CHUNK, device="cpu", dtype="float32")  # C = 30 < 32


@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_adapter_equals_dense_hf(name, tmp_path, one_thread):
    folder = save_tiny(tmp_path / name, ARCHITECTURES[name][0](len(tiny_tokenizer())))
    lm = StreamingHFLM(pretrained=str(folder), **ADAPTER)
    dense = HFLM(pretrained=lm.model, tokenizer=lm.tokenizer)  # the same weights, loaded once
    assert len(lm.tok_encode(SHORT_TEXT)) + 1 <= lm.streaming.capacity + 1
    (expected,) = dense.loglikelihood_rolling(rolling(SHORT_TEXT))
    (got,) = lm.loglikelihood_rolling(rolling(SHORT_TEXT))
    assert got == pytest.approx(expected, rel=1e-5)
    assert lm.get_model_info()["streaming"]["evicted_tokens"] == 0
    # A longer request streams through the same adapter.
    (streamed,) = lm.loglikelihood_rolling(rolling(LONG_TEXT))
    n_tokens = len(lm.tok_encode(LONG_TEXT)) + 1
    assert lm.get_model_info()["streaming"]["evicted_tokens"] == n_tokens - 1 - lm.streaming.capacity
    assert abs(streamed - dense.loglikelihood_rolling(rolling(LONG_TEXT))[0]) > 0.05
    # ... and gives the engine's token loop on the same stream, not merely a number other than dense.
    ids = [lm.prefix_token_id, *lm.tok_encode(LONG_TEXT)]
    reference = score_stream(lm.model, ids, lm.streaming, find_rotary(lm.model)).logprobs.double().sum()
    assert streamed == pytest.approx(float(reference), rel=1e-5)


def test_adapter_trusts_an_unlisted_rope_type_after_its_self_check(tmp_path, one_thread):
    config = transformers.ArceeConfig(**_BASE | {"vocab_size": len(tiny_tokenizer())})
    folder = save_tiny(tmp_path / "arcee", config)
    with pytest.raises(NotImplementedError, match="does not support model_type 'arcee'"):
        StreamingHFLM(pretrained=str(folder), **ADAPTER)
    lm = StreamingHFLM(pretrained=str(folder), trust_positions="rope", **ADAPTER)
    dense = HFLM(pretrained=lm.model, tokenizer=lm.tokenizer)
    (expected,) = dense.loglikelihood_rolling(rolling(SHORT_TEXT))
    assert lm.loglikelihood_rolling(rolling(SHORT_TEXT))[0] == pytest.approx(expected, rel=1e-5)


def test_adapter_refuses_an_unsupported_model_type_at_construction(tmp_path):
    config = REFUSED["deepseek_v3 (MLA)"][0]()
    config.vocab_size = len(tiny_tokenizer())
    folder = save_tiny(tmp_path / "deepseek_v3", config)
    with pytest.raises(NotImplementedError, match="does not support model_type 'deepseek_v3'.*" + SUPPORTED_LIST):
        StreamingHFLM(pretrained=str(folder), **ADAPTER)


def test_original_positions_beyond_learned_ones_are_refused(one_thread):
    """gpt2 reads token t at position t with positions=original: a longer stream gets a named error, not an IndexError."""
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(
        transformers.GPT2Config(vocab_size=64, n_embd=32, n_layer=1, n_head=2, n_positions=CAPACITY + 10)).eval()
    ids = torch.randint(3, 64, (CAPACITY + 11,))
    message = r"positions=original reads token t at position t, but gpt2 has learned positions 0\.\.29 only"
    for method in ("token", "chunked"):
        with pytest.raises(ValueError, match=message):
            score(model, ids, StreamingSettings(START, RECENT, "original", method=method), None)
    stream = open_stream(model, StreamingSettings(START, RECENT, "original"), None)
    stream.read(ids[:-1])
    with pytest.raises(ValueError, match=message):
        stream.step(int(ids[-1]))
    assert score(model, ids, StreamingSettings(START, RECENT, "shifted"), None).evicted > 0  # shifted streams on


def test_original_positions_beyond_fixed_rope_frequencies_are_refused(one_thread):
    """longrope switches frequencies past original_max_position_embeddings: positions=original stops there."""
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(transformers.Phi3Config(
        **_BASE, original_max_position_embeddings=CAPACITY + 10, rope_parameters=_one_rope() | {
            "rope_type": "longrope", "short_factor": [1.0] * 8, "long_factor": [2.0] * 8})).eval()
    ids = torch.randint(3, 64, (CAPACITY + 11,))
    with pytest.raises(ValueError, match=r"but phi3 has fixed RoPE frequencies at positions 0\.\.29 only"):
        score(model, ids, StreamingSettings(START, RECENT, "original", method="token"), find_rotary(model))
