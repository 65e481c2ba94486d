"""Shared prefixes read once (streams/shared.py): the trie, its walk's memory bound, and exactness.

Every result must equal the unshared computation: each distinct context read from an empty stream
(``continuation.score_continuations``, ``generation.generate``). How exactly:

- ``token`` and ``recompute``: bit for bit. Sharing runs the very same forward passes on the very same
  state (a fork is an exact copy; recompute shares nothing and computes its windows from the whole stream).
- ``chunked``: the unshared read of a context cuts it into chunks from its first token; sharing starts a
  new chunk at every branch point, so the chunks differ and so does float rounding (different matmul
  shapes). Compared at 1e-5 relative, the bound docs/semantics.md gives for chunked vs token, with an
  absolute floor of 1e-5 per scored token (seen: about 3e-8). A separate test puts every branch point on
  the chunk grid: then the chunks are the same and the numbers are bit-exact, so the tolerance hides
  nothing but rounding. (The chunked path also reads a context's continuations as the rows of one batch,
  with or without sharing; that test therefore gives the unshared run the same continuations together.)
"""

import dataclasses
import sys

import pytest

from helpers.models import streaming
from streaming_lm.continuation import score_continuations, score_requests
from streaming_lm.generation import GenerationRequest, generate, generate_requests
from streaming_lm.settings import StreamingSettings, resolve
from streaming_lm.streams.shared import Trie, walk
from streaming_lm.rotary import find_rotary

pytestmark = pytest.mark.usefixtures("one_thread")


# --- the trie and its walk, on a stream that only records what it reads --------------------------------


class Recorder:
    """A stand-in stream: the tokens read, and how many copies are alive."""

    alive = 0
    most = 0

    def __init__(self, ids=()):
        self.ids = list(ids)
        Recorder.alive += 1
        Recorder.most = max(Recorder.most, Recorder.alive)

    def __del__(self):
        Recorder.alive -= 1

    @property
    def n(self):
        return len(self.ids)

    def extend(self, ids):
        self.ids += list(ids)

    def fork(self):
        return Recorder(self.ids)


def record_walk(contexts, share=True):
    Recorder.alive = Recorder.most = 0
    seen = {}

    def visit(stream, members, spare):
        branch = stream.fork()  # as the real visitors do before reading
        seen[tuple(members)] = tuple(branch.ids)

    trie = Trie(contexts, share=share)
    stats = walk(trie, Recorder, visit)
    return trie, stats, seen


def few_shot(n_docs, shots=(1, 2, 3, 4, 5, 6, 7, 8), question_len=5):
    return [[*shots, 100 + d, *range(200, 200 + question_len)] for d in range(n_docs)]


def test_every_context_is_visited_once_with_exactly_its_tokens():
    contexts = [[1, 2, 3, 4], [1, 2, 3, 5], [1, 2], [1, 2, 3, 4], [7], [1, 2, 3, 4, 9, 9], [1, 2, 6]]
    trie, stats, seen = record_walk(contexts)
    expected = {}
    for i, context in enumerate(contexts):
        expected.setdefault(tuple(context), []).append(i)
    assert seen == {tuple(members): context for context, members in expected.items()}
    assert stats.tokens_read == trie.tokens == len({(c[0],) for c in contexts}) + 1 + 1 + 1 + 1 + 2 + 1  # the edges
    assert stats.tokens_unshared == sum(len(c) for c in expected)
    assert (stats.requests, stats.contexts) == (7, 6)


@pytest.mark.parametrize("seed", range(5))
def test_random_contexts_read_each_distinct_prefix_once(seed):
    """Property: an ideal trie reads each distinct non-empty prefix of the contexts exactly once."""
    import random

    rng = random.Random(seed)
    contexts = [[rng.randrange(3) for _ in range(rng.randrange(1, 12))] for _ in range(60)]
    trie, stats, seen = record_walk(contexts)
    assert stats.tokens_read == len({tuple(c[:k]) for c in contexts for k in range(1, len(c) + 1)})
    assert sorted(seen.values()) == sorted({tuple(c) for c in contexts})
    assert sorted(i for members in seen for i in members) == list(range(len(contexts)))
    assert Recorder.most == stats.max_alive <= trie.branch_depth + 2


