"""Tests of tasks/wikitext_streaming (offline; the Hub is replaced by a fake where needed).

Word/byte counts are recomputed here independently of the task's utils.py.
"""

import math
import re
from pathlib import Path

import datasets
import lm_eval
import pytest
from lm_eval.models.huggingface import HFLM
from lm_eval.tasks import TaskManager
from lm_eval.tasks.wikitext.preprocess_wikitext import wikitext_detokenizer

from helpers.engine import token_loop_loglikelihood
from helpers.reference import lm_eval_words, word_perplexity
from streaming_lm import StreamingHFLM

REPO = Path(__file__).resolve().parents[1]
TASKS = REPO / "tasks"
SAMPLE = TASKS / "wikitext_streaming" / "sample" / "wikitext-2-raw-test-excerpt.txt"
SHARED = REPO / ".." / "shared" / "data" / "wikitext-2-raw-test.txt"
SAMPLE_WORDS, SAMPLE_BYTES = 3305, 16771  # whitespace-separated words, UTF-8 bytes
CAP = 100  # words = 130 SmolLM2 tokens: a 4+60 cache evicts 66, token-by-token scoring stays short


# ---------------------------------------------------------------- independent helpers
def articles_of(text):
    """Articles of a wiki.test.raw-style text: split before lines ' = Title = '."""
    return re.split(r"\n(?= = [^=].* = (?:\n|$))", text)


def expected_target(text):
    return "\n".join(wikitext_detokenizer({"page": a}) for a in articles_of(text))


def first_words(text, n):
    """text cut right after its n-th whitespace-separated word."""
    return text[: [m.end() for m in re.finditer(r"\S+", text)][n - 1]]


def load_task(name, **metadata):
    tm = TaskManager(include_path=str(TASKS), include_defaults=False, metadata=metadata)
    return tm.load([name])["tasks"][name]


def only_doc(task):
    docs = list(task.test_docs())
    assert len(docs) == 1
    return docs[0]


# ---------------------------------------------------------------- task construction
def test_sample_task_one_request_and_metrics():
    text = SAMPLE.read_text(encoding="utf-8")
    assert (len(text.split()), len(text.encode())) == (SAMPLE_WORDS, SAMPLE_BYTES)
    task = load_task("wikitext_streaming_sample")
    doc = only_doc(task)
    assert doc["page"] == text and doc["articles"] == 2

    task.build_all_requests(rank=0, world_size=1)
    assert len(task.instances) == 1
    inst = task.instances[0]
    assert inst.request_type == "loglikelihood_rolling"
    assert inst.arguments == (expected_target(text),)

    ll = -12345.678
    words, nbytes = lm_eval_words(text), len(text.encode("utf-8"))
    assert words == SAMPLE_WORDS + 2  # leading space and trailing newline each count one
    expected = {
        "word_perplexity": math.exp(-ll / words),
        "byte_perplexity": math.exp(-ll / nbytes),
        "bits_per_byte": -ll / nbytes / math.log(2),
    }
    items = task.process_results(doc, [ll])
    assert set(items) == set(expected)
    for metric, value in expected.items():
        assert task.aggregation()[metric]([items[metric]]) == pytest.approx(value, rel=1e-12)


@pytest.mark.parametrize("cap", [CAP, 1091 + 10, 10**6])  # inside article 1, into article 2, no cut
def test_sample_cap_max_words(cap):
    text = SAMPLE.read_text(encoding="utf-8")
    doc = only_doc(load_task("wikitext_streaming_sample", max_words=cap))
    want = text if cap >= SAMPLE_WORDS else first_words(text, cap)
    assert doc["page"] == want
    assert len(doc["page"].split()) == min(cap, SAMPLE_WORDS)
    assert doc["articles"] == (1 if cap == CAP else 2)
    assert doc["target"] == expected_target(want)


# ---------------------------------------------------------------- local file
@pytest.mark.parametrize("newline", ["\n", "\r\n"])
def test_local_text_file(tmp_path, newline):
    lines = [" = First = ", " Alpha beta , \" gamma \" . ", " = = Section = = ", " Delta @-@ epsilon . ",
             " = Second = ", " Zeta 's eta ( theta ) . "]
    path = tmp_path / "tiny.txt"
    path.write_bytes((newline.join(lines) + newline).encode("utf-8"))
    text = "\n".join(lines) + "\n"

    task = load_task("wikitext_streaming", text_file=str(path))
    doc = only_doc(task)
    assert doc["page"] == text and doc["articles"] == 2
    assert doc["target"] == expected_target(text)
    assert doc["target"].startswith(" = First =\nAlpha beta, \"gamma\".\n== Section ==\nDelta-epsilon.")
    items = task.process_results(doc, [-10.0])
    assert items["word_perplexity"] == (-10.0, lm_eval_words(text))
    assert items["bits_per_byte"] == (-10.0, len(text.encode()))

    capped = only_doc(load_task("wikitext_streaming", text_file=str(path), max_words=5))
    assert capped["page"] == " = First = \n Alpha beta"
    # the sample task always reads its own excerpt
    sample_doc = only_doc(load_task("wikitext_streaming_sample", text_file=str(path)))
    assert sample_doc["page"] == SAMPLE.read_text(encoding="utf-8")


