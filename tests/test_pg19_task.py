"""Tests of tasks/pg19_streaming, offline: books are synthetic text files written here."""

import math
import random
import re
from pathlib import Path

import datasets
import lm_eval
import pytest
from lm_eval.tasks import TaskManager

from helpers.models import streaming

TASKS = Path(__file__).resolve().parents[1] / "tasks"


def synthetic_book(seed, words):
    """Made-up words in sentences and paragraphs (no real book: nothing to attribute)."""
    rng = random.Random(seed)
    out = []
    for i in range(words):
        word = "".join(rng.choice("abcdefghilmnoprstuv") for _ in range(rng.randint(1, 8)))
        out.append(word + (".\n\n" if i % 40 == 39 else ". " if i % 9 == 8 else " "))
    return "".join(out).capitalize()


@pytest.fixture
def books(tmp_path):
    folder = tmp_path / "books"
    folder.mkdir()
    texts = {"b_second.txt": synthetic_book(2, 120), "a_first.txt": synthetic_book(1, 100)}
    for name, text in texts.items():
        (folder / name).write_text(text, encoding="utf-8")
    return folder, texts["a_first.txt"], texts["b_second.txt"]


def load_task(name, **metadata):
    return TaskManager(include_path=str(TASKS), include_defaults=False, metadata=metadata).load([name])["tasks"][name]


def only_doc(task):
    (doc,) = task.test_docs()
    return doc


def first_words(text, n):
    return text[: [m.end() for m in re.finditer(r"\S+", text)][n - 1]]


def test_book_is_the_first_file_as_one_request(books):
    folder, first, _ = books
    task = load_task("pg19_streaming_book", text_files=str(folder))
    doc = only_doc(task)
    assert (doc["page"], doc["books"], doc["titles"]) == (first, 1, ["a_first.txt"])
    task.build_all_requests(rank=0, world_size=1)
    (inst,) = task.instances
    assert inst.request_type == "loglikelihood_rolling" and inst.arguments == (first,)
    words, nbytes = len(re.split(r"\s+", first)), len(first.encode())
    items = task.process_results(doc, [-100.0])
    assert items == {"word_perplexity": (-100.0, words), "byte_perplexity": (-100.0, nbytes),
                     "bits_per_byte": (-100.0, nbytes)}
    assert task.aggregation()["word_perplexity"]([items["word_perplexity"]]) == pytest.approx(math.exp(100 / words))
    assert only_doc(load_task("pg19_streaming_book", text_files=str(folder))) == doc  # deterministic


def test_concat_joins_books_in_order_and_caps_words(books):
    folder, first, second = books
    files = [str(folder / "b_second.txt"), str(folder / "a_first.txt")]  # a list keeps its order
    doc = only_doc(load_task("pg19_streaming_concat", text_files=files, max_words=None))
    assert doc["page"] == second + "\n\n" + first and doc["titles"] == ["b_second.txt", "a_first.txt"]
    capped = only_doc(load_task("pg19_streaming_concat", text_files=str(folder), max_words=150))
    assert capped["page"] == first + "\n\n" + first_words(second, 50) and capped["books"] == 2
    assert len(capped["page"].split()) == 150
    # the default cap keeps these small books whole; a cap inside the first book drops the second
    assert only_doc(load_task("pg19_streaming_concat", text_files=str(folder)))["books"] == 2
    assert only_doc(load_task("pg19_streaming_concat", text_files=str(folder), max_words=10))["books"] == 1
    # one file path is a one-book list
    assert only_doc(load_task("pg19_streaming_book", text_files=files[0]))["page"] == second


def test_hub_rows_when_no_text_files(monkeypatch):
    rows = [{"short_book_title": f"Book {i}", "text": synthetic_book(i, 30)} for i in range(3)]
    calls = []

    def fake_load_dataset(path, name=None, split=None, **kwargs):
        calls.append((path, split))
        return datasets.Dataset.from_list(rows)

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    book = only_doc(load_task("pg19_streaming_book"))
    assert calls == [("emozilla/pg19-test", "test")]
    assert (book["page"], book["titles"], book["source"]) == (rows[0]["text"], ["Book 0"], "emozilla/pg19-test:test")
    concat = only_doc(load_task("pg19_streaming_concat", max_words=70))
    assert concat["page"] == rows[0]["text"] + "\n\n" + rows[1]["text"] + "\n\n" + first_words(rows[2]["text"], 10)


@pytest.mark.parametrize("metadata, error, message", [
    ({"text_files": "/nonexistent/book.txt"}, FileNotFoundError, "text_files must be readable text files"),
    ({"text_files": ["/nonexistent/book.txt"]}, FileNotFoundError, "no such file: /nonexistent/book.txt"),
    ({"text_files": 7}, ValueError, "text_files must be a file, a folder or a non-empty list"),
    ({"text_files": []}, ValueError, "text_files must be a file, a folder or a non-empty list"),
    ({"max_words": 0}, ValueError, "max_words must be >= 1, got 0"),
    ({"max_words": "many"}, ValueError, "max_words must be an integer >= 1 or null"),
])
def test_bad_metadata_names_the_key(books, metadata, error, message):
    metadata = {"text_files": str(books[0])} | metadata
    with pytest.raises(error, match=re.escape(message)):
        load_task("pg19_streaming_concat", **metadata)


def test_empty_folder_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="text_files: no \\*.txt files in the folder"):
        load_task("pg19_streaming_book", text_files=str(tmp_path))


@pytest.mark.usefixtures("one_thread")
def test_e2e_streaming_hf(books, tiny):
    folder, first, _ = books
    tm = TaskManager(include_path=str(TASKS), include_defaults=False, metadata={"text_files": str(folder)})
    lm = streaming(tiny, start_size=4, recent_size=60)
    out = lm_eval.simple_evaluate(model=lm, tasks=["pg19_streaming_book"], task_manager=tm, bootstrap_iters=0)
    res = out["results"]["pg19_streaming_book"]
    nll = math.log(res["word_perplexity,none"]) * len(re.split(r"\s+", first))
    assert nll > 0 and lm._evicted > 0
    assert res["bits_per_byte,none"] == pytest.approx(nll / len(first.encode()) / math.log(2), rel=1e-9)
