"""KVzip (methods/kvzip.py): its replay passes, and its kept sets on a tiny model against the definition written
without the engine (one dense forward over the prefill and a replay pass, every layer's queries and keys captured).
kvpress 0.5.5's own numbers on SmolLM2: tests/test_context_kvpress.py."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from helpers.context_regime import engine_logprobs
from helpers.models import CharTokenizer, tiny_llama

from streaming_lm.engine import Engine
from streaming_lm.methods import policy_for
from streaming_lm.methods.kvzip import FIRST_PROMPT, NEXT_PROMPT
from streaming_lm.rotary import find_rotary
from streaming_lm.settings import resolve

CONTEXT, CONTINUATION = 40, 4
TEMPLATE = CharTokenizer(chat_template="<user>...")


def settings(q=2, ratio=0.5, **params):
    return resolve(policy="kvzip", evict_every="context", query_size=q, compression_ratio=ratio, start_size=0,
                   policy_params=params)


@pytest.fixture(scope="module")
def model():
    return tiny_llama(seed=5)


@pytest.fixture(scope="module")
def ids():
    torch.manual_seed(11)
    return torch.randint(0, 128, (CONTEXT + CONTINUATION,)).tolist()


def test_replay_passes_follow_kvpress_prompts(model):
    """The first pass: kvpress's prompt, the suffix, the chunk; later ones: its other prompt and the last 8 tokens of
    the chunk before. A prefill opening with the chat template is replayed without the opening, the template's
    assistant turn as suffix; any other prefill whole, with a newline."""
    encode = TEMPLATE.encode
    policy = policy_for(settings(replay_chunk_size=10), model, None, TEMPLATE)
    opening = encode("<user>")
    plain = list(range(30, 55))
    passes = policy.replay_passes(plain)
    assert [(a, b) for a, b, _ in passes] == [(0, 10), (10, 20), (20, 25)]
    assert passes[0][2] == encode(FIRST_PROMPT) + encode("\n") + plain[:10]
    assert passes[1][2] == encode(NEXT_PROMPT) + plain[2:10] + encode("\n") + plain[10:20]
    templated = opening + plain
    passes = policy.replay_passes(templated)
    assert [(a, b) for a, b, _ in passes][0] == (len(opening), len(opening) + 10)
    assert passes[0][2] == encode(FIRST_PROMPT) + encode("</user><assistant>") + plain[:10]


def definition_scores(model, prefill, passes, plus: bool, n_sink: int) -> np.ndarray:
    """float64 [layers, kv_heads, n]: KVzip's scores from the definition: per pass one dense forward of the prefill
    then the replay ids (positions continuing), every layer's queries, keys and values captured; a replay query's
    weights over the sinks, the chunk and the replay causally, scaled by the model's own scaling."""
    sdpa = ALL_ATTENTION_FUNCTIONS["sdpa"]
    n = len(prefill)
    layers, kv_heads = model.config.num_hidden_layers, model.config.num_key_value_heads
    scores = np.zeros((layers, kv_heads, n))
    for start, end, replay in passes:
        seen, hidden = {}, {}

        def capture(module, q, k, v, mask, **kw):
            seen[module.layer_idx] = (q[0].double(), k[0].double(), v[0].double(), kw["scaling"])
            return sdpa(module, q, k, v, mask, **kw)

        hooks = [layer.self_attn.register_forward_pre_hook(
            lambda module, args, kwargs: hidden.__setitem__(module.layer_idx, kwargs["hidden_states"][0].double()),
            with_kwargs=True) for layer in model.model.layers]
        saved = ALL_ATTENTION_FUNCTIONS["sdpa"]
        ALL_ATTENTION_FUNCTIONS["sdpa"] = capture
        try:
            with torch.no_grad():
                model(torch.tensor([list(prefill) + list(replay)]))
        finally:
            ALL_ATTENTION_FUNCTIONS["sdpa"] = saved
            for hook in hooks:
                hook.remove()
        q_len = len(replay)
        sink = min(n_sink, start)
        for layer, (queries, keys, values, scale) in seen.items():
            heads, dim = queries.shape[0], queries.shape[-1]
            group = heads // kv_heads
            weight = model.model.layers[layer].self_attn.o_proj.weight.detach().double()
            columns = list(range(sink)) + list(range(start, end)) + list(range(n, n + q_len))
            for head in range(heads):
                kv = head // group
                for row in range(q_len):
                    visible = columns[: sink + end - start + row + 1]
                    logits = keys[kv, visible] @ queries[head, n + row] * scale
                    weights = torch.softmax(logits, 0)
                    if plus:
                        out_norms = (values[kv, visible] @ weight[:, head * dim:(head + 1) * dim].T).norm(dim=-1)
                        weights = weights / hidden[layer][n + row].norm() * out_norms
                    chunk = weights[sink : sink + end - start].numpy()
                    scores[layer, kv, start:end] = np.maximum(scores[layer, kv, start:end], chunk)
    return scores


