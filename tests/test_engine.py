"""The token-by-token engine against the definition, on tiny random models (fast).

Dense numbers for short streams and the cache bounds on every path and policy: tests/test_paths.py."""

import pytest
import torch
from helpers.models import tiny_llama
from helpers.reference import original_positions_logprobs, perplexity, shifted_llama_logprobs
from helpers.engine import score_stream

from streaming_lm.methods import SinkWindow
from streaming_lm.storage import EvictingDynamicCache
from streaming_lm.rotary import find_rotary
from streaming_lm.loglik import NoEvictionError
from streaming_lm.settings import StreamingSettings

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: threads only cost


@pytest.fixture(scope="module")
def model():
    return tiny_llama()


@pytest.fixture(scope="module")
def ids():
    torch.manual_seed(1)
    return torch.randint(0, 128, (200,))


@pytest.mark.parametrize("start,recent", [(4, 20), (0, 7), (1, 50), (3, 1)])
def test_shifted_equals_naive_loop(model, ids, start, recent):
    scored = score_stream(model, ids, StreamingSettings(start, recent, "shifted"), find_rotary(model))
    reference = shifted_llama_logprobs(model, ids, start, recent)
    torch.testing.assert_close(scored.logprobs, reference, rtol=0, atol=1e-4)
    assert perplexity(scored.logprobs) == pytest.approx(perplexity(reference), rel=1e-5)


@pytest.mark.parametrize("start,recent", [(4, 20), (0, 7), (2, 1)])
def test_original_equals_masked_single_pass(model, ids, start, recent):
    scored = score_stream(model, ids, StreamingSettings(start, recent, "original"), find_rotary(model))
    reference = original_positions_logprobs(model, ids, start, recent)
    torch.testing.assert_close(scored.logprobs, reference, rtol=0, atol=1e-4)
    assert perplexity(scored.logprobs) == pytest.approx(perplexity(reference), rel=1e-5)


def test_positions_modes_differ_once_evicting(model, ids):
    shifted = score_stream(model, ids, StreamingSettings(4, 20, "shifted"), find_rotary(model))
    original = score_stream(model, ids, StreamingSettings(4, 20, "original"), find_rotary(model))
    assert not torch.allclose(shifted.logprobs, original.logprobs, atol=1e-4)


def test_model_that_ignores_the_cache_raises(model, ids):
    """A forward that drops the cache is the silent-dense bug: it must raise, not score."""

    class CacheIgnoring(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner, self.config = inner, inner.config

        @property
        def device(self):
            return self.inner.device

        def forward(self, input_ids, position_ids=None, use_cache=None, cache=None, **kwargs):
            return self.inner(input_ids=input_ids, position_ids=position_ids, use_cache=False)

    with pytest.raises(NoEvictionError, match="without a single eviction"):
        score_stream(CacheIgnoring(model), ids[:40], StreamingSettings(4, 20), find_rotary(model))


def test_trivial_streams(model):
    settings = StreamingSettings(4, 20)
    assert score_stream(model, [5], settings, find_rotary(model)).logprobs.numel() == 0
    assert score_stream(model, [5, 6], settings, find_rotary(model)).logprobs.numel() == 1


def test_cache_reports_capacity_and_resets():
    cache = EvictingDynamicCache(2, SinkWindow(StreamingSettings(2, 3)), None)
    keys = torch.randn(1, 1, 7, 4)
    cache.update(keys, keys, 0)
    cache.update(keys, keys, 1)
    assert cache.held_tokens() == [5, 5] and cache.evicted_tokens == 2
    assert torch.equal(cache.layers[0].keys[..., :2, :], keys[..., :2, :])
    assert torch.equal(cache.layers[0].keys[..., 2:, :], keys[..., -3:, :])  # original: no rotation
    cache.reset()
    assert cache.evicted_tokens == 0
