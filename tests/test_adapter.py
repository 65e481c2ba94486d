"""The lm-eval adapter on a tiny local checkpoint: arguments, dense equality, refusals."""

import pytest
import transformers
from lm_eval.models.huggingface import HFLM

from helpers.requests import rolling
from streaming_lm.support import find_rotary
from helpers.engine import score_stream

from streaming_lm import StreamingHFLM

TEXT = " The tower is 324 metres tall, about the same height as an 81-storey building. " * 3


@pytest.fixture(scope="module")
def dense(tiny_dir):
    return HFLM(pretrained=str(tiny_dir), device="cpu", dtype="float32")


def streaming(tiny_dir, **kwargs):
    return StreamingHFLM(pretrained=str(tiny_dir), device="cpu", dtype="float32", **kwargs)


BAD_ARGS = [
    (dict(start_size=-1), "start_size must be an integer >= 0"),
    (dict(start_size=2.5), "start_size must be an integer >= 0"),
    (dict(start_size="four"), "start_size must be an integer >= 0"),
    (dict(recent_size=0), "recent_size must be an integer >= 1"),
    (dict(recent_size=-3), "recent_size must be an integer >= 1"),
    (dict(recent_size=10.5), "recent_size must be an integer >= 1"),
    (dict(recent_size=16, compression_ratio=0.5), "either recent_size or compression_ratio"),
    (dict(compression_ratio=1.0), r"compression_ratio must be in \[0, 1\)"),
    (dict(compression_ratio=-0.1), r"compression_ratio must be in \[0, 1\)"),
    (dict(compression_ratio="half"), r"compression_ratio must be a number in \[0, 1\)"),
    (dict(compression_ratio=0.99, max_length=100), "recent_size must be >= 1"),
    (dict(positions="absolute"), "positions must be one of shifted, original"),
    (dict(method="fast"), "method must be one of chunked, token"),
    (dict(chunk_size=0), "chunk_size must be an integer >= 1"),
    (dict(chunk_size=1.5), "chunk_size must be an integer >= 1"),
]


@pytest.mark.parametrize("kwargs,message", BAD_ARGS)
def test_bad_arguments_fail_before_loading(kwargs, message):
    # The path does not exist: reaching the loader would raise a different error.
    with pytest.raises(ValueError, match=message):
        StreamingHFLM(pretrained="/nonexistent/model", **kwargs)


def test_ratio_without_max_length_fails_before_weights_load(tmp_path, monkeypatch):
    from helpers.models import save_tiny

    config = transformers.LlamaConfig(
        vocab_size=258, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=16,
    )
    model_dir = save_tiny(tmp_path / "short", config)

    def no_weights(*args, **kwargs):
        raise AssertionError("weights were loaded before the arguments were checked")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", no_weights)
    # max_length 16, ratio 0.5 -> C = 8 = start_size: no recent token left.
    with pytest.raises(ValueError, match="recent_size must be >= 1"):
        StreamingHFLM(pretrained=str(model_dir), device="cpu", start_size=8, compression_ratio=0.5)


def test_ratio_uses_the_given_max_length(tmp_path):
    from helpers.models import save_tiny

    config = transformers.LlamaConfig(
        vocab_size=258, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=16,
    )
    model_dir = save_tiny(tmp_path / "short", config)
    # The config alone (16) would leave no recent token; the max_length given (1000) governs.
    lm = StreamingHFLM(pretrained=str(model_dir), device="cpu", start_size=8, compression_ratio=0.5, max_length=1000)
    assert (lm.streaming.capacity, lm.streaming.recent_size) == (500, 492)


def test_unsupported_model_fails_after_loading(tmp_path):
    from helpers.models import save_tiny

    config = transformers.MistralConfig(
        vocab_size=258, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, sliding_window=8,
    )
    model_dir = save_tiny(tmp_path / "mistral", config)
    with pytest.raises(NotImplementedError, match="sliding-window"):
        streaming(model_dir)


def test_compression_ratio_sets_the_budget(tiny_dir):
    lm = streaming(tiny_dir, start_size=4, compression_ratio=0.75, max_length=200)
    assert (lm.streaming.capacity, lm.streaming.recent_size) == (50, 46)
    assert lm.get_model_info()["streaming"]["compression_ratio"] == 0.75


def test_defaults_and_results_config(tiny_dir):
    lm = streaming(tiny_dir)
    info = lm.get_model_info()["streaming"]
    assert info | {"evicted_tokens": 0} == {
        "start_size": 4, "recent_size": 1020, "positions": "shifted", "method": "chunked",
        "compression_ratio": None, "chunk_size": 128, "stride": None, "capacity": 1024, "evicted_tokens": 0,
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
