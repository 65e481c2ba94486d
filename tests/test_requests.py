"""loglikelihood and generate_until through the streaming cache, on the tiny local checkpoint.

- with a cache larger than every request, ``streaming_hf`` equals ``hf`` (multiple-choice and
  generation tasks run by lm-eval itself);
- with a small cache it evicts, and every number is the token loop's on the stream
  ``context + continuation`` (``score_stream``) or, for generation, greedy decoding under the
  definition (a dense masked pass for original positions);
- memory stays at C tokens however long the generation.
"""


import dataclasses

import pytest
import torch
from lm_eval import simple_evaluate
from lm_eval.models.huggingface import HFLM
from lm_eval.tasks import TaskManager

from helpers.local_tasks import MC_YAML, write_task
from helpers.models import streaming
from helpers.requests import generations, pairs
from helpers.engine import score_stream
from helpers.reference import sink_window_mask
from streaming_lm.continuation import score_continuations
from streaming_lm.generation import generate, sampler
from streaming_lm.rotary import find_rotary
from streaming_lm.settings import StreamingSettings


GEN_YAML = """\
task: tiny_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "{{{{prompt}}}}"
doc_to_target: "{{{{target}}}}"
generation_kwargs:
  until: ["\\n\\n", "Q:"]
  max_gen_toks: 40
  do_sample: false
metric_list:
  - metric: exact_match
metadata:
  version: 1.0
"""

LONG = "The tower is 324 metres tall, about the same height as an 81-storey building. "
MC_DOCS = [
    {"question": "Question: What is the capital of France?\nAnswer:", "choices": ["Paris", "Lyon", "a town"],
     "answer": 0},
    {"question": LONG + "How tall is it?", "choices": [" 324 metres", " 81 storeys", " very"], "answer": 0},
    {"question": LONG * 2 + "Is it tall?", "choices": [" yes", " no"], "answer": 1},
]
GEN_DOCS = [
    {"prompt": "Q: Name a colour.\nA:", "target": " red"},
    {"prompt": LONG + "\nQ: How tall is the tower?\nA:", "target": " 324 metres"},
]
SMALL = dict(start_size=2, recent_size=14)  # C = 16: every request above evicts


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def task_manager(tmp_path_factory):
    root = tmp_path_factory.mktemp("request_tasks")
    write_task(root, "tiny_mc", MC_YAML, MC_DOCS)
    write_task(root, "tiny_gen", GEN_YAML, GEN_DOCS)
    return TaskManager(include_path=str(root), include_defaults=False)  # indexing lm-eval's own tasks takes seconds


def evaluate(lm, task, task_manager, with_arguments=False):
    out = simple_evaluate(model=lm, tasks=[task], task_manager=task_manager, bootstrap_iters=0, log_samples=True)
    samples = sorted(out["samples"][task], key=lambda s: s["doc_id"])
    if with_arguments:  # the requests lm-eval built, one list per document
        return out["results"][task], [s["resps"] for s in samples], [s["arguments"] for s in samples]
    return out["results"][task], [s["resps"] for s in samples]


def assert_loglikelihoods_close(got, expected, abs_tol=2e-4):
    assert len(got) == len(expected)
    for (ll, greedy), (ll_ref, greedy_ref) in zip(got, expected, strict=True):
        assert ll == pytest.approx(ll_ref, abs=abs_tol)
        assert greedy == greedy_ref


def flat(resps):
    return [tuple(r[0]) if isinstance(r[0], (list, tuple)) else r[0] for doc in resps for r in doc]


# --- multiple choice -------------------------------------------------------------------------


def test_multiple_choice_task_equals_hf_with_a_large_cache(tiny, hf, task_manager):
    lm = streaming(tiny, start_size=4, recent_size=1020, chunk_size=16)
    got, got_resps = evaluate(lm, "tiny_mc", task_manager)
    expected, expected_resps = evaluate(hf, "tiny_mc", task_manager)
    assert_loglikelihoods_close(flat(got_resps), flat(expected_resps))
    assert got["acc,none"] == expected["acc,none"]
    assert lm.get_model_info()["streaming"]["evicted_tokens"] == 0


def test_multiple_choice_task_with_a_small_cache_evicts(tiny, hf, task_manager):
    model, _ = tiny
    lm = streaming(tiny, **SMALL, chunk_size=8)
    got, got_resps, arguments = evaluate(lm, "tiny_mc", task_manager, with_arguments=True)
    _, dense_resps = evaluate(hf, "tiny_mc", task_manager)
    assert lm.get_model_info()["streaming"]["evicted_tokens"] > 0
    assert 0.0 <= got["acc,none"] <= 1.0
    lls = [ll for ll, _ in flat(got_resps)]
    assert all(torch.isfinite(torch.tensor(lls))) and all(ll < 0 for ll in lls)
    # The long questions no longer fit: their numbers must move away from the dense ones.
    diffs = [abs(a[0] - b[0]) for a, b in zip(flat(got_resps), flat(dense_resps))]
    assert max(diffs) > 0.05
    # ... to the token loop's on each stream context + continuation, as lm-eval built the requests.
    settings = StreamingSettings(SMALL["start_size"], SMALL["recent_size"])
    requests = [args for doc in arguments for args in doc]
    assert len(requests) == len(lls)
    for (context, continuation), ll in zip(requests, lls, strict=True):
        ctx, cont = encode_like_hflm(lm, context, continuation)
        reference = score_stream(model, ctx + cont, settings, find_rotary(model))
        assert ll == pytest.approx(float(reference.logprobs[-len(cont):].double().sum()), abs=5e-4)


