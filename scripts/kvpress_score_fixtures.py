"""Build tests/data/kvpress_scores.pt: kvpress 0.5.5's own scores, kept sets and budgets on a tiny random Llama.

Runs in kvpress's venv outside the checkout (docs/kvpress.md), never in the project's (kvpress pins transformers < 5.3):

    ../kvp/bin/python scripts/kvpress_score_fixtures.py            # writes tests/data/kvpress_scores.pt

Recorded with kvpress 0.5.5, transformers 5.2.0, torch 2.13.0+cpu (the file stores the versions it was
built with). A seeded 2-layer Llama (4 query heads, 2 key/value heads, head_dim 16) reads 64 random
tokens once; a forward hook captures each attention layer's input (hidden states after the layer norm)
and the cache's keys/values, exactly what kvpress's ``BasePress.forward_hook`` hands to ``compress``. The
fixture stores those tensors themselves (queries before and after RoPE, keys, values, inv_freq), not a
seed, because weight initialisation differs between transformers versions. Then every press is asked on
the captured tensors: ``press.score`` for the scores, ``press.compress`` (or the masks AdaKV and DuoAttention
leave in ``module.masked_key_indices``) for what is kept, ``PyramidKVPress.get_layer_budget`` for budgets.
One run of each ScorerPress inside the model checks that the hook path keeps the same keys.

tests/test_compression_math.py compares streaming_lm.compression with these numbers.
"""

from __future__ import annotations

import importlib.metadata
import io
import json
import sys
import types
from pathlib import Path
from unittest import mock

import numpy as np
import torch
import transformers
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from kvpress import (AdaKVPress, DuoAttentionPress, ExpectedAttentionPress, KnormPress, PyramidKVPress,
                     SnapKVPress, StreamingLLMPress, TOVAPress)
from kvpress.utils import get_prerope_query_states

OUT = Path(__file__).resolve().parents[1] / "tests" / "data" / "kvpress_scores.pt"
N_TOKENS = 64
RATIOS = (0.25, 0.5, 0.8)
SNAP = ((8, 5), (16, 3))  # (window_size, kernel_size)
EXPECTED = ((True, True, 0.0), (False, True, 0.0), (True, False, 0.0), (True, True, 0.01))  # cov, vnorm, eps
ALPHAS = (0.0, 0.2, 1.0)


def tiny_llama():
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=2048, rope_theta=10000.0,
        attn_implementation="sdpa")
    model = transformers.LlamaForCausalLM(config).eval()
    # Random init gives near-uniform attention; larger q/k weights make the scores tell tokens apart.
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(8)
            layer.self_attn.k_proj.weight.mul_(8)
    return model


def capture(model, ids):
    """Per layer: the attention input, the RoPE tables and the cache's keys/values after prefill."""
    seen = {}

    def hook(module, args, kwargs, output):
        seen[module.layer_idx] = (kwargs["hidden_states"].detach().clone(), kwargs["position_embeddings"], kwargs)

    handles = [layer.self_attn.register_forward_hook(hook, with_kwargs=True) for layer in model.model.layers]
    cache = transformers.DynamicCache(config=model.config)
    with torch.no_grad():
        model(ids, past_key_values=cache)
    for handle in handles:
        handle.remove()
    layers = []
    for i, layer in enumerate(model.model.layers):
        module = layer.self_attn
        module.rotary_emb = model.model.rotary_emb  # what kvpress's press(model) context sets
        hidden, (cos, sin), kwargs = seen[i]
        keys, values = cache.layers[i].keys.clone(), cache.layers[i].values.clone()
        with torch.no_grad():
            q_pre = get_prerope_query_states(module, hidden)
            q_post, _ = apply_rotary_pos_emb(q_pre, q_pre, cos, sin)
        layers.append(dict(module=module, hidden=hidden, keys=keys, values=values, kwargs=kwargs,
                           q_pre=q_pre, q_post=q_post))
    return layers


