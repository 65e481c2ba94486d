"""streaming_lm.compression against kvpress 0.5.5, and the properties its functions promise.

The kvpress numbers come from tests/data/kvpress_scores.pt, built in kvpress's own venv by
scripts/kvpress_score_fixtures.py on a tiny random Llama (2 layers, 4 query heads, 2 key/value heads,
head_dim 16, 64 tokens). It stores the tensors the presses saw, so nothing here needs kvpress or a model.
Scores must agree to 1e-5 relative; kept sets must be identical except among tokens whose kvpress scores tie
(within ``TIE`` of the lowest kept one: kvpress's ``topk`` breaks those by float rounding, the project by age).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from streaming_lm.methods import KeyNorm, SinkWindow
from streaming_lm.methods.budgets import adaptive_head_keep, check_pyramid, kept_count, pyramid_layer_budgets
from streaming_lm.methods.duo import duo_keep, load_duo_pattern, streaming_heads
from streaming_lm.methods.expected_attention import check_expected_attention, expected_attention_scores, mean_rotation
from streaming_lm.methods.snapkv import check_snapkv, snapkv_scores, window_attention
from streaming_lm.methods.ties import TIE, evict_lowest, keep_top, lowest_oldest
from streaming_lm.methods.tova import tova_scores
from streaming_lm.settings import StreamingSettings

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: threads only cost

FIXTURE = Path(__file__).resolve().parent / "data" / "kvpress_scores.pt"
KV = torch.load(FIXTURE, weights_only=True)
LAYERS = KV["layers"]
N = LAYERS[0]["keys"].shape[1]
RATIOS = (0.25, 0.5, 0.8)


def assert_scores(ours: torch.Tensor, theirs: torch.Tensor) -> None:
    """Equal where kvpress scores (its always-kept tokens hold ``max + 1``, ours ``+inf``)."""
    finite = torch.isfinite(ours)
    assert torch.equal(finite, ours != float("inf"))
    torch.testing.assert_close(ours[finite], theirs[finite].float(), rtol=1e-5, atol=1e-9)
    assert (theirs[~finite] > theirs[finite].max()).all()  # kvpress keeps the same tokens by max + 1


def assert_same_kept(ours: torch.Tensor, theirs: torch.Tensor, scores: torch.Tensor) -> None:
    """Same count per row; tokens kept by one side only must tie (kvpress's scores) with kvpress's cut."""
    assert torch.equal(ours.sum(-1), theirs.sum(-1))
    for row in range(ours.shape[0]):
        differ = ours[row] ^ theirs[row]
        if differ.any():
            cut = scores[row][theirs[row]].min()
            gap = (scores[row][differ] - cut).abs()
            assert (gap <= TIE * cut.abs()).all(), f"row {row}: kept sets differ beyond ties"


def scored(method: str, layer: dict, key) -> torch.Tensor:
    """Our scores for ``method`` on one fixture layer."""
    if method == "knorm":
        return KeyNorm.score(None, layer["keys"], layer["values"], None)
    if method == "tova":
        return tova_scores(layer["q_post"][:, -1:], layer["keys"])
    if method == "snapkv":
        window, kernel, _ = key
        return snapkv_scores(layer["q_post"][:, -window:], layer["keys"], kernel)
    cov, vnorm, eps, _ = key
    rotation = mean_rotation(KV["inv_freq"], N, 512, layer["keys"].shape[-1],
                             attention_scaling=KV["attention_scaling"])
    return expected_attention_scores(layer["q_pre"], torch.arange(N), layer["keys"], layer["values"], rotation,
                                     use_covariance=cov, use_vnorm=vnorm, epsilon=eps)


SCORED = [(method, key) for method in ("knorm", "tova", "snapkv", "expected") for key in KV[method]]


@pytest.mark.parametrize("method,key", SCORED, ids=[f"{m}-{k}" for m, k in SCORED])
def test_scores_and_kept_match_kvpress(method, key):
    ratio = key if isinstance(key, float) else key[-1]
    for i, layer in enumerate(LAYERS):
        ours = scored(method, layer, key)
        assert ours.shape == layer["keys"].shape[:2]
        assert_scores(ours, KV[method][key]["scores"][i])
        kept = keep_top(ours, kept_count(N, ratio))
        assert_same_kept(kept, KV[method][key]["kept"][i], KV[method][key]["scores"][i])


@pytest.mark.parametrize("key", list(KV["pyramid"]), ids=str)
def test_pyramidkv_matches_kvpress(key):
    window, kernel, ratio = key
    budgets = pyramid_layer_budgets(N, len(LAYERS), ratio=ratio, window_size=window)
    assert budgets == KV["pyramid"][key]["budgets"]
    for i, layer in enumerate(LAYERS):
        scores = snapkv_scores(layer["q_post"][:, -window:], layer["keys"], kernel)
        theirs = KV["snapkv"][key]["scores"][i]  # PyramidKV scores as SnapKV does
        assert_same_kept(keep_top(scores, budgets[i]), KV["pyramid"][key]["kept"][i], theirs)


def test_pyramid_budgets_match_kvpress_grid():
    """kvpress's get_layer_budget over layers × n × window × beta × ratio, fallbacks included."""
    wrong = [case for case in KV["pyramid_grid"]
             if pyramid_layer_budgets(case["n"], case["layers"], ratio=case["ratio"], window_size=case["window"],
                                      beta=case["beta"]) != case["budgets"]]
    assert len(KV["pyramid_grid"]) == 1080 and not wrong, wrong[:3]
    fallbacks = sum(len(set(case["budgets"])) == 1 for case in KV["pyramid_grid"] if case["layers"] > 1)
    assert 0 < fallbacks < 810  # both branches are exercised


ADA = list(KV["adakv"])


@pytest.mark.parametrize("key", ADA, ids=str)
def test_adakv_matches_kvpress(key):
    inner, ratio, alpha = key[0], key[-2], key[-1]
    for i, layer in enumerate(LAYERS):
        scores = scored(inner, layer, key[1:-1] if inner == "snapkv" else (True, True, 0.0, ratio))
        keep, counts = adaptive_head_keep(scores, kept_count(N, ratio), alpha)
        theirs = KV["adakv"][key][i]
        assert counts.sum() == theirs.sum() == layer["keys"].shape[0] * kept_count(N, ratio)
        differ = keep ^ theirs
        if differ.any():  # only among tokens kvpress scores alike (the window's max + 1 when B < w)
            tied = KV[inner][key[1:-1] if inner == "snapkv" else (True, True, 0.0, ratio)]["scores"][i][differ]
            assert tied.max() - tied.min() <= TIE * tied.abs().max(), "AdaKV kept sets differ beyond ties"


@pytest.mark.parametrize("ratio", RATIOS)
def test_streaming_llm_is_sink_window_at_the_event(ratio):
    """kvpress's StreamingLLMPress keeps what policy.SinkWindow holds with S = n_sink and W = B − n_sink."""
    budget = kept_count(N, ratio)
    held = SinkWindow(StreamingSettings(start_size=4, recent_size=budget - 4)).held_index(N)
    for kept in KV["streaming_llm"][ratio]["kept"]:
        for row in kept:
            assert torch.equal(row.nonzero().flatten(), held)


def write_pattern(folder: Path, tsv: str, config: dict) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "full_attention_heads.tsv").write_text(tsv + "\n")
    return folder