def test_without_sharing_only_identical_contexts_are_read_once():
    contexts = few_shot(5) + few_shot(2)
    trie, stats, seen = record_walk(contexts, share=False)
    assert stats.tokens_read == stats.tokens_unshared == 5 * 14 and stats.forks == 0
    assert len(seen) == 5 and trie.branch_depth == 0


def test_alive_states_are_bounded_by_the_trie_depth_not_the_number_of_requests():
    for n_docs in (3, 300):
        trie, stats, seen = record_walk(few_shot(n_docs))
        assert len(seen) == n_docs and trie.branch_depth == 1
        assert stats.tokens_read == 8 + n_docs * 6  # the shots once, then each question
        assert Recorder.most == stats.max_alive == trie.branch_depth + 2
    # Nested branching: 3 levels of 4 children; the bound follows the depth.
    contexts = [[a, b, c] for a in range(4) for b in range(4) for c in range(4)]
    trie, stats, _ = record_walk([[0, *ctx] for ctx in contexts])
    assert trie.branch_depth == 3 and Recorder.most == stats.max_alive <= trie.branch_depth + 2


def test_a_chain_of_nested_contexts_keeps_two_states_and_reads_the_longest_once():
    """StreamEval's shape: every query's context is the one before it plus more; no recursion limit."""
    contexts = [list(range(k * 3)) for k in range(1, sys.getrecursionlimit() + 50)]
    trie, stats, seen = record_walk(contexts)
    assert len(seen) == len(contexts) and stats.tokens_read == len(contexts[-1]) and stats.forks == 0
    assert trie.branch_depth == 0 and Recorder.most == stats.max_alive == 2


def test_empty_contexts_are_refused():
    with pytest.raises(ValueError, match="at least one token"):
        Trie([[1], []])


# --- exactness on the tiny model -------------------------------------------------------------------------

SMALL = dict(start_size=2, recent_size=14)  # C = 16: the shared prefixes below are longer, every stream evicts


def mc_requests(tokenizer):
    """Few-shot style loglikelihood requests: a long shared prefix, branch points inside and after it, a
    context that is a prefix of another, identical contexts, contexts sharing nothing."""
    enc = lambda text: tokenizer.encode(text, add_special_tokens=False)  # noqa: E731
    shots = enc("Q: 2+2?\nA: 4\n\nQ: capital of France?\nA: Paris\n\nQ: ")
    pairs = []
    for question, answers in [("3+3?\nA:", [" 6", " six apples", " 33"]), ("3+4?\nA:", [" 7", " 34 or so"]),
                              ("colour of the sky?\nA:", [" blue", " grey today, mostly"])]:
        pairs += [(shots + enc(question), enc(a)) for a in answers]
    pairs += [(shots, enc("what next")), (shots[:7], enc(" x")), (enc("Nothing shared here"), enc(" at all")),
              (shots + enc("3+3?\nA:"), enc(" 6"))]
    return pairs


# recompute has no position modes (its windows sit at 0..C-1); its variants are strides instead. Scored
# policies (policy:positions) keep per-head scores in their state: a fork must carry them too.
VARIANTS = [("token", "shifted"), ("token", "original"), ("chunked", "shifted"), ("chunked", "original"),
            ("recompute", 1), ("recompute", 3), ("token", "h2o:shifted"), ("chunked", "tova:original")]


def settings_for(method, variant, chunk_size=8):
    if method == "recompute":
        return StreamingSettings(**SMALL, method=method, stride=variant)
    if ":" in str(variant):
        policy, positions = variant.split(":")
        return resolve(start_size=2, recent_size=6, heavy_size=8, policy=policy, positions=positions, method=method,
                       chunk_size=chunk_size)
    return StreamingSettings(**SMALL, positions=variant, method=method, chunk_size=chunk_size)


