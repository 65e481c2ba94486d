"""Which models a streaming cache serves exactly: the one registry, its checks and the forward's kwargs.

Every "supported types" message, the README's support table (``support_table()``, checked by
tests/test_support.py) and the coverage of tests/test_architectures.py (the chunked path's types) and
tests/test_token_loop_architectures.py (the token loop's) come from ``ARCHITECTURES``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
from transformers.cache_utils import DynamicCache, DynamicSlidingWindowLayer

from .streams.attention import attention_reach
from .rotary import SEQUENCE_DEPENDENT_ROPE, RotaryShift, find_rotary, rope_types, rotary_position_limit, rotary_table
from .rolling import score
from .settings import StreamingSettings
from .storage.static import REBASE_EVERY

ABSOLUTE = "learned absolute positions"
ALIBI = "ALiBi"
# The execution paths (streams/): the three methods, and the decode slots that continue a chunked read.
ALL_PATHS = ("token", "chunked", "decode", "recompute")
# Attention in the model's own code, reading keys and values from the cache it is given: the token loop
# (and its steps, which generate_until decodes with) and the cache-free recompute windows serve it; the
# chunked path's attention function and the decode slots' order-free keys cannot.
TOKEN_LOOP_PATHS = ("token", "recompute")
TOKEN_LOOP_STATUS = ("the default `method` falls back to it, `generate_until` steps through it; `tova`, `h2o` read the "
                     "weights its eager attention returns with `output_attentions`")
# The versions the registry's rows were last proven on (tests/test_architectures.py,
# tests/test_token_loop_architectures.py; constraints.txt pins them). Which paths serve a loaded model is decided
# by what it does (``serving_paths``: the probe), not by the version.
PROVEN_ON = "transformers 5.25.0, torch 2.13.0"


@dataclasses.dataclass(frozen=True)
class Architecture:
    """One row of the support table: model types proven alike on tiny random models."""

    model_types: tuple[str, ...]
    scheme: str  # how positions reach the model, in short (error messages); ABSOLUTE, ALIBI or a kind of RoPE
    positions: str  # the README's longer account of it
    modes: str  # what shifted / original mean there
    status: str
    paths: tuple[str, ...] = ALL_PATHS  # the paths proven for it (tested per path); the probe may serve fewer
    own_attention: str = ""  # where attention runs, if in model code: why no chunked path serves it
    # Released variants that stream differently: (config -> whether it is one, its own row); checked in order.
    variants: tuple[tuple[Callable, Architecture], ...] = ()
    max_keys: str = ""  # the config field, where set, bounding the keys one step attends to (a bias table's length)


# falcon-rw (alibi=True): FalconModel adds the bias to the attention mask it builds, by the key's slot in the cache.
FALCON_ALIBI = Architecture(
    ("falcon",), ALIBI, "ALiBi (`alibi=True`: falcon-rw-1b/7b), added to the mask FalconModel builds",
    "`shifted`: the bias by slot distance, as for `mpt`, `bloom`; `original` refused",
    f"falcon-rw: supported on the token loop with `positions=shifted` ({TOKEN_LOOP_STATUS})", TOKEN_LOOP_PATHS,
    "falcon-rw adds ALiBi to the attention mask FalconModel builds, by the key's index in the cache, which the chunked "
    "path's per-query visible sets would replace")


ARCHITECTURES = (
    Architecture(("llama", "mistral", "qwen2", "qwen3"), "RoPE", "RoPE",
                 "as in docs/semantics.md: cache slots / text positions",
                 "supported; `shifted` also equals the naive loop (llama, mistral, qwen2)"),
    # Attention exactly as llama's (qk-norms, clip_qkv, biases, granite's multipliers, MoE feed-forwards
    # that route each token alone): positions enter only through one rotate_half RoPE.
    Architecture(("olmo", "olmo2", "granite", "starcoder2", "mixtral", "qwen2_moe", "qwen3_moe"), "RoPE", "RoPE",
                 "as above", "supported (granite's multipliers, olmo's `clip_qkv`, MoE layers included); "
                 "`sliding_window`, where set, must be ≥ C + evict_every"),
    Architecture(("phi3",), "RoPE, partial allowed", "RoPE, partial allowed; `longrope` (the 128k models)",
                 "as above; the non-rotary tail of each head is never moved",
                 "supported; `longrope` only while its frequencies are fixed: `C + max(chunk_size, 256) < "
                 "original_max_position_embeddings`, and `original` for streams of at most that many tokens"),
    Architecture(("gpt_neox", "phi", "stablelm"), "partial RoPE", "partial RoPE (`rotary_pct`, "
                 "`partial_rotary_factor`)", "as above", "supported"),
    Architecture(("gemma2",), "RoPE", "RoPE; sliding/full layers, attention soft-capping",
                 "as above; the soft-cap is applied in the chunked attention too",
                 "supported if `sliding_window ≥ C + evict_every`"),
    Architecture(("ministral",), "RoPE", "RoPE; sliding/full layers", "as above", "supported if `sliding_window ≥ C + evict_every`"),
    Architecture(("gemma3_text", "olmo3"), "RoPE per layer type", "RoPE per layer type (local and global may differ: "
                 "Gemma 3's local base 10k, global 1M)", "as above; each layer's keys move with its own frequencies",
                 "supported if `sliding_window ≥ C + evict_every`"),
    Architecture(("exaone4", "smollm3"), "RoPE, some layers without", "RoPE; layers without RoPE (`no_rope_layers`; "
                 "exaone4's global layers once `sliding_window` is set)",
                 "as above; keys of layers without RoPE carry no position and never move",
                 "supported if `sliding_window ≥ C + evict_every`"),
    Architecture(("cohere", "helium", "glm", "glm4"), "RoPE, interleaved", "RoPE on interleaved pairs `(2i, 2i + 1)` "
                 "(the layout is read off the model's own rotary code); `glm`, `glm4`: partial",
                 "as above", "supported"),
    Architecture(("cohere2",), "RoPE, interleaved, sliding layers only", "interleaved RoPE on sliding layers; "
                 "global layers without RoPE", "as above; global layers' keys never move",
                 "supported if `sliding_window ≥ C + evict_every`"),
    Architecture(("gptj",), "RoPE, interleaved, from a table", "partial RoPE (`rotary_dim`) on interleaved pairs, "
                 "angles from a fixed table of `n_positions` positions", "as above",
                 "supported if `C + max(chunk_size, 256) + evict_every − 1 < n_positions`; `original` only for streams of at most "
                 "`n_positions` tokens"),
    Architecture(("gpt_oss",), "RoPE", "RoPE (YaRN); a learned sink logit per head; 128-token sliding layers",
                 "as above; the learned sink logits join every softmax of the chunked attention too",
                 "supported if `C + evict_every ≤ 128` (its sliding window must hold the keys a step attends to)"),
    Architecture(("gpt2",), ABSOLUTE, "learned absolute embeddings",
                 "token `t` is read at position `min(t, C)` / `t`; a key keeps the embedding it was read with",
                 "supported if `C + evict_every ≤ n_positions`; `original` only for streams of at most `n_positions` tokens"),
    # The StreamingLLM paper's own models: attention in model code that reads the cache it is given.
    Architecture(("falcon",), "RoPE", "RoPE; `new_decoder_architecture` (40B/180B: grouped keys/values) or "
                 "multi-query with `parallel_attn` (7B)", "as above",
                 "supported on every path where its attention runs through transformers' attention interface "
                 f"(transformers 5.25; probed at load), else on the token loop ({TOKEN_LOOP_STATUS}); `alibi=True` "
                 "(falcon-rw): its own row (ALiBi)",
                 variants=((lambda config: getattr(config, "alibi", False), FALCON_ALIBI),)),
    Architecture(("mpt", "bloom"), ALIBI, "ALiBi: attention biased by the key's distance in cache slots",
                 "`shifted`: the bias by slot distance, sink `j` at `min(t, C) − j` (the paper's setting for ALiBi); "
                 "`original` refused (text distances cannot reach the model's bias)",
                 f"supported on the token loop with `positions=shifted` ({TOKEN_LOOP_STATUS}); mpt if "
                 "`C + evict_every ≤ max_seq_len`", TOKEN_LOOP_PATHS,
                 "ALiBi is added inside the model's own attention code (no attention interface), by the key's index "
                 "in the cache, so the chunked path cannot give each query its own visible keys and distances",
                 max_keys="max_seq_len"),  # mpt's bias table; bloom builds its bias for any length
)
ARCHITECTURE_OF = {name: arch for arch in ARCHITECTURES for name in arch.model_types}
VARIANTS = tuple(row for arch in ARCHITECTURES for _, row in arch.variants)  # rows reached through a type's row
SUPPORTED_ARCHITECTURES = {name: arch.scheme for arch in ARCHITECTURES for name in arch.model_types}
SUPPORTED_LAYER_TYPES = ("full_attention", "sliding_attention with a window of at least C + evict_every tokens")


@dataclasses.dataclass(frozen=True)
class Refusal:
    """Model types known not to stream exactly here, and why (each tested in tests/test_architectures.py)."""

    model_types: tuple[str, ...]
    positions: str
    reason: str


REFUSED_ARCHITECTURES = (
    Refusal(("deepseek_v2", "deepseek_v3"), "RoPE on a decoupled key part (MLA)",
            "multi-head latent attention caches the compressed latent as keys and the rotary part of the key as "
            "values, so re-rotating the cache's keys would move the wrong tensor"),
)
REFUSED_REASONS = {name: refusal.reason for refusal in REFUSED_ARCHITECTURES for name in refusal.model_types}
# trust_positions=rope: an unlisted model type is accepted after a self-check on its own weights.
TRUST_POSITIONS = ("rope",)


def supported_list() -> str:
    """The model types and their position schemes, for error messages."""
    return ", ".join(f"{name} ({scheme})" for name, scheme in SUPPORTED_ARCHITECTURES.items())


def support_table() -> str:
    """The README's support table, generated from the registry (supported rows, then the known refusals)."""
    lines = [f"| model_type | positions | `shifted` / `original` there | paths (proven on {PROVEN_ON}) | status |",
             "|---|---|---|---|---|"]
    for arch in ARCHITECTURES + VARIANTS:
        types = ", ".join(f"`{name}`" for name in arch.model_types)
        lines.append(f"| {types} | {arch.positions} | {arch.modes} | {', '.join(arch.paths)} | {arch.status} |")
    for refusal in REFUSED_ARCHITECTURES:
        types = ", ".join(f"`{name}`" for name in refusal.model_types)
        lines.append(f"| {types} | {refusal.positions} | — | — | refused: {refusal.reason} |")
    return "\n".join(lines)


