"""The lm-eval adapter on a tiny local checkpoint: arguments, dense equality (refusals: tests/test_bad_inputs.py)."""

import pytest
from lm_eval.models.huggingface import HFLM

from helpers.requests import rolling
from streaming_lm.rotary import find_rotary
from helpers.engine import score_stream

from streaming_lm import StreamingHFLM

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: threads only cost

TEXT = " The tower is 324 metres tall, about the same height as an 81-storey building. " * 3


@pytest.fixture(scope="module")
def dense(tiny_dir):
    return HFLM(pretrained=str(tiny_dir), device="cpu", dtype="float32")


def streaming(tiny_dir, **kwargs):
    return StreamingHFLM(pretrained=str(tiny_dir), device="cpu", dtype="float32", **kwargs)


def test_compression_ratio_sets_the_budget(tiny_dir):
    lm = streaming(tiny_dir, start_size=4, compression_ratio=0.75, max_length=200)
    assert (lm.streaming.capacity, lm.streaming.recent_size) == (50, 46)
    assert lm.get_model_info()["streaming"]["compression_ratio"] == 0.75


def test_defaults_and_results_config(tiny_dir):
    lm = streaming(tiny_dir)
    info = lm.get_model_info()["streaming"]
    assert info | {"evicted_tokens": 0} == {
        "start_size": 4, "recent_size": 1020, "positions": "shifted", "method": "chunked",
        "compression_ratio": None, "chunk_size": 256, "stride": None, "policy": "sink_window", "heavy_size": 0,
        "evict_every": 1, "query_size": None, "policy_params": {}, "capacity": 1024, "evicted_tokens": 0,
    }


@pytest.mark.parametrize("method", ["chunked", "token"])
@pytest.mark.parametrize("positions", ["shifted", "original"])
def test_short_requests_equal_dense_hf(tiny_dir, dense, positions, method):
    lm = streaming(tiny_dir, start_size=4, recent_size=400, positions=positions, method=method, chunk_size=64)
    requests = rolling(TEXT, TEXT[:50])
    assert len(lm.tok_encode(TEXT)) + 1 <= 404
    expected = dense.loglikelihood_rolling(requests)
    got = lm.loglikelihood_rolling(requests)
    assert got == pytest.approx(expected, rel=1e-4)
    assert lm.get_model_info()["streaming"]["evicted_tokens"] == 0


@pytest.mark.parametrize("method", ["chunked", "token"])
def test_long_requests_stream(tiny_dir, dense, method):
    lm = streaming(tiny_dir, start_size=4, recent_size=60, method=method, chunk_size=32)
    requests = rolling(TEXT)
    n_tokens = len(lm.tok_encode(TEXT)) + 1
    (got,) = lm.loglikelihood_rolling(requests)
    (expected,) = dense.loglikelihood_rolling(requests)
    assert lm.get_model_info()["streaming"]["evicted_tokens"] == n_tokens - 1 - 64
    assert abs(got - expected) > 0.05  # nats; float noise is ~1e-4
    # The number is the token loop's on the same stream, not merely one other than dense.
    ids = [lm.prefix_token_id, *lm.tok_encode(TEXT)]
    reference = score_stream(lm.model, ids, lm.streaming, find_rotary(lm.model)).logprobs.double().sum()
    assert got == pytest.approx(float(reference), rel=1e-5)


@pytest.mark.parametrize("method", ["chunked", "token"])
def test_results_report_tokens_held_per_layer_and_head(tiny_dir, method):
    """PyramidKV holds different counts per layer: the results file reports each layer's most held (the engine's
    own, on every request type) and, per head, their mean and maximum."""
    from streaming_lm.rolling import score
    from helpers.requests import generations, pairs

    lm = streaming(tiny_dir, policy="snapkv", window_size=2, kernel_size=3, evict_every=5, start_size=0,
                   heavy_size=8, layer_budgets="pyramid", beta=2, method=method)
    assert "held_tokens_per_layer" not in lm.get_model_info()["streaming"]  # nothing read yet
    lm.loglikelihood_rolling(rolling(TEXT))
    info = lm.get_model_info()["streaming"]
    expected = score(lm.model, lm.rolling_ids(TEXT), lm.streaming, find_rotary(lm.model))
    per_layer = info["held_tokens_per_layer"]
    assert per_layer == list(expected.held_per_layer) and len(per_layer) == lm.model.config.num_hidden_layers
    assert per_layer[0] > per_layer[-1]  # the pyramid: the first layer keeps the most
    assert info["held_tokens_per_head"] == {"mean": sum(per_layer) / len(per_layer), "max": expected.max_held}
    assert info["policy_params"]["layer_budgets"] == "pyramid"
    lm.loglikelihood(pairs((TEXT, " and more")))
    lm.generate_until(generations((TEXT[:80], {"until": [], "max_gen_toks": 3})))
    after = lm.get_model_info()["streaming"]["held_tokens_per_layer"]
    assert len(after) == len(per_layer) and all(a >= b for a, b in zip(after, per_layer))


def test_results_report_the_exact_mean_where_heads_hold_different_counts(tiny_dir):
    """AdaKV: the heads of a layer hold different counts, padded to the fullest; the results file's mean per head is
    the heads' own (from their counts), below the mean of the layers' widths, which is what memory allocates."""
    from streaming_lm.rolling import score

    lm = streaming(tiny_dir, policy="snapkv", window_size=2, kernel_size=3, evict_every=5, start_size=0,
                   heavy_size=8, head_budgets="adaptive", alpha_safeguard=0.0)
    lm.loglikelihood_rolling(rolling(TEXT))
    info = lm.get_model_info()["streaming"]
    expected = score(lm.model, lm.rolling_ids(TEXT), lm.streaming, find_rotary(lm.model))
    heads = [count for layer in expected.held_per_head for count in layer]
    assert len(expected.held_per_head) == len(info["held_tokens_per_layer"])
    assert info["held_tokens_per_head"]["mean"] == pytest.approx(sum(heads) / len(heads))
    widths = info["held_tokens_per_layer"]
    assert info["held_tokens_per_head"]["mean"] < sum(widths) / len(widths)  # the heads differ: not the widths
    assert [max(layer) for layer in expected.held_per_head] == widths  # the fullest head is the width
