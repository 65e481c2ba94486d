"""The chunked path against the token loop (its reference), on tiny random models."""

import contextlib

import pytest
import torch
import transformers
from helpers.models import tiny_llama
from helpers.reference import perplexity, shifted_one_layer_logprobs
from helpers.engine import score_stream, score_stream_chunked

from streaming_lm.streams.attention import state_in_pass
from streaming_lm.rotary import find_rotary
from streaming_lm.settings import StreamingSettings

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: threads only cost


@contextlib.contextmanager
def threads(n):
    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def tiny_qwen2():
    config = transformers.Qwen2Config(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=1, max_position_embeddings=4096,
    )
    torch.manual_seed(0)
    return transformers.Qwen2ForCausalLM(config).eval()


MODELS = {
    "llama": tiny_llama,
    "llama3-rope": lambda: tiny_llama(
        seed=2, rope_parameters={"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0,
                                 "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                 "original_max_position_embeddings": 256}
    ),
    "qwen2": tiny_qwen2,
}


@pytest.fixture(scope="module", params=list(MODELS))
def model(request):
    return MODELS[request.param]()


def assert_same(chunked, token):
    assert chunked.evicted == token.evicted
    assert (chunked.logprobs - token.logprobs).abs().max() <= 1e-3
    assert perplexity(chunked.logprobs) == pytest.approx(perplexity(token.logprobs), rel=1e-5)


CASES = [
    # (start, recent, chunk, stream length)
    (0, 16, 32, 150),  # recent < chunk, no sinks
    (1, 32, 32, 150),  # recent == chunk
    (4, 48, 16, 150),  # recent > chunk
    (4, 20, 7, 150),  # stream ends mid-chunk
    (4, 12, 64, 50),  # stream shorter than one chunk, still evicting
    (4, 60, 5, 40),  # short stream: no eviction, dense numbers
    (3, 1, 5, 60),  # one recent token
    (4, 20, 1, 60),  # chunk of one token is the token loop
]


@pytest.mark.parametrize("positions", ["shifted", "original"])
@pytest.mark.parametrize("start,recent,chunk,length", CASES)
def test_chunked_equals_token_loop(model, positions, start, recent, chunk, length):
    torch.manual_seed(length + start)
    ids = torch.randint(0, 128, (length,))
    settings = StreamingSettings(start, recent, positions)
    shift = find_rotary(model)
    token = score_stream(model, ids, settings, shift)
    chunked = score_stream_chunked(model, ids, settings, shift, chunk)
    assert_same(chunked, token)
    assert chunked.max_held == min(length - 1, start + recent)


def test_chunked_restores_the_attention_implementation():
    model = tiny_llama()
    before = model.config._attn_implementation
    score_stream_chunked(model, torch.arange(40) % 100, StreamingSettings(2, 8), find_rotary(model), 16)
    assert model.config._attn_implementation == before


def test_memory_bounded_on_a_long_stream():
    """20k tokens: between passes a layer holds <= C keys, inside a pass it attends to <= C + Q."""
    model = tiny_llama(num_hidden_layers=1)
    settings, chunk = StreamingSettings(4, 60), 32
    held, attended = [], []

    def hook(module, args, kwargs):
        cache = kwargs["cache"] if "cache" in kwargs else kwargs["past_key_values"]
        held.append(max(layer.get_seq_length() for layer in cache.layers))
        attended.append(state_in_pass().allowed.shape[1])

    handle = model.register_forward_pre_hook(hook, with_kwargs=True)
    ids = torch.randint(0, 128, (20_000,))
    try:
        with threads(1):
            scored = score_stream_chunked(model, ids, settings, find_rotary(model), chunk)
    finally:
        handle.remove()
    assert max(held) == settings.capacity
    assert max(attended) == settings.capacity + chunk
    assert scored.evicted == ids.numel() - 1 - settings.capacity


def one_layer_shifted_at(model, ids, start, recent, steps):
    """log p(x_{t+1}) at the given steps t from the one-layer definition in closed form: with one layer a key
    depends on its own token and slot only, so step t is a fresh pass over the sinks and the last W tokens
    (reference.shifted_one_layer_logprobs, checked equal below), and any step costs one short pass."""
    capacity, out = start + recent, []
    with torch.no_grad():
        for t in steps:
            visible = list(range(t + 1)) if t < capacity else [*range(start), *range(t - recent, t + 1)]
            query = min(t, capacity)
            slots = [j if j < start else query - (t - j) for j in visible]
            logits = model(ids[visible][None], position_ids=torch.tensor([slots])).logits[0, -1].float()
            out.append(torch.log_softmax(logits, -1)[ids[t + 1]])
    return torch.stack(out)


@pytest.mark.slow
def test_no_drift_past_position_100k():
    """Far past position 100k the chunked path still equals the definition (positions stay small).

    The reference is the one-layer definition at sampled steps (the start, three stretches inside, the last
    1,000 steps) rather than the token loop over all 100k steps (~4 minutes of CPU): on a one-layer model
    both are the same numbers (test_architectures.py proves the token loop against this definition)."""
    model = tiny_llama(num_hidden_layers=1, hidden_size=32, intermediate_size=64,
                       num_attention_heads=2, num_key_value_heads=1, vocab_size=64)
    torch.manual_seed(5)
    ids = torch.randint(0, 64, (100_500,))
    start, recent = 4, 60
    settings = StreamingSettings(start, recent, "shifted")
    with threads(1):
        chunked = score_stream_chunked(model, ids, settings, find_rotary(model), 256)
        # The closed form is the reference's own definition: equal on a stream that evicts.
        torch.testing.assert_close(one_layer_shifted_at(model, ids[:200], start, recent, range(199)),
                                   shifted_one_layer_logprobs(model, ids[:200], start, recent), rtol=0, atol=1e-6)
        n = ids.numel()
        tail = list(range(n - 1001, n - 1))
        steps = [*range(300), *range(25_000, 25_300), *range(50_000, 50_300), *range(75_000, 75_300), *tail]
        reference = one_layer_shifted_at(model, ids, start, recent, steps)
    assert chunked.evicted == n - 1 - settings.capacity and chunked.max_held == settings.capacity
    assert (chunked.logprobs[steps] - reference).abs().max() <= 1e-3
    tail_ref = reference[-len(tail):]
    assert (chunked.logprobs[tail] - tail_ref).abs().max() <= 1e-3
    assert perplexity(chunked.logprobs[tail]) == pytest.approx(perplexity(tail_ref), rel=1e-5)