def check_trust_positions(value) -> str | None:
    """The ``trust_positions`` model arg, validated before anything loads."""
    if value is None or value in TRUST_POSITIONS:
        return value
    raise ValueError(
        f"trust_positions must be one of {', '.join(TRUST_POSITIONS)}; got {value!r} (it accepts an unlisted "
        "model type whose positions enter only through rotate_half RoPE, after a start-up self-check)"
    )


def check_model_supported(model, settings: StreamingSettings | None = None, trust_positions: str | None = None) -> None:
    """Raise a clear ``NotImplementedError`` for models a sink+window cache cannot serve exactly.

    Sliding-window layers are accepted only with ``settings`` whose ``C + evict_every`` keys per step fit inside
    the window (the window then never masks a key the cache holds); without ``settings`` they are refused.
    ``trust_positions="rope"`` accepts a model type not in the registry if it passes every structural
    check here and ``self_check`` on its own weights.
    """
    config = model.config
    if getattr(config, "is_encoder_decoder", False):
        raise NotImplementedError(
            f"streaming_lm supports decoder-only models; {config.model_type} is encoder-decoder"
        )
    reference = DynamicCache(config=config)
    kinds = {type(layer).__name__ for layer in reference.layers}
    if reference.layers and not kinds <= {"DynamicLayer", "DynamicSlidingWindowLayer"}:
        raise NotImplementedError(
            f"{config.model_type} has cache layers of kind {sorted(kinds)}: recurrent, linear-attention, "
            "sliding-window or hybrid layers cannot be trimmed to a sink+window cache. "
            f"Supported: decoder-only models whose every layer is one of {SUPPORTED_LAYER_TYPES}"
        )
    trusted = config.model_type not in SUPPORTED_ARCHITECTURES
    if config.model_type in REFUSED_REASONS or (trusted and trust_positions is None):
        why = REFUSED_REASONS.get(config.model_type, "its position scheme and attention path are not verified")
        raise NotImplementedError(
            f"streaming_lm does not support model_type {config.model_type!r}: {why}. "
            f"Supported model types: {supported_list()}"
            + ("" if config.model_type in REFUSED_REASONS else
               "; or pass trust_positions=rope to accept a RoPE model after a start-up self-check")
        )
    arch = architecture_of(config)
    if arch is not None:
        check_architecture_settings(model, arch, settings)
    elif not attention_reach(model).served:  # trust_positions: its self-check runs the chunked path
        raise NotImplementedError(
            f"{config.model_type}: {attention_reach(model).reason(model)}, so streaming_lm's attention functions "
            f"cannot serve it. Supported model types: {supported_list()}"
        )
    text = config.get_text_config(decoder=True)
    if getattr(text, "use_bidirectional_attention", False) or getattr(text, "attention_chunk_size", None):
        raise NotImplementedError(
            f"{config.model_type} with bidirectional or chunked attention is not a causal sink+window model. "
            f"Supported: causal decoders of model types {supported_list()}"
        )
    windows = [layer.sliding_window for layer in reference.layers if type(layer) is DynamicSlidingWindowLayer]
    if windows:
        window = min(windows)
        attended = None if settings is None else settings.keys_attended
        if attended is None or window < attended:
            if settings is None:
                why = "the cache settings were not given, so C is unknown"
            elif attended is None:
                why = "evict_every=context reads each prefill whole" if settings.context_regime else \
                    f"policy={settings.policy} keeps every token in some heads"
            else:
                every = settings.evict_every
                why = f"here C = {settings.capacity}" + (f", evict_every = {every}" if every > 1 else "") + \
                    f"; use start_size + recent_size{' + evict_every - 1' if every > 1 else ''} <= {window - 1}"
            raise NotImplementedError(
                f"{config.model_type} has sliding-window attention layers (DynamicSlidingWindowLayer, window "
                f"{window} tokens): a sink+window cache can stand in for them only when one step's C + evict_every "
                f"keys fit inside the window ({why}). Supported: decoder-only models whose every layer is one of "
                f"{SUPPORTED_LAYER_TYPES}"
            )
    shift = find_rotary(model)  # raises for rotary embeddings that differ other than by layer type
    limit = rotary_position_limit(model)
    if limit is not None:
        check_rotary_reach(model, settings, limit)
    if trusted:
        if shift is None:
            raise NotImplementedError(
                f"trust_positions=rope: {config.model_type} has no rotary embedding (no inv_freq buffer)"
            )
        self_check(model, shift, settings)
    elif shift is None and arch.scheme != ALIBI:
        if arch.scheme != ABSOLUTE:
            raise NotImplementedError(f"{config.model_type}: no rotary embedding found; supported: {supported_list()}")
        limit = getattr(text, "max_position_embeddings", None)
        reach = None if settings is None or settings.keys_attended is None else settings.keys_attended - 1
        if reach is not None and limit is not None and reach >= limit:
            extra = " + evict_every - 1" if settings.evict_every > 1 else ""
            raise NotImplementedError(
                f"{config.model_type} has learned absolute positions 0..{limit - 1}, but streaming positions reach "
                f"C{extra} = {reach}. Supported: start_size + recent_size{extra} <= {limit - 1} (and, with "
                f"positions=original, streams of at most {limit} tokens)"
            )


