"""The engine under ``evict_every=context`` (streams/context.py) as the tests drive it: the continuation's
log-probabilities and the kept sets through the request walk, greedy tokens, the independent reference (one dense
forward whose later tokens see only the kept prefill tokens), and the settings a kvpress reference case means."""

from __future__ import annotations

import numpy as np
import torch
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from streaming_lm import settings as settings_mod
from streaming_lm.generation import GenerationRequest, generate_requests, greedy
from streaming_lm.loglik import target_logprobs
from streaming_lm.methods import policy_for
from streaming_lm.streams import open_stream
from streaming_lm.streams.shared import read_contexts

from helpers.kvpress_reference import DUO_PATTERN, REFERENCE, PressCase


def kept_masks(stream, prefill: int) -> list[np.ndarray]:
    """Per layer a bool (kv heads, prefill) array: the prefill tokens each head kept at the event."""
    masks = []
    for layer in stream.cache.layers:
        tokens = layer.kept_tokens
        alive = torch.ones_like(tokens, dtype=torch.bool) if layer.dead is None else ~layer.dead[:, : tokens.shape[1]]
        mask = np.zeros((tokens.shape[0], prefill), dtype=bool)
        for head in range(mask.shape[0]):
            mask[head, tokens[head][alive[head]].numpy()] = True
        masks.append(mask)
    return masks


def engine_logprobs(model, shift, context, continuation, settings, tokenizer=None
                    ) -> tuple[list[float], list[np.ndarray]]:
    """Per continuation token log-probabilities (float64) and the kept sets (``kept_masks``), read through the request
    walk (``read_contexts``) as ``loglikelihood`` reads them (``tokenizer``: for a method with a prompt, KVzip)."""
    found = {}
    policy = policy_for(settings, model, shift, tokenizer)
    prefill = settings.schedule.prefill(len(context))

    def visit(stream, members, spare):
        branch = stream.fork()
        logits = torch.cat((stream.last_logits(), branch.read(list(continuation[:-1])))) if len(continuation) > 1 \
            else stream.last_logits()
        found["logprobs"] = target_logprobs(logits, torch.tensor(continuation)).double().tolist()
        found["kept"] = kept_masks(stream, prefill)

    read_contexts([list(context)], lambda: open_stream(model, settings, shift, policy=policy), visit,
                  schedule=settings.schedule)
    return found["logprobs"], found["kept"]


def engine_greedy(model, shift, context, new_tokens: int, settings, tokenizer=None) -> list[int]:
    eos = model.generation_config.eos_token_id
    eos = [eos] if isinstance(eos, int) else list(eos or [])
    request = GenerationRequest(list(context), new_tokens, dict(pick=greedy, eos_token_ids=eos))
    return generate_requests(model, [request], settings, shift,
                             policy=policy_for(settings, model, shift, tokenizer))[0][0].tokens