def test_shared_wikitext_file():
    if not SHARED.is_file():
        pytest.skip(f"{SHARED} not present")
    text = SHARED.read_text(encoding="utf-8")
    doc = only_doc(load_task("wikitext_streaming", text_file=str(SHARED)))
    assert doc["page"] == text and doc["articles"] == 62
    # its README says "1,285,622 bytes": that is characters; UTF-8 bytes are 1,287,656
    assert (len(text.split()), len(text), len(text.encode())) == (241_211, 1_285_622, 1_287_656)
    assert doc["target"] == expected_target(text)
    assert SAMPLE.read_bytes() == SHARED.read_bytes()[:SAMPLE_BYTES]  # the excerpt is its prefix

    capped = only_doc(load_task("wikitext_streaming", text_file=str(SHARED), max_words=2000))
    assert capped["page"] == first_words(text, 2000) and capped["articles"] == 2


# ---------------------------------------------------------------- Hub path, compared with `wikitext`
def test_hub_stream_matches_builtin_wikitext_counts(monkeypatch):
    """Fake Hub pages in wikitext_document_level form (blank ' ' lines between rows)."""
    pages = ["\n \n".join(a.split("\n")) + "\n " for a in articles_of(SAMPLE.read_text(encoding="utf-8"))]
    calls = []

    def fake_load_dataset(path, name=None, split=None, **kwargs):
        calls.append((path, name, split))
        dd = {s: datasets.Dataset.from_dict({"page": pages}) for s in ("train", "validation", "test")}
        return dd[split] if split else dd

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    builtin_yaml = Path(lm_eval.__file__).parent / "tasks" / "wikitext" / "wikitext.yaml"
    tm = TaskManager(include_path=str(TASKS), include_defaults=False)
    loaded = tm.load(["wikitext_streaming", str(builtin_yaml)])["tasks"]
    stream, wikitext = loaded["wikitext_streaming"], loaded["wikitext"]
    assert calls[0] == ("EleutherAI/wikitext_document_level", "wikitext-2-raw-v1", "test")
    assert calls[1][:2] == calls[0][:2]  # same Hub dataset as `wikitext`

    doc, per_article = only_doc(stream), list(wikitext.test_docs())
    k = len(per_article)
    assert k == 2 and doc["page"] == "\n".join(pages)
    assert doc["target"] == "\n".join(wikitext.doc_to_target(d) for d in per_article)
    s_items = stream.process_results(doc, [-1.0])
    a_items = [wikitext.process_results(d, [-1.0]) for d in per_article]
    # joiner "\n": +1 byte per join; words: the 2 empty ends each article counts become 2 for the stream
    assert s_items["byte_perplexity"][1] == sum(i["byte_perplexity"][1] for i in a_items) + (k - 1)
    assert s_items["word_perplexity"][1] == sum(i["word_perplexity"][1] for i in a_items) - 2 * (k - 1)
    # without its blank lines (the local-file form) the stream has the same words
    assert s_items["word_perplexity"][1] == SAMPLE_WORDS + 2


# ---------------------------------------------------------------- end to end (lm-eval on the real model)
def run_lm_eval(lm):
    """lm-eval on the capped sample, as ``lm_eval --include_path tasks --metadata '{"max_words": CAP}'`` runs it
    (the metadata given to the task manager and to simple_evaluate), in-process on the session's SmolLM2; the
    command line itself is tests/test_cli.py's."""
    metadata = {"max_words": CAP}
    tm = TaskManager(include_path=str(TASKS), include_defaults=False, metadata=metadata)
    results = lm_eval.simple_evaluate(model=lm, tasks=["wikitext_streaming_sample"], task_manager=tm,
                                      metadata=metadata, batch_size=1, bootstrap_iters=0)
    assert results["configs"]["wikitext_streaming_sample"]["metadata"]["max_words"] == CAP
    return results["results"]["wikitext_streaming_sample"]


def check_consistent(res):
    """The three metrics come from one log-likelihood and the capped stream's counts."""
    page = first_words(SAMPLE.read_text(encoding="utf-8"), CAP)
    words, nbytes = lm_eval_words(page), len(page.encode())
    nll = math.log(res["word_perplexity,none"]) * words
    assert 1 < res["word_perplexity,none"] < 1e4
    assert math.log(res["byte_perplexity,none"]) * nbytes == pytest.approx(nll, rel=1e-9)
    assert res["bits_per_byte,none"] == pytest.approx(nll / nbytes / math.log(2), rel=1e-9)


@pytest.fixture(scope="module")
def dense_result(smollm2):
    model, tokenizer = smollm2
    return run_lm_eval(HFLM(pretrained=model, tokenizer=tokenizer, device="cpu", batch_size=1))


@pytest.mark.slow
def test_e2e_hf(dense_result):
    assert dense_result["sample_len"] == 1
    check_consistent(dense_result)


@pytest.mark.slow
def test_e2e_streaming_hf_is_the_token_loop(smollm2, dense_result):
    model, tokenizer = smollm2
    lm = StreamingHFLM(pretrained=model, tokenizer=tokenizer, device="cpu", start_size=4, recent_size=60)
    res = run_lm_eval(lm)
    check_consistent(res)
    assert res["word_perplexity,none"] != pytest.approx(dense_result["word_perplexity,none"], rel=1e-6)
    assert lm.get_model_info()["streaming"]["evicted_tokens"] > 0
    # The number itself: the engine's token loop on the scored target, over the words lm-eval counts.
    doc = only_doc(load_task("wikitext_streaming_sample", max_words=CAP))
    expected = word_perplexity([token_loop_loglikelihood(lm, doc["target"])], [lm_eval_words(doc["page"])])
    assert res["word_perplexity,none"] == pytest.approx(expected, rel=1e-5)