def fall_back_to_token_loop(model, settings: StreamingSettings, method_given: bool
                            ) -> tuple[StreamingSettings, str | None]:
    """The default method on a type no chunked path serves: the token loop, which gives the same numbers.

    Returns the settings to run and the line to log when they changed (None: unchanged). A method the user
    named is kept, and ``check_model_supported`` refuses it if it cannot serve the type (naming method=token).
    """
    arch = architecture_of(model.config)
    if method_given or arch is None or settings.method in serving_paths(model, arch):
        return settings, None
    line = (f"streaming_hf: the {settings.method} path cannot serve model_type {model.config.model_type!r} "
            f"({unserved_reason(model, arch, settings.method)}); reading with method=token instead: the same "
            "numbers, one token per pass")
    return dataclasses.replace(settings, method="token"), line


def architecture_of(config) -> Architecture | None:
    """The registry row of a loaded model's config: its type's, or that of the released variant it is."""
    arch = ARCHITECTURE_OF.get(config.model_type)
    for matches, row in arch.variants if arch is not None else ():
        if matches(config):
            return row
    return arch


def serving_paths(model, arch: Architecture) -> tuple[str, ...]:
    """The paths serving this loaded model: the row's proven paths, less the ones that read through the engine's
    attention functions where the model's attention does not reach them (``attention_reach``, probed once)."""
    if attention_reach(model).served:
        return arch.paths
    return tuple(path for path in arch.paths if path in TOKEN_LOOP_PATHS)


