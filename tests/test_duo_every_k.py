"""DuoAttention every K tokens (``policy=duo``, ``evict_every=K``; docs/methods.md, docs/semantics.md "Events").

At each event a streaming head keeps the first ``sink_size`` and the last ``recent_size`` tokens it holds, a
retrieval head keeps everything; between events nothing is evicted. The heads of a layer then hold different tokens
(the scored storage's padded layout). On the tiny Llama (2 layers, 2 key/value heads) with a pattern of its own
(``tests/data/duo_pattern_tiny``: sink 1, recent 3; gates [[0.9, 0.1], [0.2, 0.8]], so at
``head_compression_ratio=0.5`` layer 0's head 1 and layer 1's head 0 stream):

- the token loop equals the naive loop of tests/helpers/scored_reference.py with the pattern read by hand, each
  head's count after every step included;
- the chunked path (chunks across the events) and the decode steps equal the token loop;
- a pattern window as long as the stream, or no streaming head, is the dense model; one event covering the whole
  prefill is the once-after-the-context regime.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers.models import tiny_llama
from helpers.reference import dense_logprobs
from helpers.scored_reference import scored_logprobs
from helpers.stepping import stepped

from streaming_lm.rolling import score
from streaming_lm.rotary import find_rotary
from streaming_lm.settings import resolve
from streaming_lm.streams import open_stream

pytestmark = pytest.mark.usefixtures("one_thread")

N = 30
TOL = 2e-5
PATTERN = Path(__file__).parent / "data" / "duo_pattern_tiny"
STREAMING = [[False, True], [True, False]]  # the pattern's two lowest gates, read by hand
SINK, RECENT = 1, 3


@pytest.fixture(scope="module")
def model():
    return tiny_llama()


@pytest.fixture(scope="module")
def ids():
    return torch.randperm(128, generator=torch.Generator().manual_seed(5))[:N]


def settings(every, method="token", ratio=0.5, chunk_size=5):
    return resolve(policy="duo", policy_params={"pattern": str(PATTERN), "head_compression_ratio": ratio},
                   evict_every=every, positions="original", method=method, chunk_size=chunk_size)


@pytest.mark.parametrize("every", [1, 3, 4])
def test_token_loop_is_the_definition(model, ids, every):
    got, counts, evicted = stepped(model, ids, settings(every))
    trace = []
    expected = scored_logprobs(model, ids, "duo", 0, 0, 0, "original", evict_every=every, trace=trace,
                               params={"streaming": STREAMING, "sink_size": SINK, "recent_size": RECENT})
    torch.testing.assert_close(got, expected, rtol=0, atol=TOL)
    assert counts == trace  # every head of every layer holds what the definition says after every step
    last = (N - 1) // every * every  # tokens read at the last event
    for layer, heads in enumerate(counts[last - 1]):  # after it: a streaming head holds S + W, a retrieval head all
        assert heads == [SINK + RECENT if STREAMING[layer][h] else last for h in range(2)]
    assert max(max(c) for step in counts for c in step) == N - 1
    assert evicted == (last - SINK - RECENT) // 2  # per head on average, of the layer that evicted most
    assert (got - dense_logprobs(model, ids)).abs().max() > 1e-3  # it streamed


@pytest.mark.parametrize("chunk", [1, 4, 7])
@pytest.mark.parametrize("every", [1, 3])
def test_chunked_and_decoding_equal_the_token_loop(model, ids, every, chunk):
    token = score(model, ids, settings(every), find_rotary(model))
    chunked = score(model, ids, settings(every, "chunked", chunk_size=chunk), find_rotary(model))
    torch.testing.assert_close(chunked.logprobs, token.logprobs, rtol=0, atol=TOL)
    assert chunked.evicted == token.evicted
    stream = open_stream(model, settings(every, "chunked", chunk_size=chunk), find_rotary(model))
    logits = [stream.read(ids[:9])] + [stream.step(int(t))[None] for t in ids[9:-1]]
    decoded = torch.log_softmax(torch.cat(logits), -1).gather(-1, ids[1:, None])[:, 0]
    torch.testing.assert_close(decoded, token.logprobs, rtol=0, atol=TOL)


@pytest.mark.parametrize("method", ["token", "chunked"])
def test_nothing_evicted_is_dense(model, ids, method):
    """No streaming head (ratio 0), or a stream no longer than a streaming head's window: the dense model."""
    dense = dense_logprobs(model, ids)
    got = score(model, ids, settings(3, method, ratio=0.0), find_rotary(model))
    assert got.evicted == 0
    torch.testing.assert_close(got.logprobs, dense, rtol=0, atol=TOL)
    short = ids[: SINK + RECENT + 1]  # reads S + W tokens
    got = score(model, short, settings(1, method), find_rotary(model))
    assert got.evicted == 0
    torch.testing.assert_close(got.logprobs, dense_logprobs(model, short), rtol=0, atol=TOL)


def test_one_event_covering_the_prefill_is_the_once_regime(model, ids):
    """An event after the first m tokens and none after (K = m, a stream of fewer than 2m tokens) is the
    once-after-the-context regime with a prefill of m (two paths: the scored storage every K tokens, the context regime's)."""
    from streaming_lm.continuation import score_continuations

    m = 12
    context, continuation = ids[: m + 1].tolist(), ids[m + 1 : 2 * m].tolist()
    every = score(model, ids[: 2 * m], settings(m), find_rotary(model))
    once = resolve(policy="duo", policy_params={"pattern": str(PATTERN), "head_compression_ratio": 0.5},
                   evict_every="context", query_size=1)
    [got] = score_continuations(model, context, [continuation], once, find_rotary(model))
    assert got.logprob == pytest.approx(float(every.logprobs[m:].double().sum()), abs=1e-4)