def assert_same(got, expected, exact, n_tokens):
    assert (got.is_greedy, got.evicted) == (expected.is_greedy, expected.evicted)
    if exact:
        assert got.logprob == expected.logprob
    else:
        assert got.logprob == pytest.approx(expected.logprob, rel=1e-5, abs=1e-5 * n_tokens)


@pytest.mark.parametrize(("method", "positions"), VARIANTS)
def test_loglikelihood_equals_the_unshared_computation(tiny, method, positions):
    model, tokenizer = tiny
    shift, settings = find_rotary(model), settings_for(method, positions)
    pairs = mc_requests(tokenizer)
    got, stats = score_requests(model, pairs, settings, shift)
    assert stats.tokens_read < stats.tokens_unshared
    assert stats.max_alive <= Trie([c for c, _ in pairs]).branch_depth + 2
    for (context, continuation), scored in zip(pairs, got, strict=True):
        (expected,) = score_continuations(model, context, [continuation], settings, shift)
        assert_same(scored, expected, method != "chunked", len(continuation))
    assert sum(s.evicted for s in got) > 0


@pytest.mark.parametrize("positions", ["shifted", "original"])
def test_chunked_is_bit_exact_when_every_branch_point_is_on_the_chunk_grid(tiny, positions):
    model, tokenizer = tiny
    shift, settings = find_rotary(model), settings_for("chunked", positions, chunk_size=8)
    prefix = tokenizer.encode("Shared by all: 0123456789 abcdefghijklmnopq")[:24]  # 3 chunks
    pairs = [(prefix + tokenizer.encode(q)[:8], tokenizer.encode(a)) for q in ("first q?", "second q", "third q!")
             for a in (" yes", " no, not at all")]
    got, stats = score_requests(model, pairs, settings, shift)
    assert stats.tokens_read == 24 + 3 * 8
    # Unshared, each context with all its continuations (they are read as one batch either way).
    for k in range(0, len(pairs), 2):
        expected = score_continuations(model, pairs[k][0], [pairs[k][1], pairs[k + 1][1]], settings, shift)
        for scored, reference, (_, continuation) in zip(got[k : k + 2], expected, pairs[k : k + 2], strict=True):
            assert_same(scored, reference, exact=True, n_tokens=len(continuation))


@pytest.mark.parametrize(("method", "positions"), VARIANTS)
def test_generation_equals_the_unshared_computation(tiny, method, positions):
    model, tokenizer = tiny
    shift, settings = find_rotary(model), settings_for(method, positions)
    contexts = list(dict.fromkeys(tuple(c) for c, _ in mc_requests(tokenizer)))
    requests = [GenerationRequest(list(c), n) for c, n in zip(contexts, (6, 0, 12, 3, 9, 6, 1), strict=False)]
    requests.append(dataclasses.replace(requests[0], max_new_tokens=4))  # an identical context
    got, stats = generate_requests(model, requests, settings, shift)
    assert stats.tokens_read < stats.tokens_unshared
    for request, out in zip(requests, got, strict=True):
        expected = generate(model, request.context, settings, shift, request.max_new_tokens)
        assert (out.tokens, out.evicted) == (expected.tokens, expected.evicted)
        assert len(out.tokens) == request.max_new_tokens
    assert any(out.evicted for out in got)


# --- through lm-eval's adapter ---------------------------------------------------------------------------


