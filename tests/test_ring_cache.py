"""The decode path (DecodeStream on an EvictingStaticCache) against the reference token loop, step by step.

Its memory (held and allocated bytes) is checked with every path in tests/test_paths.py."""

import pytest
import torch

from helpers.models import tiny_llama
from helpers.engine import score_stream
from streaming_lm.storage import static
from streaming_lm.rotary import find_rotary
from streaming_lm.settings import StreamingSettings
from streaming_lm.streams import open_stream

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model():
    return tiny_llama(vocab_size=97)


def stepped_logprobs(model, ids, settings, context: int) -> tuple[torch.Tensor, object]:
    """Read ``context`` tokens with the chunked path, then step through the rest one token at a time."""
    stream = open_stream(model, settings, find_rotary(model))
    logits = [stream.read(ids[:context])]
    logits += [stream.step(int(token))[None] for token in ids[context:-1]]
    logits = torch.cat(logits)
    return torch.log_softmax(logits, -1).gather(-1, ids[1:, None])[:, 0], stream


@pytest.mark.parametrize("positions", ["shifted", "original"])
@pytest.mark.parametrize("start,recent,context", [(4, 12, 1), (4, 12, 3), (4, 12, 9), (4, 12, 40), (0, 10, 25), (2, 7, 16)])
def test_steps_equal_the_token_loop(model, monkeypatch, positions, start, recent, context):
    monkeypatch.setattr(static, "REBASE_EVERY", 5)  # many frame resets in a short stream
    ids = torch.randint(0, 97, (90,), generator=torch.Generator().manual_seed(context))
    settings = StreamingSettings(start, recent, positions=positions, chunk_size=6)
    got, stream = stepped_logprobs(model, ids, settings, context)
    reference = score_stream(model, ids, StreamingSettings(start, recent, positions=positions, method="token"),
                             find_rotary(model))
    torch.testing.assert_close(got, reference.logprobs, rtol=1e-5, atol=2e-5)
    assert stream.evicted == reference.evicted == ids.numel() - 1 - (start + recent)
    assert stream.max_held == start + recent