@pytest.mark.parametrize("name", ["big", "small"])
def test_duo_matches_kvpress(name, tmp_path):
    case = KV["duo"][name]
    pattern = load_duo_pattern(write_pattern(tmp_path / name, case["tsv"], case["config"]))
    assert (pattern.sink_size, pattern.recent_size) == (case["config"]["sink_size"], case["config"]["recent_size"])
    for h, mask in case["masks"].items():
        assert torch.equal(streaming_heads(pattern.head_scores, h), mask), h
        for i, kept in enumerate(case.get("kept", {}).get(h, [])):
            assert torch.equal(duo_keep(N, mask[i], pattern.sink_size, pattern.recent_size), kept)


# ---- properties that need no fixture ----

def naive_evict(score: torch.Tensor, count: int) -> torch.Tensor:
    """``count`` single evictions by ``lowest_oldest``, literally, row by row."""
    keep = torch.ones_like(score, dtype=torch.bool)
    for row in range(score.shape[0]):
        held = list(range(score.shape[1]))
        for _ in range(count):
            keep[row, held.pop(int(lowest_oldest(score[row, held])))] = False
    return keep


@pytest.mark.parametrize("seed", range(20))
def test_evict_lowest_is_one_by_one(seed):
    """The sorted-cluster shortcut keeps what evicting one token at a time keeps, with many near-ties
    (chains of scores each within the margin of the next) and always-kept ``+inf`` tokens."""
    gen = torch.Generator().manual_seed(seed)
    base = torch.randint(0, 4, (3, 40), generator=gen).float() + 1
    score = base * (1 + torch.randint(-3, 4, (3, 40), generator=gen) * 0.6 * TIE)
    score[:, -3:] = float("inf")
    for count in (0, 1, 7, 20, 37, 39, 40):
        assert torch.equal(evict_lowest(score, count), naive_evict(score, count)), count
    chain = 1 + torch.randint(0, 60, (2, 150), generator=gen).float() * 0.3 * TIE  # one long near-tie chain
    for count in (1, 75, 149):
        assert torch.equal(evict_lowest(chain, count), naive_evict(chain, count)), count


