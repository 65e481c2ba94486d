"""PG19 test books as ONE document for streaming perplexity (the StreamingLLM paper's setting).

Used by the task YAMLs in this folder. Options come from lm-eval's ``--metadata`` JSON, which
lm-eval passes (merged with ``--model_args``) as keyword arguments to ``custom_dataset``:

- ``text_files``: local UTF-8 books instead of the Hub: a list of files, one file, or a folder
  (its ``*.txt`` files in name order).
- ``max_words``: keep only the first N whitespace-separated words of the stream.
"""

import importlib.util
from pathlib import Path

import datasets

# Same word/byte counting and metrics as lm-eval's built-in `wikitext` task (it reads doc["page"]).
from lm_eval.tasks.wikitext.preprocess_wikitext import process_results  # noqa: F401  (used by the YAMLs)


def _wikitext_utils():
    # Task folders are not packages (lm-eval loads each utils.py by path), so load the sibling the same way.
    path = Path(__file__).parent.parent / "wikitext_streaming" / "utils.py"
    spec = importlib.util.spec_from_file_location("wikitext_streaming_utils", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_wikitext = _wikitext_utils()
cap_words, read_text_file = _wikitext.cap_words, _wikitext.read_text_file

HUB_PATH, HUB_SPLIT = "emozilla/pg19-test", "test"
JOINER = "\n\n"  # between books: 2 bytes, 0 words
CONCAT_MAX_WORDS = 300_000  # ~400k tokens of a Llama-2-like tokenizer (~1.3 tokens per word), as Table 2


def local_books(text_files):
    """``(title, text)`` of each of ``text_files``: a list of paths, one path, or a folder of ``*.txt`` files."""
    if isinstance(text_files, (str, Path)):
        folder = Path(text_files).expanduser()
        paths = sorted(folder.glob("*.txt")) if folder.is_dir() else [folder]
        if not paths:
            raise FileNotFoundError(f"text_files: no *.txt files in the folder {text_files} (--metadata)")
    elif isinstance(text_files, (list, tuple)) and text_files:
        paths = [Path(p).expanduser() for p in text_files]
    else:
        raise ValueError(
            f"text_files must be a file, a folder or a non-empty list of files (--metadata), got {text_files!r}"
        )
    for path in paths:
        if not path.is_file():
            raise FileNotFoundError(f"text_files must be readable text files (--metadata); no such file: {path}")
    return ((path.name, read_text_file(path)) for path in paths)  # read lazily: a cap may stop early


def hub_books():
    """``(title, text)`` of each book of the Hub test split, in its order (downloaded once, then cached)."""
    for row in datasets.load_dataset(HUB_PATH, split=HUB_SPLIT):
        yield row.get("short_book_title") or "", row["text"]


def build_stream(books, max_words, source):
    """One-document test split: the books joined in ``page`` (scored and counted)."""
    if max_words is not None:
        if not str(max_words).lstrip("-").isdigit():
            raise ValueError(f"max_words must be an integer >= 1 or null (--metadata), got {max_words!r}")
        books = _take_words(books, int(max_words))
    books = list(books)
    doc = {
        "page": JOINER.join(text for _, text in books),
        "books": len(books),
        "titles": [title for title, _ in books],
        "source": source,
    }
    return {"test": datasets.Dataset.from_list([doc])}


def _take_words(books, max_words):
    """The first ``max_words`` words of ``books``, reading no book past them."""
    kept, titles, seen = [], [], 0
    for title, text in books:
        kept.append(text)
        titles.append(title)
        seen += len(text.split())
        if seen >= max_words:
            break
    return list(zip(titles, cap_words(kept, max_words)))


def _books(text_files):
    if text_files is not None:
        return local_books(text_files), "text_files"
    return hub_books(), f"{HUB_PATH}:{HUB_SPLIT}"


def load_book(text_files=None, max_words=None, **_metadata):
    """custom_dataset of `pg19_streaming_book`: the first book only."""
    books, source = _books(text_files)
    return build_stream([next(iter(books))], max_words, source)


def load_concat(text_files=None, max_words=CONCAT_MAX_WORDS, **_metadata):
    """custom_dataset of `pg19_streaming_concat`: the books in order, capped at ``max_words``."""
    books, source = _books(text_files)
    return build_stream(books, max_words, source)


def doc_to_target(doc):
    return doc["page"]
