"""The kvpress 0.5.5 reference file (docs/kvpress.md): complete, consistent with kvpress's budgets, its dense and
uncompressed numbers equal to the project's own SmolLM2 forward, and its compressed numbers reproduced by a masked
dense forward from its kept sets (the conventions hold). The engine's own comparison comes with the regime."""

import json

import numpy as np
import pytest
import torch
from transformers import DynamicCache

from streaming_lm.forward_args import cache_kwarg

from helpers.context_regime import masked_logprobs
from helpers.kvpress_reference import (
    METHODS,
    QS,
    REROTATED,
    RATIOS,
    REFERENCE,
    TEMPLATED,
    assert_greedy_matches_kvpress,
    assert_logprobs_match_kvpress,
    cases,
    contexts_of,
    load,
    logprob_mismatch,
    read_duo_pattern,
    weights_sha256,
)

LAYERS, KV_HEADS = 30, 3  # SmolLM2-135M
SCORERS = ("sink_window", "knorm", "tova", "snapkv", "expected_attention", "random", "keydiff", "lagkv",
           "observed_attention", "cur", "critical_snapkv", "leverage", "compactor", "qfilter", *REROTATED)  # int(n (1 - r))


def test_file_holds_every_case():
    assert REFERENCE.stat().st_size < 3_000_000  # 2.9 MB with 26 methods: split it before it grows past
    data = load()
    assert len(data["contexts"]) == 4
    for context in data["contexts"]:
        assert len(context["context_ids"]) >= 500
        assert len(context["continuation_ids"]) == len(context["dense_logprobs"]) >= 8
    assert data["contexts"][0]["context_ids"] != data["contexts"][1]["context_ids"]
    for plain, templated in ((0, 2), (1, 3)):  # the same text and continuation, another opening
        a, b = data["contexts"][plain], data["contexts"][templated]
        assert a["context_ids"][1:] == b["context_ids"][-len(a["context_ids"]) + 1:]
        assert a["continuation_ids"] == b["continuation_ids"] and a["context_ids"][:2] != b["context_ids"][:2]
    found = {(c.method, c.compression_ratio, c.q, c.context) for c in cases()}
    wanted = {(m, r, q, i) for m in METHODS for r in RATIOS for q in QS for i in contexts_of(m)}
    wanted |= {(m, 0.0, QS[-1], i) for m in METHODS for i in contexts_of(m)}
    assert found == wanted
    for case in cases():
        assert len(case.logprobs) == len(case.continuation_ids)
        assert all(lp <= 0 and np.isfinite(lp) for lp in case.logprobs)
        assert 1 <= len(case.greedy_ids) <= data["new_tokens"]
        assert len(case.held_per_layer) == len(case.kept_b64) == LAYERS


def _pyramid_budget(layer: int, n: int, ratio: float, window: int, beta: int) -> int:
    """compression-methods.md's PyramidKV budget, written from the doc (not from kvpress)."""
    target = n * (1 - ratio)
    low = target / beta
    high = 2 * target - low
    if high >= n - window:
        high = n - window
        low = 2 * target - high
    if not n >= high >= low >= window:
        return round(target)
    return round(high - layer * (high - low) / (LAYERS - 1))