def test_oldest_of_tied_goes():
    score = torch.tensor([[2.0, 1.0 + 0.5 * TIE, 1.0, 3.0]])
    assert keep_top(score, 3).tolist() == [[True, False, True, True]]


@pytest.mark.parametrize("budget", [64, 65, 1000])
def test_budget_at_least_held_keeps_everything(budget):
    scores = torch.randn(2, 64)
    assert keep_top(scores, budget).all()
    keep, counts = adaptive_head_keep(scores, budget, 0.2)
    assert keep.all() and counts.tolist() == [64, 64]
    assert duo_keep(64, torch.tensor([True, False]), 4, 60).all()
    assert pyramid_layer_budgets(64, 4, ratio=0.0, window_size=8) == [64] * 4


@pytest.mark.parametrize("budget", [1, 5, 17, 40])
def test_adaptive_with_alpha_one_is_uniform(budget):
    scores = torch.randn(4, 48, generator=torch.Generator().manual_seed(budget))
    keep, counts = adaptive_head_keep(scores, budget, 1.0)
    assert torch.equal(keep, keep_top(scores, budget))
    assert counts.tolist() == [budget] * 4


def test_adaptive_keeps_the_safeguard_and_the_layer_total():
    scores = torch.randn(4, 50, generator=torch.Generator().manual_seed(0))
    scores[0] -= 10  # head 0 loses every layer-wide comparison: only its safeguard stays
    keep, counts = adaptive_head_keep(scores, 20, 0.2)
    assert counts[0] == 4 and counts.sum() == 80
    assert torch.equal(keep[0], keep_top(scores[:1], 4)[0])


def test_adaptive_safeguard_is_at_least_one_token():
    """kvpress floors the safeguard at one token when alpha > 0 (int(3 · 0.2) = 0 becomes 1)."""
    scores = torch.randn(2, 10, generator=torch.Generator().manual_seed(1))
    scores[0] -= 10
    assert adaptive_head_keep(scores, 3, 0.2)[1].tolist() == [1, 5]
    assert adaptive_head_keep(scores, 3, 0.0)[1].tolist() == [0, 6]


def test_window_larger_than_budget_keeps_its_newest():
    """SnapKV's window scores +inf; a budget below the window keeps the window's newest tokens (the tie rule;
    kvpress's topk picks any of them)."""
    gen = torch.Generator().manual_seed(0)
    scores = snapkv_scores(torch.randn(4, 4, 8, generator=gen), torch.randn(2, 12, 8, generator=gen), 3)
    assert keep_top(scores, 3).tolist() == [[False] * 9 + [True] * 3] * 2


def test_tova_at_an_event_is_the_policy_score_of_the_last_query():
    """tova_scores is policy.TOVA's every-token score, taken once from the last token's query, with that
    token kept."""
    from streaming_lm.methods import TOVA

    layer = LAYERS[1]
    attention = window_attention(layer["q_post"][:, -1:], layer["keys"])[:, 0]
    policy_score = TOVA.score(None, layer["keys"], layer["values"], attention)
    ours = tova_scores(layer["q_post"][:, -1:], layer["keys"])
    assert torch.equal(ours[0, :-1], policy_score[:-1]) and torch.isinf(ours[:, -1]).all()


@pytest.mark.parametrize("layers", [1, 2, 7, 32])
@pytest.mark.parametrize("n,ratio,window", [(1000, 0.5, 64), (4096, 0.7, 64), (300, 0.9, 8), (100, 0.3, 4)])
def test_pyramid_budgets_shape(layers, n, ratio, window):
    budgets = pyramid_layer_budgets(n, layers, ratio=ratio, window_size=window)
    assert len(budgets) == layers
    assert budgets == sorted(budgets, reverse=True)  # lower layers keep more
    assert all(1 <= b <= n for b in budgets)
    if layers > 1:  # the pyramid's mean is the uniform budget, up to each layer's rounding
        assert abs(sum(budgets) - layers * n * (1 - ratio)) <= layers / 2 + 1e-9