def test_adapter_returns_lm_evals_order_and_the_unshared_numbers(tiny):
    from lm_eval.api.instance import Instance

    shots = "Q: 2+2?\nA: 4\n\nQ: capital of France?\nA: Paris\n\n"
    pairs = [(shots + f"Q: {q}\nA:", a) for q in ("3+3?", "sky?", "3+4?") for a in (" 6", " blue", " seven")]
    requests = [Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)]
    gens = [Instance("generate_until", {}, (shots + f"Q: {q}\nA:", {"until": ["\n"], "max_gen_toks": 5}), i)
            for i, q in enumerate(("3+3?", "sky?", "3+4?"))]
    lm = streaming(tiny, **SMALL, method="token")
    got, generated = lm.loglikelihood(requests), lm.generate_until(gens)
    shared = lm.prefix_stats
    lm.share_prefixes = False
    assert lm.loglikelihood(requests) == got and lm.generate_until(gens) == generated
    assert shared.tokens_read < lm.prefix_stats.tokens_read == shared.tokens_unshared
    assert len(set(got)) == len(got)  # distinct numbers: the order is checked, not a constant


@pytest.mark.parametrize("positions", ["shifted", "original"])
def test_chunked_reads_a_contexts_continuations_as_one_batch_with_the_one_row_numbers(tiny, positions):
    """More continuations than CONTINUATION_ROWS, of mixed lengths (one token: no pass at all), evicting."""
    from helpers.engine import score_stream
    from streaming_lm.streams.base import CONTINUATION_ROWS

    model, tokenizer = tiny
    shift, settings = find_rotary(model), settings_for("chunked", positions, chunk_size=8)
    context = tokenizer.encode("A context longer than the cache: 0123456789")
    continuations = [tokenizer.encode(" " + "abcdefghijklmnopqrstuvwxyz"[: k % 13]) for k in range(CONTINUATION_ROWS + 3)]
    got = score_continuations(model, context, continuations, settings, shift)
    for continuation, scored in zip(continuations, got, strict=True):
        (alone,) = score_continuations(model, context, [continuation], settings, shift)
        assert_same(scored, alone, exact=False, n_tokens=len(continuation))
        reference = score_stream(model, context + continuation, settings, shift)  # the token loop
        assert scored.logprob == pytest.approx(float(reference.logprobs[-len(continuation):].double().sum()), abs=5e-4)
        assert scored.evicted == reference.evicted


@pytest.mark.parametrize("policy", ["knorm", "snapkv"])
def test_once_after_the_context_reads_continuations_as_one_batch_with_the_one_row_numbers(tiny, policy):
    """evict_every=context: after the event, more continuations than CONTINUATION_ROWS, of mixed lengths, read as the
    rows of batches from the compressed state, give each one's numbers read alone (to float rounding), the event's
    evictions and what each layer kept."""
    from streaming_lm.streams.base import CONTINUATION_ROWS

    model, tokenizer = tiny
    settings = resolve(policy=policy, evict_every="context", query_size=3, compression_ratio=0.5, start_size=0,
                       chunk_size=8, policy_params={"window_size": 4} if policy == "snapkv" else None)
    shift = find_rotary(model)
    context = tokenizer.encode("A context that the event compresses to half: 0123456789")
    continuations = [tokenizer.encode(" " + "abcdefghijklmnopqrstuvwxyz"[: k % 13]) for k in range(CONTINUATION_ROWS + 3)]
    got, _ = score_requests(model, [(context, c) for c in continuations], settings, shift)
    for continuation, scored in zip(continuations, got, strict=True):
        (alone,), _ = score_requests(model, [(context, continuation)], settings, shift)
        assert_same(scored, alone, exact=False, n_tokens=len(continuation))
        assert scored.evicted > 0 and scored.kept_per_layer == alone.kept_per_layer