@torch.no_grad()
def masked_logprobs(model, context, continuation, prefill: int, kept: list[np.ndarray], monkeypatch) -> list[float]:
    """The definition, without the engine: one dense forward of context + continuation at original positions in which
    every token after the prefill sees, of the prefill, only what its layer and key/value head kept (``kept``), and
    the tokens after the prefill causally. The model must run SDPA (transformers' default)."""
    assert model.config._attn_implementation == "sdpa"
    sdpa = ALL_ATTENTION_FUNCTIONS["sdpa"]
    heads = model.config.num_attention_heads
    ids = list(context) + list(continuation)
    n = len(ids)
    masks = []
    for layer in kept:
        allowed = torch.ones(n, n, dtype=torch.bool).tril().repeat(heads, 1, 1)
        allowed[:, prefill:, :prefill] &= torch.from_numpy(layer).repeat_interleave(heads // layer.shape[0], 0)[:, None]
        masks.append(allowed[None])
    with monkeypatch.context() as patch:
        patch.setitem(ALL_ATTENTION_FUNCTIONS, "sdpa",
                      lambda module, q, k, v, mask, **kw: sdpa(module, q, k, v, masks[module.layer_idx], **kw))
        logits = model(torch.tensor([ids])).logits[0, len(context) - 1 : -1].double()
    return logits.log_softmax(-1).gather(-1, torch.tensor(continuation)[:, None])[:, 0].tolist()


@torch.no_grad()
def rerotated_logprobs(model, context, continuation, prefill: int, kept: list[np.ndarray]) -> list[float]:
    """The definition of positions=shifted in the context regime, without the engine (a Llama-layout model: one
    rotate_half RoPE, ``model.model.rotary_emb``): a dense prefill of ``prefill`` tokens into transformers' own cache;
    each layer keeps, per key/value head, the tokens ``kept`` marks (as many per head), its kept keys turned by
    (slot − position) so that they sit at 0 .. kept − 1; the rest of the context and the continuation are then read
    at positions kept, kept + 1, ... (kvpress's KeyRerotationPress)."""
    from transformers import DynamicCache

    from streaming_lm.forward_args import cache_kwarg

    from helpers.scored_reference import _rotate

    inv_freq = model.model.rotary_emb.inv_freq
    cache = DynamicCache()
    model(torch.tensor([list(context[:prefill])]), **{cache_kwarg(model): cache})
    width = None
    for layer, mask in zip(cache.layers, kept):
        index = torch.stack([torch.from_numpy(np.flatnonzero(row)) for row in mask])  # [heads, kept], ascending
        width = index.shape[1]
        keys = layer.keys[0].gather(1, index[..., None].expand(-1, -1, layer.keys.shape[-1]))
        moved = torch.arange(width)[None, :] - index  # each kept key from its position to its slot
        layer.keys = torch.stack([_rotate(keys[h], moved[h], inv_freq) for h in range(keys.shape[0])])[None]
        layer.values = layer.values[0].gather(1, index[..., None].expand(-1, -1, layer.values.shape[-1]))[None]
    rest = list(context[prefill:]) + list(continuation)
    logits = model(torch.tensor([rest]), **{cache_kwarg(model): cache},
                   position_ids=torch.arange(width, width + len(rest))[None]).logits[0].double()
    logits = logits[len(context) - prefill - 1 : -1]
    return logits.log_softmax(-1).gather(-1, torch.tensor(continuation)[:, None])[:, 0].tolist()


# The project's policy and parameters for each kvpress press of the reference file (docs/kvpress.md's table).
# kvpress's scorer presses protect no sinks: start_size=0 (StreamingLLMPress's n_sink is start_size).
POLICY = {"sink_window": "sink_window", "knorm": "knorm", "tova": "tova", "snapkv": "snapkv", "pyramidkv": "snapkv",
          "adakv_snapkv": "snapkv", "adakv_expected_attention": "expected_attention",
          "expected_attention": "expected_attention", "duo": "duo", "random": "random", "keydiff": "keydiff",
          "lagkv": "lagkv", "observed_attention": "observed_attention", "rerotated_knorm": "knorm",
          "rerotated_snapkv": "snapkv", "cur": "cur", "chunkkv": "snapkv", "critical_snapkv": "snapkv",
          "leverage": "leverage", "compactor": "compactor", "adakv_compactor": "compactor",
          "critical_adakv_snapkv": "snapkv", "kvzip": "kvzip", "kvzip_plus_layerwise": "kvzip",
          "kvzip_template": "kvzip", "qfilter": "qfilter"}


def press_settings(case: PressCase, method: str = "chunked"):
    """The model args that make ``streaming_hf`` the case's kvpress press."""
    params = {k: v for k, v in case.params.items() if k not in ("scorer", "n_sink", "pattern",
                                                                "head_compression_ratio", "positions")}
    if case.method in ("expected_attention", "adakv_expected_attention", "lagkv") or POLICY[case.method] == "kvzip":
        params["n_sink"] = case.params["n_sink"]
    if case.method == "pyramidkv":
        params["layer_budgets"] = "pyramid"
    if "adakv" in case.method:
        params["head_budgets"] = "adaptive"
    if "filters" in params:  # the file's path is the repository's
        params["filters"] = str(REFERENCE.parents[2] / params["filters"])
    ratio = case.compression_ratio
    if case.method == "duo":
        params |= {"pattern": str(DUO_PATTERN), "head_compression_ratio": ratio}
        ratio = None
    start = case.params.get("n_sink", 4) if case.method == "sink_window" else 0
    return settings_mod.resolve(policy=POLICY[case.method], evict_every="context", query_size=case.q,
                                compression_ratio=ratio, start_size=start, method=method, policy_params=params,
                                positions=case.params.get("positions", "original"))
