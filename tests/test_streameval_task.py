"""Tests of tasks/streameval: the generated stream, its queries and their scoring (offline)."""

import importlib.util
import math
import re
from pathlib import Path

import lm_eval
import pytest
import yaml
from lm_eval.tasks import TaskManager

from helpers.models import streaming

TASK_DIR = Path(__file__).resolve().parents[1] / "tasks" / "streameval"
LINE = re.compile(r"^line ([a-z]+-[a-z]+): REGISTER_CONTENT is <(\d+)>$", re.M)


def load_task(**metadata):
    return TaskManager(include_path=str(TASK_DIR.parent), include_defaults=False, metadata=metadata).load(
        ["streameval"])["tasks"]["streameval"]


def docs(**metadata):
    return list(load_task(**metadata).test_docs())


def utils():
    spec = importlib.util.spec_from_file_location("streameval_utils", TASK_DIR / "utils.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_queries_grow_and_carry_earlier_answers():
    got = docs(num_lines=65)
    assert [d["lines"] for d in got] == [20, 30, 40, 50, 60]  # every 10 lines, once 20 lines exist
    assert [d["asked_line"] for d in got] == [1, 11, 21, 31, 41]  # 20 lines back (1-based)
    for i, doc in enumerate(got):
        lines = LINE.findall(doc["context"])
        assert len(lines) == doc["lines"] and len(set(k for k, _ in lines)) == doc["lines"]
        assert lines[doc["asked_line"] - 1] == (doc["key"], doc["answer"])
        assert doc["context"].endswith(f"in line {doc['key']}?\nAnswer: The REGISTER_CONTENT in line {doc['key']} is <")
        assert doc["query"] == i and doc["context_chars"] == len(doc["context"])
        if i:
            previous = got[i - 1]
            # the stream so far: the previous query's context, its correct answer, then 10 new lines
            assert doc["context"].startswith(previous["context"] + previous["answer"] + ">\n")
            assert doc["context"].count("Answer: ") == i + 1
    assert docs(num_lines=65) == got  # deterministic
    assert docs(num_lines=65, seed=1)[0]["context"] != got[0]["context"]
    # a longer stream starts with the same queries
    assert docs(num_lines=80)[:5] == got


def test_readme_example_is_the_default_stream():
    readme = (TASK_DIR / "README.md").read_text(encoding="utf-8")
    example = readme.split("## Format", 1)[1].split("```", 2)[1].splitlines()
    first = docs(num_lines=20)[0]
    for line in example[1:]:
        if line and "..." not in line:
            assert line in first["context"] + first["answer"] + ">", line


def test_interval_and_distance_options():
    got = docs(num_lines=12, query_interval=3, answer_distance=5)
    assert [(d["lines"], d["asked_line"]) for d in got] == [(6, 2), (9, 5), (12, 8)]
    assert [d["lines"] for d in docs(num_lines="7", query_interval="7", answer_distance="7")] == [7]  # key=val form


def test_request_and_exact_match():
    task = load_task(num_lines=40)
    task.build_all_requests(rank=0, world_size=1)
    first, doc = task.instances[0], task.instances[0].doc
    assert first.request_type == "generate_until"
    context, gen_kwargs = first.arguments
    assert context == doc["context"] and gen_kwargs["until"] == [">", "\n"] and not gen_kwargs["do_sample"]
    right, wrong = task.process_results(doc, [f" {doc['answer']}"]), task.process_results(doc, ["1" + doc["answer"]])
    assert (right["exact_match"], wrong["exact_match"]) == (1.0, 0.0)
    assert task.process_results(doc, [doc["answer"] + " is it"])["exact_match"] == 0.0
    # per bucket: the doc's own bucket scores, the others report None; every doc has every key
    assert right["exact_match_lines_1_100"] == 1.0
    assert {k for k, v in right.items() if v is None} == set(task.aggregation()) - {"exact_match",
                                                                                   "exact_match_lines_1_100"}


def test_buckets_match_yaml_and_aggregate():
    u = utils()
    listed = [m["metric"] for m in yaml.safe_load(
        re.sub(r"!function \S+", "f", (TASK_DIR / "streameval.yaml").read_text()))["metric_list"]]
    assert listed == ["exact_match"] + [u.bucket_metric(lo, hi) for lo, hi in u.BUCKETS]
    scored = [u.process_results({"lines": n, "answer": "7"}, [r]) for n, r in
              [(100, "7"), (101, "7"), (150, "8"), (3201, "7")]]
    column = lambda name: [s[name] for s in scored]  # noqa: E731
    assert u.mean_present(column("exact_match_lines_1_100")) == 1.0
    assert u.mean_present(column("exact_match_lines_101_200")) == 0.5
    assert u.mean_present(column("exact_match_lines_3201_up")) == 1.0
    assert math.isnan(u.mean_present(column("exact_match_lines_201_400")))


@pytest.mark.parametrize("metadata, message", [
    ({"num_lines": 0}, "num_lines must be an integer >= 1 (--metadata), got 0"),
    ({"query_interval": "ten"}, "query_interval must be an integer >= 1 (--metadata), got 'ten'"),
    ({"answer_distance": True}, "answer_distance must be an integer >= 1 (--metadata), got True"),
    ({"seed": -1}, "seed must be an integer >= 0 (--metadata), got -1"),
    ({"num_lines": 10}, "answer_distance must be <= num_lines (--metadata), got answer_distance=20 with num_lines=10"),
])
def test_bad_metadata_names_the_key(metadata, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        load_task(**metadata)


@pytest.mark.usefixtures("one_thread")
def test_e2e_streaming_hf(tiny):
    tm = TaskManager(include_path=str(TASK_DIR.parent), include_defaults=False, metadata={"num_lines": 30})
    lm = streaming(tiny, start_size=4, recent_size=60)
    out = lm_eval.simple_evaluate(model=lm, tasks=["streameval"], task_manager=tm, bootstrap_iters=0,
                                  log_samples=True)
    res = out["results"]["streameval"]
    assert out["n-samples"]["streameval"]["effective"] == 2 and lm._evicted > 0
    assert 0 <= res["exact_match,none"] <= 1 and res["exact_match_lines_1_100,none"] == res["exact_match,none"]
    assert math.isnan(res["exact_match_lines_101_200,none"])
    assert [s["doc"]["lines"] for s in out["samples"]["streameval"]] == [20, 30]