def requests_for_reference():
    """(context, continuation) pairs: shared contexts, an empty context, long and one-token continuations."""
    text = LONG * 2
    return [
        (text[:90], " 324 metres tall"),
        (text[:90], " x"),
        (text[:90], text[90:150]),  # a continuation that itself evicts and spans several chunks
        ("", "Paris is big"),  # empty context: the prefix token is the context, as in HFLM
        ("Short context ", "then a space"),  # trailing space moves into the continuation, as in HFLM
        ("Hi", " there"),  # a stream shorter than the cache: dense numbers
    ]


def encode_like_hflm(lm, context, continuation):
    """TemplateLM.loglikelihood's tokenisation."""
    if context == "":
        cont = lm.tok_encode(continuation, add_special_tokens=False)
        return ([lm.prefix_token_id], cont) if lm.prefix_token_id != cont[0] else (cont[:1], cont[1:])
    return lm._encode_pair(context, continuation)


@pytest.mark.parametrize("method", ["chunked", "token"])
@pytest.mark.parametrize("positions", ["shifted", "original"])
def test_loglikelihood_equals_token_loop_on_the_concatenated_stream(tiny, positions, method):
    model, _ = tiny
    lm = streaming(tiny, **SMALL, positions=positions, method=method, chunk_size=8)
    items = requests_for_reference()
    got = lm.loglikelihood(pairs(*items))
    settings = StreamingSettings(SMALL["start_size"], SMALL["recent_size"], positions)
    evicted = 0
    for (context, continuation), (ll, _) in zip(items, got, strict=True):
        ctx, cont = encode_like_hflm(lm, context, continuation)
        reference = score_stream(model, ctx + cont, settings, find_rotary(model))
        evicted += reference.evicted
        assert ll == pytest.approx(float(reference.logprobs[-len(cont):].double().sum()), abs=5e-4)
    assert lm.get_model_info()["streaming"]["evicted_tokens"] == evicted > 0


def test_is_greedy_equals_hf_with_a_large_cache(tiny, hf):
    """Token-level requests (HFLM's own _loglikelihood_tokens input), some of them greedy continuations."""
    model, tokenizer = tiny
    lm = streaming(tiny, start_size=4, recent_size=1020, chunk_size=8)
    context = tokenizer.encode(LONG)
    greedy = generate(model, context, lm.streaming, find_rotary(model), 12).tokens
    requests = [(("", ""), context, greedy), (("", ""), context, greedy[:5]),
                (("", ""), context, greedy[:4] + [(greedy[4] + 1) % 200]), (("", ""), context[:3], context[3:9])]
    got = lm._loglikelihood_tokens(requests)
    assert_loglikelihoods_close(got, hf._loglikelihood_tokens(requests))
    assert [g for _, g in got] == [True, True, False, False]


@pytest.mark.parametrize("positions", ["shifted", "original"])
def test_streamed_greedy_generation_is_greedy_under_streamed_loglikelihood(tiny, positions):
    """Two paths that share nothing but the definition: token-loop decoding and chunked scoring."""
    model, tokenizer = tiny
    settings = StreamingSettings(**SMALL, positions=positions, chunk_size=8)
    context = tokenizer.encode(LONG)
    tokens = generate(model, context, settings, find_rotary(model), 40).tokens
    (scored,) = score_continuations(model, context, [tokens], settings, find_rotary(model))
    assert scored.is_greedy and scored.evicted > 0


# --- generation ------------------------------------------------------------------------------


def test_generation_task_equals_hf_with_a_large_cache(tiny, hf, task_manager):
    lm = streaming(tiny, start_size=4, recent_size=1020, chunk_size=16)
    got, got_resps = evaluate(lm, "tiny_gen", task_manager)
    expected, expected_resps = evaluate(hf, "tiny_gen", task_manager)
    assert got_resps == expected_resps
    assert all(doc[0][0] for doc in got_resps)  # non-empty generations: the comparison means something
    assert got["exact_match,none"] == expected["exact_match,none"]


def test_stop_sequences_and_max_gen_toks_as_hf(tiny, hf):
    lm = streaming(tiny, start_size=4, recent_size=1020)
    prompt = "Q: Name a colour.\nA:"
    (free,) = hf.generate_until(generations((prompt, {"until": [], "max_gen_toks": 30})))
    stop = free[10:12]
    requests = generations(
        (prompt, {"until": [stop], "max_gen_toks": 30}),
        (prompt, {"until": stop, "max_new_tokens": 7, "do_sample": False}),
        (prompt, {"max_gen_toks": 5, "temperature": 0.0}),
    )
    assert lm.generate_until(requests) == hf.generate_until(requests)
    assert lm.generate_until(requests)[0] == free.split(stop)[0]