def test_pyramid_fallback_and_token_budget():
    # max >= min >= w fails (window as large as the budget): every layer keeps round(n (1 - r)).
    assert pyramid_layer_budgets(64, 3, ratio=0.8, window_size=16) == [13, 13, 13]
    # A token budget C plays n (1 - r); n is the tokens read.
    assert pyramid_layer_budgets(1000, 5, budget=500, window_size=64) == \
        pyramid_layer_budgets(1000, 5, ratio=0.5, window_size=64)
    # One layer keeps the pyramid's top (kvpress), max = n - w here, not the mean n (1 - r) = 500.
    assert pyramid_layer_budgets(1000, 1, ratio=0.5, window_size=64) == [936]
    assert pyramid_layer_budgets(10, 2, ratio=0.99, window_size=4) == [1, 1]  # never empty


def test_snapkv_window_attention_is_causal_within_the_window():
    gen = torch.Generator().manual_seed(0)
    weights = window_attention(torch.randn(4, 3, 8, generator=gen), torch.randn(2, 10, 8, generator=gen))
    assert torch.allclose(weights.sum(-1), torch.ones(4, 3))
    assert (weights[:, 0, 8:] == 0).all() and (weights[:, 1, 9:] == 0).all() and (weights[:, 2] > 0).all()