def unserved_reason(model, arch: Architecture, path: str) -> str:
    """Why ``path`` does not serve this model: the row's own reason, or what the probe saw."""
    if path not in arch.paths:
        return arch.own_attention
    return attention_reach(model).reason(model)


def check_architecture_settings(model, arch: Architecture, settings: StreamingSettings | None) -> None:
    """What a registry row says beyond its type: the paths and position modes serving it, the keys it can attend.
    (A scored policy's weights come from the model's outputs where attention runs in model code: every type
    with ``own_attention`` returns them with ``output_attentions``, tests/test_token_loop_architectures.py.)"""
    config = model.config
    if settings is None:
        return
    paths = serving_paths(model, arch)
    if settings.method not in paths:
        raise NotImplementedError(
            f"method={settings.method} cannot serve model_type {config.model_type!r}: "
            f"{unserved_reason(model, arch, settings.method)}. Use method=token (the same numbers, one token per "
            f"pass); paths serving {config.model_type}: {', '.join(paths)}"
        )
    if settings.context_regime and not attention_reach(model).served:
        raise NotImplementedError(
            f"evict_every=context cannot serve model_type {config.model_type!r}: it reads through streaming_lm's "
            f"attention function, and {attention_reach(model).reason(model)}. Use evict_every=K (an integer)"
        )
    if arch.scheme == ALIBI and settings.positions != "shifted":
        raise NotImplementedError(
            f"positions={settings.positions} cannot serve {config.model_type} (ALiBi): the model biases attention by "
            "the key's distance in cache slots, inside its own code, where text positions cannot reach. Use "
            "positions=shifted (sinks at slots 0..S-1, the paper's setting for ALiBi models)"
        )
    limit = getattr(config, arch.max_keys, None) if arch.max_keys else None
    attended = settings.keys_attended
    if limit is not None and attended is not None and attended > limit:
        every = settings.evict_every
        keys = "C + 1" if every == 1 else "C + evict_every"
        raise NotImplementedError(
            f"{config.model_type} builds its {arch.scheme} bias for at most {arch.max_keys} = {limit} keys, but a step "
            f"attends to {keys} = {attended}. Supported: start_size + recent_size{'' if every == 1 else ' + evict_every'}"
            f" <= {limit - (1 if every == 1 else 0)}"
        )


