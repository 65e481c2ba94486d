"""The engine on the real SmolLM2-135M (float32), against the dense model and the definition."""

import pytest
import torch
from lm_eval.models.huggingface import HFLM
from helpers.requests import rolling
from helpers.reference import dense_logprobs, original_positions_logprobs, perplexity, shifted_llama_logprobs
from helpers.engine import score_stream, score_stream_chunked

from streaming_lm import StreamingHFLM
from streaming_lm.rotary import find_rotary
from streaming_lm.settings import StreamingSettings

pytestmark = pytest.mark.slow

START, RECENT = 4, 36  # C = 40: a 160-token stream evicts on its last 119 steps (3 C)
STREAM_TOKENS = 160  # longer streams are the tiny models' (tests/test_long_haul.py, test_chunked.py)
SHORT_CHARS = 150  # the no-eviction request: about 35 tokens, read in chunks of 16


@pytest.fixture(scope="module")
def stream(smollm2, excerpt_text):
    model, tokenizer = smollm2
    ids = [tokenizer.bos_token_id, *tokenizer(excerpt_text, add_special_tokens=False).input_ids]
    assert len(ids) >= STREAM_TOKENS
    return torch.tensor(ids[:STREAM_TOKENS])


@pytest.fixture(scope="module")
def token_scores(smollm2, stream):
    """The token loop, the reference of every other check here, run once per positions mode."""
    model, _ = smollm2
    return {
        positions: score_stream(model, stream, StreamingSettings(START, RECENT, positions), find_rotary(model))
        for positions in ("shifted", "original")
    }


@pytest.fixture(scope="module")
def short_dense(smollm2, excerpt_text):
    """A short request and dense ``hf``'s numbers for it, computed once."""
    model, tokenizer = smollm2
    request = rolling(excerpt_text[:SHORT_CHARS])
    return request, HFLM(pretrained=model, tokenizer=tokenizer, device="cpu").loglikelihood_rolling(request)


@pytest.mark.parametrize("method", ["chunked", "token"])
@pytest.mark.parametrize("positions", ["shifted", "original"])
def test_short_stream_equals_dense_hf(smollm2, short_dense, positions, method):
    model, tokenizer = smollm2
    request, dense = short_dense
    n_tokens = len(tokenizer(request[0].args[0], add_special_tokens=False).input_ids) + 1
    lm = StreamingHFLM(pretrained=model, tokenizer=tokenizer, device="cpu", start_size=4,
                       recent_size=n_tokens - 5, positions=positions, method=method, chunk_size=16)
    assert lm.streaming.capacity + 1 == n_tokens > 2 * 16  # the longest stream that must equal dense, 3+ chunks
    assert lm.loglikelihood_rolling(request) == pytest.approx(dense, rel=1e-4)
    assert lm.get_model_info()["streaming"]["evicted_tokens"] == 0


def test_original_equals_masked_single_pass(smollm2, stream, token_scores):
    model, _ = smollm2
    scored = token_scores["original"]
    reference = original_positions_logprobs(model, stream, START, RECENT)
    assert scored.evicted == STREAM_TOKENS - 1 - (START + RECENT)
    assert perplexity(scored.logprobs) == pytest.approx(perplexity(reference), rel=1e-5)
    torch.testing.assert_close(scored.logprobs, reference, rtol=0, atol=1e-3)
    # ... and eviction changed the numbers.
    assert abs(perplexity(scored.logprobs) / perplexity(dense_logprobs(model, stream)) - 1) > 1e-3


def test_shifted_equals_naive_loop(smollm2, stream, token_scores):
    model, _ = smollm2
    scored = token_scores["shifted"]
    reference = shifted_llama_logprobs(model, stream, START, RECENT)
    assert scored.max_held == START + RECENT
    assert perplexity(scored.logprobs) == pytest.approx(perplexity(reference), rel=1e-5)
    torch.testing.assert_close(scored.logprobs, reference, rtol=0, atol=1e-3)


@pytest.mark.parametrize("positions", ["shifted", "original"])
@pytest.mark.parametrize("chunk", [32, 100])  # below and above C; 159 scored tokens: the last chunk is partial
def test_chunked_equals_token_loop(smollm2, stream, token_scores, positions, chunk):
    model, _ = smollm2
    settings = StreamingSettings(START, RECENT, positions)
    chunked = score_stream_chunked(model, stream, settings, find_rotary(model), chunk)
    token = token_scores[positions]
    assert chunked.evicted == token.evicted
    assert (chunked.logprobs - token.logprobs).abs().max() <= 1e-3
    assert perplexity(chunked.logprobs) == pytest.approx(perplexity(token.logprobs), rel=1e-5)
