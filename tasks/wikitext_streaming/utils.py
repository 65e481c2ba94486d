"""WikiText-2 test articles joined into ONE document for streaming perplexity.

Used by the task YAMLs in this folder. Options come from lm-eval's ``--metadata`` JSON,
which lm-eval passes (merged with ``--model_args``) as keyword arguments to ``custom_dataset``:

- ``text_file``: read this local file instead of the Hub (``wikitext_streaming`` only).
- ``max_words``: keep only the first N whitespace-separated words of the stream.
"""

import re
from pathlib import Path

import datasets

# Same detokenizer and word/byte counting as lm-eval's built-in `wikitext` task.
from lm_eval.tasks.wikitext.preprocess_wikitext import (
    process_results,  # noqa: F401  (used by the YAMLs)
    wikitext_detokenizer,
)

HUB_PATH, HUB_NAME, HUB_SPLIT = "EleutherAI/wikitext_document_level", "wikitext-2-raw-v1", "test"
SAMPLE_FILE = Path(__file__).parent / "sample" / "wikitext-2-raw-test-excerpt.txt"
JOINER = "\n"  # between articles: 1 byte, 0 words; "\n".join(Hub pages) rebuilds wiki.test.raw
_ARTICLE_HEADING = re.compile(r" = [^=].* = ")  # a whole line, e.g. " = Robert Boulter = "


def split_articles(text):
    """Split text in the format of wiki.test.raw (blank lines optional) into articles.

    A new article starts at every line matching ``^ = [^=].* = $``; lines are kept as they are
    and joined with "\\n", like the Hub's ``wikitext_document_level`` pages.
    """
    articles, lines = [], []
    for line in text.replace("\r\n", "\n").split("\n"):
        if lines and _ARTICLE_HEADING.fullmatch(line):
            articles.append("\n".join(lines))
            lines = []
        lines.append(line)
    articles.append("\n".join(lines))
    return [a for a in articles if a.strip()]


def cap_words(articles, max_words):
    """Keep the first ``max_words`` whitespace-separated words, cutting right after the last one."""
    if max_words < 1:
        raise ValueError(f"max_words must be >= 1, got {max_words}")
    kept = []
    for article in articles:
        ends = [m.end() for m in re.finditer(r"\S+", article)]
        if len(ends) > max_words:
            article = article[: ends[max_words - 1]]
        kept.append(article)
        max_words -= len(ends)
        if max_words <= 0:
            break
    return kept


def build_stream(articles, max_words=None, source=""):
    """One-document test split: raw text in ``page`` (counted), detokenized ``target`` (scored)."""
    if max_words is not None:
        articles = cap_words(articles, int(max_words))
    doc = {
        "page": JOINER.join(articles),
        # Detokenize per article (as `wikitext` does) so no regex pairs quotes/brackets across articles.
        "target": JOINER.join(wikitext_detokenizer({"page": a}) for a in articles),
        "articles": len(articles),
        "source": source,
    }
    return {"test": datasets.Dataset.from_list([doc])}


def read_text_file(path):
    with open(Path(path).expanduser(), encoding="utf-8", newline="") as f:
        return f.read()


def load_wikitext_stream(text_file=None, max_words=None, **_metadata):
    """custom_dataset of `wikitext_streaming`: the Hub test split, or ``text_file`` if given."""
    if text_file:
        if not Path(text_file).expanduser().is_file():
            raise FileNotFoundError(f"text_file must be a readable text file (--metadata); no such file: {text_file}")
        return build_stream(split_articles(read_text_file(text_file)), max_words, str(text_file))
    pages = datasets.load_dataset(HUB_PATH, HUB_NAME, split=HUB_SPLIT)["page"]
    return build_stream(list(pages), max_words, f"{HUB_PATH}/{HUB_NAME}:{HUB_SPLIT}")


def load_sample_stream(max_words=None, **_metadata):
    """custom_dataset of `wikitext_streaming_sample`: the shipped excerpt (ignores text_file)."""
    return build_stream(split_articles(read_text_file(SAMPLE_FILE)), max_words, SAMPLE_FILE.name)


def doc_to_target(doc):
    return doc["target"]