def test_once_after_the_context_reads_the_question_in_the_continuations_batch(tiny):
    """evict_every=context: the question (the context's last query_size tokens, after the event) is read in every row
    of the continuations' batch, not in a pass of its own; each continuation's numbers are those of one stream reading
    prefill, event, question and continuation in turn."""
    import torch

    from streaming_lm.streams import open_stream
    from streaming_lm.streams.base import CONTINUATION_ROWS

    model, tokenizer = tiny
    settings = resolve(policy="knorm", evict_every="context", query_size=3, compression_ratio=0.5, start_size=0,
                       chunk_size=64)  # each batch of rows in one pass
    shift = find_rotary(model)
    context = tokenizer.encode("A context that the event compresses to half: 0123456789")
    continuations = [tokenizer.encode(" " + "abcdefghijklmnopqrstuvwxyz"[: k % 13]) for k in range(CONTINUATION_ROWS + 3)]
    assert min(map(len, continuations)) == 1  # a one-token continuation too: predicted by the question's last token
    passes = []
    handle = model.register_forward_pre_hook(lambda module, args: passes.append(1))
    try:
        got, _ = score_requests(model, [(context, c) for c in continuations], settings, shift)
    finally:
        handle.remove()
    assert len(passes) == 1 + 2  # the prefill, then two batches of rows (no pass for the question alone)
    prefill, question = context[:-3], context[-3:]
    for continuation, scored in zip(continuations, got, strict=True):
        stream = open_stream(model, settings, shift)
        stream.extend(prefill)
        stream.compress()
        logits = stream.read(question + continuation[:-1])[len(question) - 1 :]
        expected = torch.log_softmax(logits, -1).gather(-1, torch.tensor(continuation)[:, None]).sum()
        assert scored.logprob == pytest.approx(float(expected), abs=1e-4)
        assert scored.evicted == stream.evicted > 0


@pytest.mark.parametrize("policy, params", [("knorm", {}), ("h2o", {}), ("snapkv", {"window_size": 3}),
                                            ("snapkv", {"window_size": 3, "head_budgets": "adaptive"})],
                         ids=["knorm", "h2o", "snapkv", "adakv"])
def test_scored_chunked_reads_continuations_as_one_batch_between_events(tiny, policy, params):
    """A scored method every K tokens: continuations that no event falls in are read as the rows of one batch (one
    pass), with the token loop's numbers and evictions; one that an event falls in, alone from a fork."""
    from helpers.engine import score_stream

    model, tokenizer = tiny
    shift = find_rotary(model)
    settings = resolve(policy=policy, evict_every=16, start_size=1, recent_size=3, heavy_size=8, method="chunked",
                       chunk_size=64, policy_params=params or None)
    context = tokenizer.encode("A context longer than the cache, evicted: 01234567")[:33]  # an event after 32 tokens
    for continuations, passes_expected in (
            ([tokenizer.encode(" " + "abcdefghijklmnop"[: k]) for k in (0, 3, 9, 14)], 1),  # 33 + 14 - 1 < 48
            # 33 + 16 reaches 48: the longest alone, the others as one batch
            ([tokenizer.encode(" " + "abcdefghijklmnop"[: k]) for k in (3, 16, 5, 0, 9)], 1 + 1)):
        passes = []
        handle = model.register_forward_pre_hook(lambda module, args: passes.append(1))
        try:
            got = score_continuations(model, context, continuations, settings, shift)
        finally:
            handle.remove()
        assert len(passes) == 1 + passes_expected  # the context (one pass), then the continuations
        for continuation, scored in zip(continuations, got, strict=True):
            reference = score_stream(model, context + continuation, settings, shift)  # the token loop
            assert scored.logprob == pytest.approx(float(reference.logprobs[-len(continuation):].double().sum()),
                                                   abs=5e-4)
            assert scored.evicted == reference.evicted > 0


def test_scored_rows_of_a_batch_refuse_to_cross_an_event(tiny):
    """The batched read of a scored method's rows observes and evicts nothing: across an event it raises instead."""
    from streaming_lm.streams import open_stream
    from streaming_lm.streams.base import score_batched

    model, _ = tiny
    settings = resolve(policy="knorm", evict_every=16, start_size=1, recent_size=3, heavy_size=8, method="chunked",
                       chunk_size=64)
    stream = open_stream(model, settings, find_rotary(model))
    stream.extend(list(range(30)))  # the next event after token 31: inside the rows
    with pytest.raises(RuntimeError, match="across an event"):
        score_batched(stream, [], [list(range(5)), list(range(40, 45))], lambda n: stream.evicted)