@pytest.mark.parametrize("layout", ["rotate_half", "interleaved"])
def test_mean_rotation_is_the_mean_of_the_model_rotations(layout):
    """R̄ applied to a vector is the mean of that vector rotated (by rotary.RotaryShift) to each position."""
    from streaming_lm.rotary import RotaryShift

    inv_freq = 1.0 / (10000 ** (torch.arange(0, 6, 2).float() / 6))  # partial rotary: 6 of 8 features
    x = torch.randn(8, dtype=torch.float64)
    shift = RotaryShift(inv_freq, layout)
    rotated = torch.stack([shift.rotate(x[None, None, :].float(), p)[0, 0] for p in range(5, 25)]).mean(0)
    torch.testing.assert_close(mean_rotation(inv_freq, 5, 20, 8, layout) @ x.float(), rotated,
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("layout", ["rotate_half", "interleaved"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rotate_by_is_the_textbook_rotation_bit_for_bit(layout, dtype):
    """``RotaryShift.rotate_by`` (pairs written half by half) is ``x·cos + rotate_half(x)·sin`` computed in float32
    and rounded once to x's dtype, to the bit: by one delta, per position, per head and position; partial rotary."""
    from streaming_lm.rotary import RotaryShift

    shift = RotaryShift(1.0 / (10000 ** (torch.arange(0, 6, 2).float() / 6)), layout)  # 6 of 8 features
    x = torch.randn(2, 3, 5, 8, generator=torch.Generator().manual_seed(0)).to(dtype)
    for delta in (-7, torch.arange(5), torch.arange(15).reshape(3, 5)):
        cos, sin = shift.cos_sin(delta, "cpu") if isinstance(delta, int) else shift.tables(delta, "cpu")
        rot = x[..., :6].float()
        pair = (torch.stack((-rot[..., 1::2], rot[..., 0::2]), -1).flatten(-2) if layout == "interleaved" else
                torch.cat((-rot[..., 3:], rot[..., :3]), -1))
        expected = torch.cat((rot * cos + pair * sin, x[..., 6:].float()), -1).to(dtype)
        assert torch.equal(shift.rotate_by(x, cos, sin), expected)
        assert torch.equal(shift.rotate(x, delta), expected)


@pytest.mark.parametrize("rope", [{"rope_type": "default"}, {"rope_type": "yarn", "factor": 4.0,
                                                              "original_max_position_embeddings": 64},
                                  {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                   "high_freq_factor": 4.0, "original_max_position_embeddings": 64}])
def test_mean_rotation_matches_the_model_rotary_module(rope):
    """With the module's inv_freq and attention_scaling (yarn scales cos and sin), R̄x is the mean over the
    positions of transformers' own rotation of x (apply_rotary_pos_emb)."""
    import transformers
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

    config = transformers.LlamaConfig(hidden_size=64, num_attention_heads=4, head_dim=16, max_position_embeddings=256,
                                      rope_parameters={**rope, "rope_theta": 10000.0})
    rotary = LlamaRotaryEmbedding(config)
    x = torch.randn(1, 1, 1, 16).expand(1, 1, 40, 16)
    cos, sin = rotary(x, torch.arange(100, 140)[None])
    expected = apply_rotary_pos_emb(x, x, cos, sin)[0][0, 0].mean(0)
    rotation = mean_rotation(rotary.inv_freq, 100, 40, 16, attention_scaling=rotary.attention_scaling)
    torch.testing.assert_close(rotation @ x[0, 0, 0], expected, rtol=1e-5, atol=1e-6)


def test_expected_attention_ignores_sink_queries_and_keeps_sinks():
    gen = torch.Generator().manual_seed(0)
    queries, keys, values = (torch.randn(s, generator=gen) for s in ((4, 12, 8), (2, 12, 8), (2, 12, 8)))
    rotation = mean_rotation(torch.ones(4), 12, 4, 8)
    index = torch.arange(12)
    score = expected_attention_scores(queries, index, keys, values, rotation, n_sink=3)
    assert torch.isinf(score[:, :3]).all() and torch.isfinite(score[:, 3:]).all()
    changed = queries.clone()
    changed[:, :3] += 100  # sink queries are left out of the statistics
    assert torch.equal(expected_attention_scores(changed, index, keys, values, rotation, n_sink=3), score)
    plain = expected_attention_scores(queries, index, keys, values, rotation, n_sink=3, use_vnorm=False)
    torch.testing.assert_close(plain[:, 3:].sum(-1), torch.ones(2))  # softmax over non-sink keys, head mean


def test_duo_ties_go_to_the_earlier_head_and_round_half_even():
    scores = torch.tensor([[0.5, 0.0], [0.0, 0.5]], dtype=torch.float64)
    assert streaming_heads(scores, 0.25).tolist() == [[False, True], [False, False]]
    assert streaming_heads(scores, 0.5).tolist() == [[False, True], [True, False]]
    assert streaming_heads(torch.zeros(2, 3), 0.25).sum() == 2  # round(1.5) = 2 (Python's round)
    assert streaming_heads(torch.zeros(2, 5), 0.25).sum() == 2  # round(2.5) = 2


# ---- bad inputs: a ValueError naming the argument and the allowed values ----

PATTERN_OK = "0.1\t0.9\n0.3\t0.2"


@pytest.mark.parametrize("call,names", [
    (lambda: check_snapkv(0, 5), ("window_size", ">= 1")),
    (lambda: check_snapkv(8, 0), ("kernel_size", ">= 1")),
    (lambda: check_snapkv(8, 4), ("kernel_size", "odd")),
    (lambda: check_snapkv(64, 5, segment_length=64), ("window_size", "segment")),
    (lambda: snapkv_scores(torch.randn(4, 8, 16), torch.randn(2, 8, 16)), ("window_size", "segment")),
    (lambda: pyramid_layer_budgets(100, 4, ratio=0.5, beta=0), ("beta", ">= 1")),
    (lambda: pyramid_layer_budgets(100, 4, ratio=0.5, beta=0.5), ("beta", ">= 1")),
    (lambda: check_pyramid(64, True), ("beta", ">= 1")),
    (lambda: check_pyramid(0, 20), ("window_size", ">= 1")),
    (lambda: check_expected_attention(n_future_positions=0), ("n_future_positions", ">= 1")),
    (lambda: check_expected_attention(epsilon=float("nan")), ("epsilon", "finite")),
    (lambda: check_expected_attention(n_sink=2.5), ("n_sink", "integer")),
    (lambda: pyramid_layer_budgets(100, 4), ("compression_ratio", "budget")),
    (lambda: pyramid_layer_budgets(100, 4, ratio=0.5, budget=10), ("compression_ratio", "budget")),
    (lambda: pyramid_layer_budgets(100, 4, ratio=1.0), ("compression_ratio", "[0, 1)")),
    (lambda: pyramid_layer_budgets(100, 4, budget=0), ("budget", ">= 1")),
    (lambda: pyramid_layer_budgets(100, 0, ratio=0.5), ("layers", ">= 1")),
    (lambda: pyramid_layer_budgets(100, 4, ratio=0.5, window_size=0), ("window_size", ">= 1")),
    (lambda: adaptive_head_keep(torch.randn(2, 8), 4, 1.5), ("alpha_safeguard", "[0, 1]")),
    (lambda: adaptive_head_keep(torch.randn(2, 8), 4, -0.1), ("alpha_safeguard", "[0, 1]")),
    (lambda: adaptive_head_keep(torch.randn(2, 8), -1, 0.2), ("budget", ">= 0")),
    (lambda: kept_count(10, -0.1), ("compression_ratio", "[0, 1)")),
    (lambda: streaming_heads(torch.zeros(2, 2), 1.5), ("head_compression_ratio", "[0, 1]")),
    (lambda: mean_rotation(torch.ones(4), 0, 0, 8), ("n_future_positions", ">= 1")),
    (lambda: mean_rotation(torch.ones(4), 0, 4, 8, layout="neox"), ("layout", "rotate_half", "interleaved")),
    (lambda: expected_attention_scores(torch.randn(4, 6, 8), torch.arange(6), torch.randn(2, 6, 8),
                                       torch.randn(2, 6, 8), torch.eye(8), n_sink=-1), ("n_sink", ">= 0")),
    (lambda: expected_attention_scores(torch.randn(4, 6, 8), torch.arange(6), torch.randn(2, 6, 8),
                                       torch.randn(2, 6, 8), torch.eye(8), epsilon=-1.0), ("epsilon", ">= 0")),
    (lambda: expected_attention_scores(torch.randn(4, 3, 8), torch.arange(3), torch.randn(2, 6, 8),
                                       torch.randn(2, 6, 8), torch.eye(8), n_sink=4), ("n_sink", "stream index")),
])
def test_bad_parameters(call, names):
    with pytest.raises(ValueError) as error:
        call()
    for name in names:
        assert name in str(error.value)


@pytest.mark.parametrize("files,names", [
    (None, ("pattern=", "no such folder", "config.json", "full_attention_heads.tsv")),
    ({"config.json": '{"sink_size": 4, "recent_size": 8}'}, ("pattern=", "full_attention_heads.tsv")),
    ({"config.json": "{", "full_attention_heads.tsv": PATTERN_OK}, ("pattern=", "config.json")),
    ({"config.json": '{"sink_size": 4}', "full_attention_heads.tsv": PATTERN_OK}, ("pattern=", "recent_size")),
    ({"config.json": '{"sink_size": -1, "recent_size": 8}', "full_attention_heads.tsv": PATTERN_OK},
     ("pattern=", "sink_size", ">= 0")),
    ({"config.json": '{"sink_size": 4, "recent_size": 0}', "full_attention_heads.tsv": PATTERN_OK},
     ("pattern=", "recent_size", ">= 1")),
    ({"config.json": '{"sink_size": 4, "recent_size": 8}', "full_attention_heads.tsv": "0.1\tx"},
     ("pattern=", "non-number")),
    ({"config.json": '{"sink_size": 4, "recent_size": 8}', "full_attention_heads.tsv": "0.1\t0.2\n0.3"},
     ("pattern=", "every row")),
    ({"config.json": '{"sink_size": 4, "recent_size": 8}', "full_attention_heads.tsv": ""},
     ("pattern=", "non-empty")),
    ({"config.json": '{"sink_size": 4, "recent_size": 8}', "full_attention_heads.tsv": "nan\t0.2"},
     ("pattern=", "finite")),
])
def test_bad_duo_pattern(tmp_path, files, names):
    folder = tmp_path / "pattern"
    if files is not None:
        folder.mkdir()
        for name, text in files.items():
            (folder / name).write_text(text)
    with pytest.raises(ValueError) as error:
        load_duo_pattern(folder)
    for name in names:
        assert name in str(error.value)


@pytest.mark.parametrize("layers,heads", [(3, 2), (2, 4), (1, 1)])
def test_duo_pattern_of_another_model(tmp_path, layers, heads):
    folder = write_pattern(tmp_path / "p", PATTERN_OK, {"sink_size": 4, "recent_size": 8})
    assert load_duo_pattern(folder, 2, 2).head_scores.shape == (2, 2)
    with pytest.raises(ValueError) as error:
        load_duo_pattern(folder, layers, heads)
    assert "pattern=" in str(error.value) and "(2, 2)" in str(error.value) and f"({layers}, {heads})" in str(error.value)


def test_fixture_records_where_it_came_from():
    assert KV["versions"]["kvpress"] == "0.5.5"
    assert KV["command"].endswith("scripts/kvpress_score_fixtures.py")
    assert FIXTURE.stat().st_size < 1_000_000
    assert not math.isnan(KV["attention_scaling"])