def kept_of(press, layer) -> torch.Tensor:
    """bool [kv_heads, n]: the keys ``press.compress`` keeps, found back among the held ones."""
    keys = layer["keys"]
    with torch.no_grad():
        out, _ = press.compress(layer["module"], layer["hidden"], keys, layer["values"], None, layer["kwargs"])
    match = (out[0][:, :, None, :] == keys[0][:, None, :, :]).all(-1)  # [heads, kept, n]
    assert (match.sum(-1) == 1).all(), "a kept key matched no or several held keys"
    return match.any(1)


def masked_kept(press, layer) -> torch.Tensor:
    """bool [kv_heads, n]: what AdaKV / DuoAttention leave unmasked (their ``masked_key_indices``)."""
    module = layer["module"]
    if hasattr(module, "masked_key_indices"):
        del module.masked_key_indices
    with torch.no_grad():
        press.compress(module, layer["hidden"], layer["keys"], layer["values"], None, layer["kwargs"])
    keep = torch.ones(layer["keys"].shape[1:3], dtype=torch.bool)
    masked = getattr(module, "masked_key_indices", None)
    if masked is not None:
        _, heads, tokens = masked
        keep[heads, tokens] = False
    return keep


def scores_of(press, layer) -> torch.Tensor:
    with torch.no_grad():
        return press.score(layer["module"], layer["hidden"], layer["keys"], layer["values"], None,
                           layer["kwargs"])[0].clone()


def in_model_matches(model, ids, press, layers) -> None:
    """The press run by its own hooks keeps, per layer, the keys ``kept_of`` finds."""
    cache = transformers.DynamicCache(config=model.config)
    with torch.no_grad(), press(model):
        model(ids, past_key_values=cache)
    for i, layer in enumerate(layers):
        kept = kept_of(press, layer)
        expected = layer["keys"][0][kept].reshape(layer["keys"].shape[1], -1, layer["keys"].shape[-1])
        got = cache.layers[i].keys[0]
        assert torch.equal(got.sort(1).values, expected.sort(1).values), f"{press} layer {i}"


def pyramid_grid():
    rows = []
    module = types.SimpleNamespace(config=types.SimpleNamespace(num_hidden_layers=0), layer_idx=0)
    for layers in (1, 2, 5, 32):
        for n in (10, 64, 100, 1000, 4096):
            for window in (4, 8, 64):
                for beta in (1, 2, 20):
                    for ratio in (0.0, 0.1, 0.5, 0.7, 0.9, 0.99):
                        module.config.num_hidden_layers = layers
                        press = PyramidKVPress(compression_ratio=ratio, window_size=window, beta=beta)
                        budgets = []
                        for idx in range(layers):
                            module.layer_idx = idx
                            budgets.append(press.get_layer_budget(module, n))
                        rows.append(dict(layers=layers, n=n, window=window, beta=beta, ratio=ratio,
                                         budgets=budgets))
    return rows


def duo_cases(model, layers):
    """Head selection on a synthetic 8 x 4 pattern (values outside [0, 1] and ties away from the cuts),
    and the masks ``compress`` leaves on the tiny model for a 2 x 2 pattern."""
    rng = np.random.default_rng(0)
    big = rng.uniform(-0.2, 1.2, size=(8, 4)).round(6)
    tsv = "\n".join("\t".join(f"{v:.6f}" for v in row) for row in big)
    small = np.array([[0.9, 0.1], [0.4, 0.6]])
    small_tsv = "\n".join("\t".join(f"{v:.6f}" for v in row) for row in small)
    out = dict(big=dict(tsv=tsv, config=dict(sink_size=4, recent_size=16), masks={}),
               small=dict(tsv=small_tsv, config=dict(sink_size=2, recent_size=8), masks={}, kept={}))
    for name in ("big", "small"):
        case = out[name]
        scores = np.clip(np.loadtxt(io.StringIO(case["tsv"]), dtype=float, delimiter="\t"), 0, 1)
        pattern = (case["config"]["sink_size"], case["config"]["recent_size"], scores)
        for h in (0.0, 0.25, 0.5, 0.7, 1.0):
            press = DuoAttentionPress(head_compression_ratio=h)
            with mock.patch.object(DuoAttentionPress, "load_attention_pattern", return_value=pattern):
                press.post_init_from_model(model)
            case["masks"][h] = press.streaming_mask.clone()
            if name == "small":
                case["kept"][h] = [masked_kept(press, layer) for layer in layers]
    return out