def check_rotary_reach(model, settings: StreamingSettings | None, limit: int) -> None:
    """Rotary positions exist, with fixed frequencies, only below ``limit``: the streaming paths must stay there.

    Chunks read at local positions up to C + chunk_size, decoding steps up to C + REBASE_EVERY; with
    positions=original the stream itself is limited (``positions.position_limit``).
    """
    model_type = model.config.model_type
    if rotary_table(model) is not None:
        what = f"{model_type} reads its rotary angles from a table of positions 0..{limit - 1}"
    else:
        kind = sorted(rope_types(model.config) & set(SEQUENCE_DEPENDENT_ROPE))[0]
        what = (f"{model_type} uses rope_type {kind!r}, whose frequencies change with the sequence length once "
                f"positions reach {limit} (keys rotated before could not be moved with fixed frequencies)")
    if settings is None:
        raise NotImplementedError(f"{what}; the cache settings were not given, so the positions reached are unknown")
    if settings.context_regime:  # positions never pass the text's: the stream's own length is checked (position_limit)
        return
    extra = max(settings.chunk_size, REBASE_EVERY) + settings.evict_every - 1  # the segment since the last event
    reach = settings.capacity + extra
    if reach >= limit:
        largest = limit - 1 - extra
        fits = f"start_size + recent_size <= {largest}" if largest >= 1 else "no cache size (the limit is too small)"
        segment = " + evict_every - 1" if settings.evict_every > 1 else ""
        raise NotImplementedError(
            f"{what}, but the streaming paths reach position C + max(chunk_size, {REBASE_EVERY}){segment} = {reach}. "
            f"Supported: {fits} (and, with positions=original, streams of at most {limit} tokens)"
        )


