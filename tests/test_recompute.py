"""method=recompute (sliding window with re-computation) against naive loops, dense and lm-eval's hf."""

import pytest
import torch
from lm_eval.models.huggingface import HFLM

from helpers.reference import dense_logprobs
from helpers.models import tiny_llama
from helpers.requests import generations, pairs, rolling
from streaming_lm import StreamingHFLM
from streaming_lm.streams.recompute import RecomputeStream, prediction_groups
from streaming_lm.settings import StreamingSettings, resolve

pytestmark = pytest.mark.usefixtures("one_thread")

TEXT = (
    " The tower is 324 metres tall, about the same height as an 81-storey building,"
    " and the tallest structure in Paris. Its base is square, measuring 125 metres on each side."
) * 2


def naive_recompute(model, ids: torch.Tensor, start: int, recent: int, stride: int) -> torch.Tensor:
    """The definition written out: for every scored position, find its window and run it alone."""
    n, capacity = ids.numel(), start + recent
    first = min(capacity, n - 1)
    out = []
    for i in range(n - 1):
        if i < first:  # the first window: the stream's first tokens, all scored
            window, slot = ids[:first], i
        else:
            group_end = first - 1 + stride * ((i - first) // stride + 1)
            end = min(group_end, n - 2)
            window = torch.cat((ids[:start], ids[end - recent + 1 : end + 1]))
            slot = capacity - 1 - (end - i)
        with torch.no_grad():
            logits = model(window[None]).logits[0, slot].float()
        out.append(torch.log_softmax(logits, -1)[ids[i + 1]])
    return torch.stack(out)


def settings(start, recent, stride):
    return StreamingSettings(start, recent, method="recompute", stride=stride)


@pytest.fixture(scope="module")
def model():
    return tiny_llama(vocab_size=97)


def random_ids(n, seed=0):
    return torch.randint(0, 97, (n,), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("start,recent,stride,batch", [(0, 12, 1, 1), (4, 8, 1, 3), (4, 8, 3, 2), (2, 10, 10, 4), (0, 12, 12, 1)])
def test_equals_the_naive_loop(model, start, recent, stride, batch):
    ids = random_ids(47)
    got = RecomputeStream(model, settings(start, recent, stride), batch_size=batch).score(ids)
    expected = naive_recompute(model, ids, start, recent, stride)
    torch.testing.assert_close(got.logprobs, expected, rtol=1e-5, atol=1e-5)
    assert got.evicted == 47 - (start + recent) and got.max_held == start + recent
    assert not torch.isnan(got.logprobs).any()


@pytest.mark.parametrize("stride", [1, 2, 5, 8])
@pytest.mark.parametrize("n", [1, 2, 7, 12, 13])
def test_streams_within_the_window_are_dense(model, stride, n):
    ids = random_ids(n, seed=n)
    got = RecomputeStream(model, settings(4, 8, stride), batch_size=2).score(ids)
    assert got.logprobs.shape == (n - 1,)
    if n > 1:
        torch.testing.assert_close(got.logprobs, dense_logprobs(model, ids), rtol=1e-5, atol=1e-5)
    assert got.evicted == max(0, n - 12)


def test_windows_lose_context(model):
    """Past the window, recompute is neither dense nor the streaming cache."""
    ids = random_ids(40)
    got = RecomputeStream(model, settings(4, 8, 1)).score(ids).logprobs
    dense = dense_logprobs(model, ids)
    torch.testing.assert_close(got[:12], dense[:12], rtol=1e-5, atol=1e-5)
    assert (got[20:] - dense[20:]).abs().max() > 1e-3


def test_continuation_entries_equal_the_whole_stream(model):
    ids = random_ids(30)
    whole = RecomputeStream(model, settings(2, 6, 3)).score(ids)
    passes = []
    handle = model.register_forward_pre_hook(lambda module, args: passes.append(1))
    try:
        (tail,) = RecomputeStream(model, settings(2, 6, 3)).score_continuations(ids[:21].tolist(), [ids[21:].tolist()])
    finally:
        handle.remove()
    # Only the groups holding a position >= 20 (the context's last) are computed, one pass each.
    assert len(passes) == sum(1 for _, b in prediction_groups(30, settings(2, 6, 3)) if b > 20)
    assert tail.logprob == float(whole.logprobs[20:].double().sum())
    assert tail.is_greedy == bool(whole.greedy[20:].all())


def test_generation_stream_reads_the_window_ending_at_each_token(model):
    ids = random_ids(25)
    stream = RecomputeStream(model, settings(3, 5, 4))
    logits = torch.cat((stream.read(ids[:10]), stream.fork().read(ids[10:])))
    got = torch.log_softmax(logits, -1)[:-1].gather(-1, ids[1:, None])[:, 0]
    torch.testing.assert_close(got, naive_recompute(model, ids, 3, 5, 1), rtol=1e-5, atol=1e-5)
    assert stream.n == 10 and stream.evicted == 2
    last = stream.step(int(ids[10]))
    torch.testing.assert_close(last, logits[10], rtol=1e-5, atol=1e-5)


# lm-eval: stride = recent_size with start_size = 0 is hf's disjoint-window evaluation at max_length = C.


@pytest.mark.parametrize("capacity,batch", [(32, 1), (50, 3)])
def test_disjoint_windows_equal_hf_with_max_length(tiny_dir, capacity, batch):
    hf = HFLM(pretrained=str(tiny_dir), device="cpu", dtype="float32", max_length=capacity, batch_size=batch)
    lm = StreamingHFLM(
        pretrained=hf.model, tokenizer=hf.tokenizer, device="cpu", start_size=0, recent_size=capacity,
        method="recompute", stride=capacity, batch_size=batch,
    )
    assert len(hf.tok_encode(TEXT)) > 3 * capacity
    (expected,) = hf.loglikelihood_rolling(rolling(TEXT))
    (got,) = lm.loglikelihood_rolling(rolling(TEXT))
    assert got == pytest.approx(expected, rel=1e-5)
    # A stride of 1 sees more context, so it must give another number.
    lm1 = StreamingHFLM(pretrained=hf.model, tokenizer=hf.tokenizer, device="cpu", start_size=0,
                        recent_size=capacity, method="recompute")
    (strided,) = lm1.loglikelihood_rolling(rolling(TEXT))
    assert abs(strided - expected) > 1e-3  # a random model barely uses context, but it does
    assert lm1.get_model_info()["streaming"]["stride"] == 1


def test_short_stream_equals_hf_for_every_stride(tiny_dir):
    hf = HFLM(pretrained=str(tiny_dir), device="cpu", dtype="float32")
    text = TEXT[:60]
    (expected,) = hf.loglikelihood_rolling(rolling(text))
    for stride in (1, 7, 60):
        lm = StreamingHFLM(pretrained=hf.model, tokenizer=hf.tokenizer, device="cpu", start_size=4,
                           recent_size=60, method="recompute", stride=stride)
        (got,) = lm.loglikelihood_rolling(rolling(text))
        assert got == pytest.approx(expected, rel=1e-5), stride


def test_loglikelihood_and_generation_follow_the_definition(tiny_dir):
    hf = HFLM(pretrained=str(tiny_dir), device="cpu", dtype="float32")
    lm = StreamingHFLM(pretrained=hf.model, tokenizer=hf.tokenizer, device="cpu", start_size=2,
                       recent_size=20, method="recompute", stride=4)
    context, continuation = TEXT[:90], TEXT[90:110]
    [(logprob, _)] = lm.loglikelihood(pairs((context, continuation)))
    ids = torch.tensor(hf.tok_encode(context + continuation))  # byte tokenizer: no merges across the cut
    n_context = len(hf.tok_encode(context))
    expected = naive_recompute(hf.model, ids, 2, 20, 4)[n_context - 1 :].double().sum()
    assert logprob == pytest.approx(float(expected), rel=1e-5)
    [text] = lm.generate_until(generations((TEXT[:40], {"max_gen_toks": 30, "until": []})))
    assert lm.get_model_info()["streaming"]["evicted_tokens"] > 0
    # Greedy decoding, each token predicted from a fresh pass over the sinks and the last W tokens read.
    ids = hf.tok_encode(TEXT[:40])
    for _ in range(30):
        window = ids if len(ids) <= 22 else ids[:2] + ids[-20:]
        with torch.no_grad():
            ids = ids + [int(hf.model(torch.tensor([window])).logits[0, -1].argmax())]
        if ids[-1] == lm.eot_token_id:
            break
    assert text and text == lm.tok_decode(ids[len(hf.tok_encode(TEXT[:40])):])


def test_stride_is_checked_against_a_ratio_budget():
    assert resolve(method="recompute", compression_ratio=0.5, stride=40).stride == 40  # max_length unknown yet
    with pytest.raises(ValueError, match=r"stride must be an integer in \[1, recent_size=46\], got 60"):
        resolve(method="recompute", compression_ratio=0.5, start_size=4, stride=60, max_length=100)
    # streaming_hf's model args: test_bad_inputs.py, case stride-above-recent_size