def main() -> None:
    model = tiny_llama()
    torch.manual_seed(1)
    ids = torch.randint(0, model.config.vocab_size, (1, N_TOKENS))
    layers = capture(model, ids)
    rotary = model.model.rotary_emb
    fixture = dict(
        versions=dict(kvpress=importlib.metadata.version("kvpress"), transformers=transformers.__version__,
                      torch=str(torch.__version__)),
        command="/work/kvp/bin/python scripts/kvpress_score_fixtures.py",
        config=dict(layers=2, query_heads=4, kv_heads=2, head_dim=16, rope_theta=10000.0),
        inv_freq=rotary.inv_freq.clone(), attention_scaling=float(rotary.attention_scaling),
        layers=[dict(q_pre=l["q_pre"][0].clone(), q_post=l["q_post"][0].clone(), keys=l["keys"][0].clone(),
                     values=l["values"][0].clone()) for l in layers],
        knorm={}, tova={}, streaming_llm={}, snapkv={}, pyramid={}, expected={}, adakv={},
    )
    for ratio in RATIOS:
        press = KnormPress(compression_ratio=ratio)
        fixture["knorm"][ratio] = dict(scores=[scores_of(press, l) for l in layers],
                                       kept=[kept_of(press, l) for l in layers])
        press = TOVAPress(compression_ratio=ratio)
        fixture["tova"][ratio] = dict(scores=[scores_of(press, l) for l in layers],
                                      kept=[kept_of(press, l) for l in layers])
        press = StreamingLLMPress(compression_ratio=ratio, n_sink=4)
        fixture["streaming_llm"][ratio] = dict(kept=[kept_of(press, l) for l in layers])
        for window, kernel in SNAP:
            press = SnapKVPress(compression_ratio=ratio, window_size=window, kernel_size=kernel)
            fixture["snapkv"][(window, kernel, ratio)] = dict(scores=[scores_of(press, l) for l in layers],
                                                              kept=[kept_of(press, l) for l in layers])
            press = PyramidKVPress(compression_ratio=ratio, window_size=window, kernel_size=kernel)
            fixture["pyramid"][(window, kernel, ratio)] = dict(
                budgets=[press.get_layer_budget(l["module"], N_TOKENS) for l in layers],
                kept=[kept_of(press, l) for l in layers])
            for alpha in ALPHAS:
                ada = AdaKVPress(SnapKVPress(compression_ratio=ratio, window_size=window, kernel_size=kernel),
                                 alpha_safeguard=alpha)
                fixture["adakv"][("snapkv", window, kernel, ratio, alpha)] = [masked_kept(ada, l) for l in layers]
        for cov, vnorm, eps in EXPECTED:
            press = ExpectedAttentionPress(compression_ratio=ratio, use_covariance=cov, use_vnorm=vnorm,
                                           epsilon=eps)
            fixture["expected"][(cov, vnorm, eps, ratio)] = dict(scores=[scores_of(press, l) for l in layers],
                                                                 kept=[kept_of(press, l) for l in layers])
        for alpha in ALPHAS:
            ada = AdaKVPress(ExpectedAttentionPress(compression_ratio=ratio), alpha_safeguard=alpha)
            fixture["adakv"][("expected", ratio, alpha)] = [masked_kept(ada, l) for l in layers]
    fixture["pyramid_grid"] = pyramid_grid()
    fixture["duo"] = duo_cases(model, layers)
    for press in (KnormPress(0.5), TOVAPress(0.5), SnapKVPress(0.5, window_size=8), ExpectedAttentionPress(0.5),
                  PyramidKVPress(0.5, window_size=8), StreamingLLMPress(0.5)):
        in_model_matches(model, ids, press, layers)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    torch.save(fixture, OUT)
    print(f"wrote {OUT} ({OUT.stat().st_size} bytes)", json.dumps(fixture["versions"]), file=sys.stderr)


if __name__ == "__main__":
    main()