# The self-check's cache (C = 8, three chunks cross evictions) and its tolerance on per-token log-probs.
SELF_CHECK = StreamingSettings(start_size=2, recent_size=6, chunk_size=5)
SELF_CHECK_TOLERANCE = {torch.float32: 1e-3, torch.float64: 1e-6}  # half precision: 0.1


def self_check(model, shift: RotaryShift, settings: StreamingSettings | None = None) -> None:
    """``trust_positions=rope``: prove on the model's own weights what tests/test_architectures.py proves per type.

    C + 1 random tokens through the chunked path equal the dense model (positions and the attention path);
    on a stream of 3 C tokens the chunked path (which re-rotates keys and rotates sink queries with ``shift``)
    equals the token loop in both position modes (with ``original`` the token loop rotates nothing, so a
    wrong layout or frequency shows). Raises ``NotImplementedError`` with the largest difference.
    """
    check = SELF_CHECK
    if settings is not None:  # never larger than the user's cache: its windows were checked against that
        check = dataclasses.replace(check, start_size=min(check.start_size, settings.start_size),
                                    recent_size=min(check.recent_size, settings.recent_size))
    vocab = model.config.get_text_config(decoder=True).vocab_size
    ids = torch.randint(vocab, (3 * check.capacity,), generator=torch.Generator().manual_seed(0))
    short = ids[: check.capacity + 1]
    tolerance = SELF_CHECK_TOLERANCE.get(model.dtype, 0.1)
    with torch.inference_mode():
        logits = model(input_ids=short[None].to(model.device)).logits[0].float()
    dense = torch.log_softmax(logits, -1)[:-1].gather(-1, short[1:, None].to(logits.device))[:, 0]
    runs = [("C + 1 tokens, chunked vs dense", score(model, short, check, shift).logprobs, dense)]
    for positions in ("original", "shifted"):
        modes = dataclasses.replace(check, positions=positions)
        runs.append((f"{ids.numel()} tokens, positions={positions}, chunked vs token loop",
                     score(model, ids, modes, shift).logprobs,
                     score(model, ids, dataclasses.replace(modes, method="token"), shift).logprobs))
    for what, got, expected in runs:
        difference = float((got.to(expected.device) - expected).abs().max())
        if not difference <= tolerance:
            raise NotImplementedError(
                f"trust_positions=rope: {model.config.model_type} failed the start-up self-check ({what}: log-probs "
                f"differ by up to {difference:.3g} > {tolerance:g}); its positions or attention are not those of "
                f"a supported RoPE model. Supported model types: {supported_list()}"
            )