@pytest.mark.parametrize("method", METHODS)
def test_budgets_follow_the_definitions(method):
    """What each case held after the event is what compression-methods.md says kvpress keeps."""
    sink, recent, head_scores = read_duo_pattern()
    for case in cases(method):
        n, r = case.prefill_tokens, case.compression_ratio
        kept = case.kept(KV_HEADS)
        per_head = np.array([k.sum(1) for k in kept])  # (layers, heads)
        assert np.allclose(per_head.mean(1), case.held_per_layer), case.name
        if r == 0:
            assert (per_head == n).all(), case.name
            continue
        budget = int(n * (1 - r))
        if method in SCORERS:
            assert (per_head == budget).all(), case.name
        if method == "sink_window":
            expected = np.r_[np.ones(4, bool), np.zeros(n - budget, bool), np.ones(budget - 4, bool)]
            assert all((k == expected).all() for k in kept), case.name
        if method == "chunkkv":  # whole chunks of 20, the same in every head: max(1, int(chunks (1 - r))) of them
            length, chunks = case.params["chunk_length"], -(-n // case.params["chunk_length"])
            kept_chunks = [k[0, i * length : (i + 1) * length] for k in kept for i in range(chunks)]
            assert all(c.all() or not c.any() for c in kept_chunks), case.name
            assert all((k == k[0]).all() for k in kept), case.name
            assert [sum(int(c.all()) for c in kept_chunks[i * chunks : (i + 1) * chunks]) for i in range(LAYERS)] == \
                [max(1, int(chunks * (1 - r)))] * LAYERS, case.name
        if method in ("snapkv", "pyramidkv", "adakv_snapkv", "critical_snapkv"):
            assert all(k[:, -case.params["window_size"]:].all() for k in kept), case.name  # the window stays
        if method == "tova":
            assert all((k == k[0]).all() and k[:, -1].all() for k in kept), case.name  # one choice for all heads
        if method == "expected_attention":
            assert all(k[:, :4].all() for k in kept), case.name  # n_sink
        if method == "pyramidkv":
            window, beta = case.params["window_size"], case.params["beta"]
            assert [int(h[0]) for h in per_head] == [_pyramid_budget(i, n, r, window, beta) for i in range(LAYERS)]
            assert (per_head == per_head[:, :1]).all()
        if "adakv" in method:
            assert (per_head.sum(1) == KV_HEADS * budget).all(), case.name
            assert (per_head >= int(budget * case.params["alpha_safeguard"])).all(), case.name
            assert (per_head != budget).any(), case.name  # heads really differ
        if method.startswith("kvzip"):  # int(cells r) of the model (layerwise: of each layer) go; the sinks stay
            cells = KV_HEADS * n * (1 if case.params["layerwise"] else LAYERS)
            kept_cells = per_head.sum(1) if case.params["layerwise"] else per_head.sum()
            assert np.all(kept_cells == cells - int(cells * r)), case.name
            assert all(k[:, : case.params["n_sink"]].all() for k in kept), case.name
            assert (per_head != per_head[:1, :1]).any(), case.name  # layers and heads really differ
        if method in TEMPLATED:  # the opening is not replayed: its tokens after the sinks score 0 and go first
            plain = load()["contexts"][case.context - 2]["context_ids"]  # BOS + the same text
            opening = len(case.context_ids) - len(plain) + 1  # 24 tokens
            assert not any(k[:, case.params["n_sink"] : opening].any() for k in kept), case.name
        if method == "duo":
            streaming = np.zeros(head_scores.size, bool)
            streaming[np.argsort(head_scores, axis=None)[: round(r * head_scores.size)]] = True
            streaming = streaming.reshape(head_scores.shape)
            assert (per_head == np.where(streaming, sink + recent, n)).all(), case.name
            for k, layer_streaming in zip(kept, streaming):
                assert all(k[h, :sink].all() and k[h, n - recent:].all() for h in np.flatnonzero(layer_streaming))


def test_compressed_cases_differ_from_dense():
    """Otherwise matching them would prove nothing about compression."""
    dense = {i: c["dense_logprobs"] for i, c in enumerate(load()["contexts"])}
    for case in cases(ratio=0.5):
        assert logprob_mismatch(case.logprobs, dense[case.context]) is not None, case.name


def test_helpers_fail_on_a_wrong_number():
    assert assert_logprobs_match_kvpress("knorm", lambda ctx, cont, case: case.logprobs) == len(cases("knorm"))
    with pytest.raises(AssertionError, match="knorm r=0.25 Q=1 context 1"):
        assert_logprobs_match_kvpress(
            "knorm", lambda ctx, cont, case: [lp * (1 + 3e-4 * (case.context == 1 and case.compression_ratio == 0.25
                                                                  and case.q == 1)) for lp in case.logprobs])
    with pytest.raises(AssertionError, match="greedy tokens differ"):
        assert_greedy_matches_kvpress("knorm", lambda ctx, case: case.greedy_ids[:-1])
    with pytest.raises(AssertionError, match="no kvpress case"):
        assert_logprobs_match_kvpress("h2o", lambda ctx, cont, case: case.logprobs)


@torch.no_grad()
def _dense_logprobs(model, context, continuation):
    ids = torch.tensor([context + continuation])
    logits = model(ids).logits[0, len(context) - 1 : -1].double()
    return logits.log_softmax(-1).gather(-1, torch.tensor(continuation)[:, None])[:, 0].tolist()


@torch.no_grad()
def _dense_greedy(model, context, new_tokens):
    cache = {cache_kwarg(model): DynamicCache()}
    out, new = model(torch.tensor([context]), **cache), []
    while True:
        new.append(int(out.logits[0, -1].argmax()))
        if len(new) == new_tokens or new[-1] == model.generation_config.eos_token_id:
            return new
        out = model(torch.tensor([new[-1:]]), **cache)


@pytest.mark.slow
def test_dense_and_uncompressed_equal_the_projects_smollm2(smollm2, one_thread):
    """Same weights as kvpress's venv; its dense numbers and every press at r = 0 (the regime with nothing evicted:
    prefill m - Q, read Q + continuation at original positions) equal the project's dense forward."""
    model, _ = smollm2
    data = load()
    assert weights_sha256(model) == data["made_by"]["weights_sha256"]
    for context in data["contexts"]:
        ours = _dense_logprobs(model, context["context_ids"], context["continuation_ids"])
        assert logprob_mismatch(ours, context["dense_logprobs"]) is None
        assert _dense_greedy(model, context["context_ids"], data["new_tokens"]) == context["dense_greedy_ids"]
    dense = {tuple(c["context_ids"]): c for c in data["contexts"]}
    for method in METHODS:
        assert_logprobs_match_kvpress(method, lambda ctx, cont, case: dense[tuple(ctx)]["dense_logprobs"], ratio=0.0)
        assert_greedy_matches_kvpress(method, lambda ctx, case: dense[tuple(ctx)]["dense_greedy_ids"], ratio=0.0)


def test_duo_pattern_is_in_duoattention_format():
    sink, recent, scores = read_duo_pattern()
    assert scores.shape == (LAYERS, KV_HEADS) and len(np.unique(scores)) == scores.size  # no ties to break
    assert json.loads((REFERENCE.parent / "duo_pattern_smollm2" / "config.json").read_text()) == {
        "sink_size": sink, "recent_size": recent}


@pytest.mark.slow
@pytest.mark.parametrize("method", [m for m in METHODS if m not in REROTATED])  # re-rotated: positions move
def test_kept_sets_at_original_positions_reproduce_kvpress(smollm2, one_thread, monkeypatch, method):
    """The regime decomposed, on the project's transformers: one dense forward of context + continuation at original
    positions in which the last Q context tokens and the continuation see, of the prefill, only the tokens kvpress
    kept (per layer and key/value head, from the file) and each other causally, gives kvpress's log-probabilities.
    So the file's conventions (original positions, causal read, kept sets) are all an engine needs."""
    model, _ = smollm2
    case = next(c for c in cases(method, ratio=0.5) if c.q == QS[-1] and c.context == contexts_of(method)[0])
    ours = masked_logprobs(model, case.context_ids, case.continuation_ids, case.prefill_tokens, case.kept(KV_HEADS),
                           monkeypatch)
    assert logprob_mismatch(ours, case.logprobs) is None, (case.name, sum(ours), sum(case.logprobs))


@pytest.mark.slow
@pytest.mark.parametrize("method", REROTATED)
def test_kept_sets_rerotated_reproduce_kvpress(smollm2, one_thread, method):
    """KeyRerotationPress decomposed: kvpress's kept sets, their keys turned to positions 0 .. kept − 1 and the rest
    read on from there (helpers' ``rerotated_logprobs``, the engine's positions=shifted definition), give kvpress's
    log-probabilities."""
    from helpers.context_regime import rerotated_logprobs

    model, _ = smollm2
    found = [c for c in cases(method, ratio=0.5) if c.context == 0]
    assert len(found) == len(QS), f"{method}: {len(found)} cases in the file"  # never vacuous
    for case in found:
        ours = rerotated_logprobs(model, case.context_ids, case.continuation_ids, case.prefill_tokens,
                                  case.kept(KV_HEADS))
        assert logprob_mismatch(ours, case.logprobs) is None, (case.name, sum(ours), sum(case.logprobs))