@pytest.mark.parametrize("layerwise, plus, chunk", [(False, False, 2048), (True, True, 15), (False, True, 12)],
                         ids=["kvzip", "plus-layerwise-3-passes", "plus-3-passes"])
def test_kept_sets_equal_the_definition(model, ids, layerwise, plus, chunk):
    """The engine's kept (layer, head, token) cells are the definition's: the n_sink first stay, then the ``int(cells ·
    r)`` lowest go, of the whole model or of each layer (the scores of a random model have no ties)."""
    q, ratio, n_sink = 2, 0.5, 3
    s = settings(q, ratio, layerwise=layerwise, kvzip_plus_normalization=plus, replay_chunk_size=chunk, n_sink=n_sink)
    tokenizer = CharTokenizer()
    _, kept = engine_logprobs(model, find_rotary(model), ids[:CONTEXT], ids[CONTEXT:], s, tokenizer)
    prefill = ids[: CONTEXT - q]
    policy = policy_for(s, model, None, tokenizer)
    scores = definition_scores(model, prefill, policy.replay_passes(prefill), plus, n_sink)
    scores[..., :n_sink] = math.inf
    expected = np.ones_like(scores, dtype=bool)
    groups = [np.s_[layer] for layer in range(len(scores))] if layerwise else [np.s_[:]]
    for group in groups:
        part = scores[group]
        order = np.argsort(part, axis=None, kind="stable")[: int(part.size * ratio)]
        flat = np.ones(part.size, dtype=bool)
        flat[order] = False
        expected[group] = flat.reshape(part.shape)
    ours = np.stack(kept)
    assert (ours == expected).all(), f"{int((ours != expected).sum())} cells differ"
    counts = ours.sum(-1)
    assert (counts != counts[:1, :1]).any(), "the layers and heads should keep different counts"
    if layerwise:
        assert (counts.sum(1) == counts.sum(1)[0]).all()


def test_the_replay_leaves_the_stream_as_the_prefill_left_it(model, ids):
    """After the event the cache holds only prefill tokens and the accounting does not count the replay."""
    s = settings()
    engine = Engine(model, s, CharTokenizer())
    stream = engine.open()
    stream.extend(ids[: CONTEXT - 2])
    stream.compress()
    assert stream.n == CONTEXT - 2
    assert max(stream.held_per_layer) <= CONTEXT - 2
    assert all(layer.keys.shape[-2] <= CONTEXT - 2 for layer in stream.cache.layers)
    assert stream.evicted > 0
    # The replay ran without autograd (compress is called outside any inference_mode by the request walk): the state
    # forks, as the walk does for two questions after one prefill.
    assert not any(layer.keys.requires_grad for layer in stream.fork().cache.layers)


@pytest.mark.parametrize("args, message", [
    (dict(evict_every=4, compression_ratio=None, heavy_size=8), "evict_every=context"),
    (dict(positions="shifted"), "positions=original"),
    (dict(policy_params={"chunk_length": 4}), "takes no wrapper"),
    (dict(policy_params={"critical": True}), "takes no wrapper"),
    (dict(policy_params={"replay_chunk_size": 0}), "replay_chunk_size"),
])
def test_bad_arguments_are_refused_before_loading(args, message):
    base = dict(policy="kvzip", evict_every="context", compression_ratio=0.5, start_size=0)
    with pytest.raises(ValueError, match=message):
        resolve(**(base | args))


def test_an_engine_without_the_tokenizer_is_refused(model):
    with pytest.raises(ValueError, match="tokenizer"):
        Engine(model, settings(), None)
