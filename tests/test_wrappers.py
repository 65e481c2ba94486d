"""kvpress's wrappers as parameters of every scored method (streaming_lm/methods/wrappers.py): ChunkKV
(``chunk_length``) and CriticalKV (``critical``). Once after the context they equal kvpress 0.5.5 itself
(tests/test_context_kvpress.py, cases ``chunkkv`` and ``critical_snapkv``); here: their selection against a naive
one written from the definition, and every K tokens the chunked path equals the token loop."""

from __future__ import annotations

import pytest
import torch
from helpers.models import tiny_llama
from test_schedule import TOL, ids, model  # noqa: F401  (the every-K suite's tiny model and stream, as fixtures)

from streaming_lm.methods import wrappers
from streaming_lm.methods.ties import TIE
from streaming_lm.rolling import score
from streaming_lm.rotary import find_rotary
from streaming_lm.settings import resolve

pytestmark = pytest.mark.usefixtures("one_thread")


def naive_chunks(score, protected, length, kept_chunks):
    """ChunkKV from its definition: chunk means of the head-summed scores (protected: +inf), the lowest chunk goes
    one at a time, the older first among ties (within TIE)."""
    total = [float("inf") if protected[:, i].any() else float(score[:, i].sum()) for i in range(score.shape[1])]
    chunks = [total[i : i + length] for i in range(0, len(total), length)]
    means = [sum(c) / len(c) for c in chunks]
    alive = list(range(len(chunks)))
    while len(alive) > kept_chunks:
        low = min(means[c] for c in alive)
        alive.remove(next(c for c in alive if means[c] <= low + TIE * abs(low)))
    return torch.tensor([i // length in alive for i in range(len(total))])


@pytest.mark.parametrize("n, length, capacity, ratio", [(23, 5, 10, None), (23, 5, 9, None), (40, 4, 0, 0.5),
                                                        (41, 20, 0, 0.25), (7, 3, 0, 0.9)])
def test_chunk_keep_follows_the_definition(n, length, capacity, ratio):
    generator = torch.Generator().manual_seed(n + length)
    score = torch.rand(3, n, generator=generator)
    score[:, 2] = score[:, 3] = 0.0  # a tie between two chunks' members
    protected = torch.zeros(3, n, dtype=torch.bool)
    protected[:, -1] = True
    alive = torch.ones(3, n, dtype=torch.bool)
    chunks = -(-n // length)
    kept_chunks = max(1, int(chunks * (1 - ratio))) if ratio is not None else capacity // length
    got = wrappers.chunk_keep(score, protected, alive, length, capacity, ratio, strict=True)
    expected = naive_chunks(score, protected, length, kept_chunks)
    assert (got == expected[None]).all()
    assert got[:, -1].all()  # the protected token's chunk stays
    if ratio is None:
        assert int(got[0].sum()) <= capacity


def test_chunk_keep_of_columns_a_head_does_not_hold():
    """On a cache with dead columns (the token loop's padded layout), chunks are of the held columns."""
    score = torch.arange(12, dtype=torch.float32).repeat(2, 1)
    alive = torch.ones(2, 12, dtype=torch.bool)
    alive[:, [1, 5]] = False
    got = wrappers.chunk_keep(score, torch.zeros_like(alive), alive, 3, 6, None, strict=True)
    held = torch.tensor([0, 2, 3, 4, 6, 7, 8, 9, 10, 11])
    assert got[:, held].tolist() == [[False] * 6 + [True] * 4] * 2  # chunks 8-10 and 11 and not got[:, [1, 5]].any()


def naive_critical(score, values, weight, first, epsilon):
    """CriticalKV from kvpress's description, head by head and query head by query head."""
    kv_heads, n, dim = values.shape
    heads = weight.shape[1] // dim
    out = torch.empty_like(score)
    for h in range(kv_heads):
        norms = []
        for q in range(h * heads // kv_heads, (h + 1) * heads // kv_heads):
            w = weight[:, q * dim : (q + 1) * dim]  # [hidden, dim]
            norms.append(torch.stack([(w @ values[h, i]).abs().sum() for i in range(n)]))
        out[h] = (score[h] + epsilon) * torch.stack(norms).mean(0)
        order = sorted(range(n), key=lambda i: (-float(score[h, i]), -i))  # best first; ties: the newer
        out[h, order[:first]] = float("inf")
    return out


def test_critical_scores_follow_the_definition():
    generator = torch.Generator().manual_seed(0)
    score = torch.rand(2, 9, generator=generator)
    values = torch.randn(2, 9, 4, generator=generator)
    weight = torch.randn(6, 16, generator=generator)  # hidden 6, 4 query heads of 4
    alive = torch.ones(2, 9, dtype=torch.bool)
    got = wrappers.critical_scores(score, values, weight, alive, 3, 1e-4)
    torch.testing.assert_close(got, naive_critical(score, values, weight, 3, 1e-4))
    assert wrappers.critical_scores(score, values, weight, alive, 0, 1e-4).isfinite().all()  # no first stage


def test_critical_needs_an_output_projection():
    class NoProjection(torch.nn.Module):
        config = tiny_llama().config

    with pytest.raises(ValueError, match=r"critical=true rescores by each attention layer's output projection "
                                         r"\(o_proj\); NoProjection has none at layers \[0, 1\]"):
        wrappers.output_projections(NoProjection())


# (policy, params, (start, recent, heavy), evict_every): each wrapper over a method reading attention, keys or the
# segment's queries
CASES = [
    pytest.param("knorm", {"chunk_length": 3}, (1, 0, 9), 4, id="chunkkv-knorm-K4"),
    pytest.param("snapkv", {"window_size": 2, "kernel_size": 3, "chunk_length": 4}, (0, 0, 8), 5, id="chunkkv-snapkv-K5"),
    pytest.param("tova", {"critical": True}, (1, 1, 6), 3, id="critical-tova-K3"),
    pytest.param("snapkv", {"window_size": 2, "kernel_size": 3, "critical": True, "first_stage_ratio": 0.25},
                 (0, 0, 8), 5, id="critical-snapkv-K5"),
    pytest.param("keydiff", {"critical": True, "chunk_length": 2}, (1, 0, 7), 3, id="both-keydiff-K3"),
    pytest.param("snapkv", {"window_size": 2, "kernel_size": 3, "critical": True, "head_budgets": "adaptive"},
                 (0, 0, 8), 5, id="critical-adakv-snapkv-K5"),
]


def settings_of(policy, params, budgets, every, method, chunk_size=5):
    start, recent, heavy = budgets
    return resolve(policy=policy, policy_params=params, start_size=start, recent_size=recent, heavy_size=heavy,
                   evict_every=every, positions="original", method=method, chunk_size=chunk_size)


@pytest.mark.parametrize("policy, params, budgets, every", CASES)
def test_every_k_the_chunked_path_equals_the_token_loop(model, ids, policy, params, budgets, every):
    shift = find_rotary(model)
    token = score(model, ids, settings_of(policy, params, budgets, every, "token"), shift)
    assert token.evicted > 0
    if params.get("head_budgets") != "adaptive":  # AdaKV's heads differ: one may hold more than C
        assert token.max_held <= sum(budgets) + every - 1
    for chunk in (1, 4, 7):
        chunked = score(model, ids, settings_of(policy, params, budgets, every, "chunked", chunk), shift)
        torch.testing.assert_close(chunked.logprobs, token.logprobs, rtol=0, atol=TOL)
        assert chunked.evicted == token.evicted
    # The wrapper changed what was kept: not the method alone.
    plain = {k: v for k, v in params.items() if k not in ("chunk_length", "critical", "first_stage_ratio")}
    alone = score(model, ids, settings_of(policy, plain, budgets, every, "token"), shift)
    assert (alone.logprobs - token.logprobs).abs().max() > 1e-3