def masked_greedy(model, context, n_new, start, recent):
    """Greedy decoding under positions="original": one dense pass per token with the sink+window mask."""
    ids = list(context)
    for _ in range(n_new):
        mask = sink_window_mask(len(ids), start, recent)
        with torch.no_grad():
            logits = model(torch.tensor(ids)[None], attention_mask=mask).logits[0, -1]
        ids.append(int(logits.argmax()))
    return ids[len(context):]


@pytest.mark.parametrize("method", ["chunked", "token"])
def test_long_generation_evicts_stays_bounded_and_follows_the_definition(tiny, method):
    model, tokenizer = tiny
    settings = StreamingSettings(**SMALL, positions="original", method=method, chunk_size=8)
    context = tokenizer.encode(LONG)[:30]
    held = []
    hook = model.register_forward_pre_hook(
        lambda module, args, kwargs: held.append(max(layer.get_seq_length() for layer in
                                                     kwargs.get("cache", kwargs.get("past_key_values")).layers)),
        with_kwargs=True,
    )
    try:
        out = generate(model, context, settings, find_rotary(model), 60)
    finally:
        hook.remove()
    assert len(out.tokens) == 60 > settings.capacity
    assert max(held) == out.max_held == settings.capacity  # between passes, never more than C
    assert out.evicted == len(context) + 59 - settings.capacity
    assert out.tokens == masked_greedy(model, context, 60, SMALL["start_size"], SMALL["recent_size"])


def test_generate_until_with_a_small_cache(tiny):
    model, _ = tiny
    lm = streaming(tiny, **SMALL)
    (text,) = lm.generate_until(generations((LONG, {"until": ["never"], "max_gen_toks": 50})))
    assert text and lm.get_model_info()["streaming"]["evicted_tokens"] > 0
    # The text is greedy decoding on the token loop (the adapter decodes from static slots), shifted positions.
    context = lm.tok_batch_encode([LONG])[0][0].tolist()
    token_loop = dataclasses.replace(lm.streaming, method="token")
    tokens = generate(model, context, token_loop, find_rotary(model), 50, eos_token_ids=[lm.eot_token_id]).tokens
    assert text == lm.tok_decode(tokens).split("never")[0]


def test_sampling_reaches_the_sampler(tiny):
    """The request's sampling kwargs arrive: top_k=1 is greedy; a seed repeats; another seed differs."""
    lm = streaming(tiny, **SMALL)
    greedy_text = lm.generate_until(generations(("Hello", {"max_gen_toks": 20})))
    assert lm.generate_until(generations(
        ("Hello", {"do_sample": True, "temperature": 1.5, "top_k": 1, "max_gen_toks": 20}))) == greedy_text
    hot = generations(*[("Hello", {"do_sample": True, "temperature": 1.5, "top_p": 0.95, "max_gen_toks": 20})] * 4)
    torch.manual_seed(0)
    first = lm.generate_until(hot)
    torch.manual_seed(0)
    assert lm.generate_until(hot) == first
    assert len(set(first)) > 1, "four samples at temperature 1.5 were all the same: not sampling"
    # Refused kwargs (num_beams, do_sample without temperature): test_bad_inputs.py, cases generate-*.


@pytest.mark.parametrize("kwargs, expected", [
    # probabilities of tokens 0..3 under softmax(logits / T), kept by top-k / top-p, renormalised
    ({"temperature": 1.0, "top_k": 0, "top_p": 1.0}, [0.5, 0.3, 0.2, 0.0]),
    ({"temperature": 0.5, "top_k": 0, "top_p": 1.0}, [25 / 38, 9 / 38, 4 / 38, 0.0]),
    ({"temperature": 1.0, "top_k": 2, "top_p": 1.0}, [0.625, 0.375, 0.0, 0.0]),
    ({"temperature": 1.0, "top_k": 0, "top_p": 0.6}, [0.625, 0.375, 0.0, 0.0]),
])
def test_sampler_distribution(kwargs, expected):
    logits = torch.log(torch.tensor([0.5, 0.3, 0.2, 0.0]))
    pick = sampler(**kwargs, generator=torch.Generator().manual_seed(0))
    counts = torch.bincount(torch.tensor([pick(logits) for _ in range(4000)]), minlength=4)
    assert torch.allclose(counts / 4000, torch.tensor(expected), atol=0.03)


def test_never_falls_back_to_dense(tiny, monkeypatch):
    lm = streaming(tiny, **SMALL)
    loglikelihood = pairs((LONG, " yes"))
    generation = generations((LONG, {"max_gen_toks": 30}))
    expected = lm.loglikelihood(loglikelihood), lm.generate_until(generation)

    def dense(*args, **kwargs):
        raise AssertionError("dense HFLM path used")

    monkeypatch.setattr(HFLM, "_model_call", dense)
    monkeypatch.setattr(HFLM, "_model_generate", dense)
    monkeypatch.setattr(lm.model, "generate", dense)
    assert (lm.loglikelihood(loglikelihood), lm.generate_until(generation)) == expected
