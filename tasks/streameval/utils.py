"""StreamEval (StreamingLLM paper; never released): LongEval-style lines with a query every few lines.

Used by streameval.yaml. The stream is generated from ``--metadata`` (merged by lm-eval with
``--model_args`` and passed as keyword arguments to ``custom_dataset``); nothing is downloaded:

- ``num_lines`` (1000): record lines in the stream.
- ``query_interval`` (10): a query after every this many lines ...
- ``answer_distance`` (20): ... about the line this many lines back.
- ``seed`` (0): keys and numbers come from ``random.Random(seed)``.

One document per query; its ``context`` is the whole stream up to the query, earlier queries
followed by their correct answers. See README.md for the exact format.
"""

import itertools
import random

import datasets

DEFAULTS = {"num_lines": 1000, "query_interval": 10, "answer_distance": 20, "seed": 0}
PREAMBLE = (
    "Below is a record of lines I want you to remember. Each line begins with 'line <line index>' and "
    "contains a REGISTER_CONTENT at the end of the line as a numerical value. For each line index, "
    "memorize its corresponding REGISTER_CONTENT. Every now and then I will ask you for the "
    "REGISTER_CONTENT of an earlier line.\n\n"
)
LINE = "line {key}: REGISTER_CONTENT is <{value}>\n"
QUESTION = "Question: what is the REGISTER_CONTENT in line {key}?\nAnswer: The REGISTER_CONTENT in line {key} is <"
ANSWER_END = ">\n"  # the stop sequence, so the model's answer is just the number
MAX_VALUE = 50_000  # LongEval's range: 1..50000

# Keys are pairs of pronounceable made-up words (consonant-vowel-consonant-vowel): generated, not shipped.
_CONSONANTS, _VOWELS = "bdfgklmnprstvz", "aeiou"
WORDS = ["".join(w) for w in itertools.product(_CONSONANTS, _VOWELS, _CONSONANTS, _VOWELS)]

# Accuracy per stream length: record lines read before the query, (low, high] (README.md). The names
# must match the metric_list of streameval.yaml (tested).
BUCKETS = [(0, 100), (100, 200), (200, 400), (400, 800), (800, 1600), (1600, 3200), (3200, None)]


def bucket_metric(low, high):
    return f"exact_match_lines_{low + 1}_{high}" if high is not None else f"exact_match_lines_{low + 1}_up"


def _int_option(name, value, minimum):
    # JSON gives ints; the key=val form of --metadata may give strings. bool is an int but not a count.
    if isinstance(value, bool) or not str(value).strip().lstrip("-").isdigit() or int(value) < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum} (--metadata), got {value!r}")
    return int(value)


def options(num_lines=None, query_interval=None, answer_distance=None, seed=None, **_metadata):
    """The generator's settings, validated; ``None`` (or absent) means the default."""
    given = {"num_lines": num_lines, "query_interval": query_interval, "answer_distance": answer_distance,
             "seed": seed}
    opts = {k: DEFAULTS[k] if v is None else _int_option(k, v, 0 if k == "seed" else 1) for k, v in given.items()}
    if opts["answer_distance"] > opts["num_lines"]:
        raise ValueError(
            f"answer_distance must be <= num_lines (--metadata), got answer_distance={opts['answer_distance']} "
            f"with num_lines={opts['num_lines']}: no line is that far back"
        )
    return opts


def make_docs(num_lines, query_interval, answer_distance, seed):
    """One document per query, in stream order."""
    rng, lines, used = random.Random(seed), [], set()
    while len(lines) < num_lines:  # line by line, so a longer stream starts with the same lines
        key = f"{rng.choice(WORDS)}-{rng.choice(WORDS)}"
        if key not in used:
            used.add(key)
            lines.append((key, rng.randint(1, MAX_VALUE)))
    parts, docs = [PREAMBLE], []
    for read, (key, value) in enumerate(lines, start=1):
        parts.append(LINE.format(key=key, value=value))
        if read % query_interval or read < answer_distance:
            continue
        asked = read - answer_distance  # 0-based index of the line asked about
        q_key, q_value = lines[asked]
        question = QUESTION.format(key=q_key)
        context = "".join(parts) + question
        docs.append({
            "context": context, "answer": str(q_value), "key": q_key, "query": len(docs),
            "lines": read, "asked_line": asked + 1, "context_chars": len(context),
        })
        parts.append(question + str(q_value) + ANSWER_END)
    return docs


def load_streameval(**metadata):
    """custom_dataset of `streameval`."""
    return {"test": datasets.Dataset.from_list(make_docs(**options(**metadata)))}


def doc_to_text(doc):
    return doc["context"]


def doc_to_target(doc):
    return doc["answer"]


def process_results(doc, results):
    """Exact match of the number; per length bucket too (``None`` outside the doc's bucket)."""
    (response,) = results
    correct = float(response.strip() == doc["answer"])
    scores = {"exact_match": correct}
    for low, high in BUCKETS:
        inside = doc["lines"] > low and (high is None or doc["lines"] <= high)
        scores[bucket_metric(low, high)] = correct if inside else None
    return scores


def mean_present(values):
    """Mean over the documents of one bucket (the others report None); NaN for an empty bucket."""
    present = [v for v in values if v is not None]
    return sum(present) / len(present) if present else float("nan")
