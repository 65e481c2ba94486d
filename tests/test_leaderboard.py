"""``compare --leaderboard``: kvpress's leaderboard as one grid, and its methods × ratios table (no model loads)."""

import csv
import json

import pytest

from streaming_lm import compare, settings
from streaming_lm.compare import leaderboard

from test_compare import PNG_MAGIC, refuse_evaluation

PATTERN = "tests/data/duo_pattern_smollm2"
FILTERS = "tests/data/qfilter_smollm2"


def test_the_grid_is_every_entry_at_every_ratio_each_as_streaming_hf_resolves_it():
    runs = leaderboard.leaderboard_grid([], 1024, {"pattern": [PATTERN], "filters": [FILTERS]})
    assert runs[0].name == "hf"
    assert len(runs) == 1 + len(leaderboard.ENTRIES) * len(leaderboard.RATIOS)
    assert len({r.name for r in runs}) == len(runs)  # every run its own folder
    assert all("/" not in r.name for r in runs)  # duo's pattern path does not nest folders
    for run in runs[1:]:
        entry, ratio = leaderboard.entry_of(compare.Result(run.name, run.model, run.stream, {}, None))
        assert entry.stream(ratio, 1024)[0].items() <= run.stream.items()  # each run is read back as its row
        params = {k: run.stream[k] for k in settings.policy_param_names(entry.policy) if k in run.stream}
        resolved = settings.resolve(**{k: v for k, v in run.stream.items() if k in settings.KNOBS},
                                    policy_params=params, max_length=1024)
        assert resolved.policy == entry.policy
    by_label = {leaderboard.entry_of(compare.Result(r.name, r.model, r.stream, {}, None))[0].label: r
                for r in runs[1:] if r.stream.get("compression_ratio", r.stream.get("head_compression_ratio")) == 0.5}
    assert by_label["expected_attention"].stream["head_budgets"] == "adaptive"  # the leaderboard's AdaKV-EA
    assert by_label["pyramidkv"].stream["layer_budgets"] == "pyramid"
    assert by_label["streaming_llm"].stream["start_size"] == 4  # kvpress's n_sink
    assert by_label["knorm"].stream["evict_every"] == "context" and by_label["knorm"].stream["start_size"] == 0
    assert by_label["h2o every 64"].stream["recent_size"] == 256  # half of C = 512
    assert by_label["duo_attention"].stream["head_compression_ratio"] == 0.5
    assert by_label["qfilter"].stream["filters"] == FILTERS


def test_an_entry_that_needs_a_file_is_left_out_said_so(capsys):
    runs = leaderboard.leaderboard_grid([0.5], 1024, {})
    assert not any(r.stream.get("policy") in ("duo", "qfilter") for r in runs)
    assert len(runs) == len(leaderboard.ENTRIES) - 1  # hf + every entry but duo and qfilter, once
    err = capsys.readouterr().err
    assert "leaving out duo_attention: it needs --param pattern=" in err
    assert "leaving out qfilter: it needs --param filters=" in err


@pytest.mark.parametrize("argv, message", [
    (["--policies", "knorm"], "--leaderboard sets each method's settings itself: drop --policies"),
    (["--evict-every", "64", "--start-sizes", "4"], "drop --start-sizes, --evict-every"),
    (["--param", "window_size=8"], "--leaderboard takes --param only for filters, pattern; got window_size"),
    (["--compression-ratios", "1.5"], "compression_ratio must be"),
])
def test_bad_leaderboard_commands_are_refused_before_anything_runs(argv, message, tmp_path, monkeypatch, capsys):
    refuse_evaluation(monkeypatch)
    with pytest.raises(SystemExit) as exit_info:
        compare.main(["--leaderboard", "--pretrained", "m", "--model_args", "max_length=1024", "--tasks", "t",
                      "-o", str(tmp_path), *argv])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_without_max_length_the_every_k_rows_have_no_size(tmp_path, monkeypatch, capsys):
    refuse_evaluation(monkeypatch)
    with pytest.raises(SystemExit):
        compare.main(["--leaderboard", "--pretrained", "m", "--tasks", "t", "-o", str(tmp_path)])
    assert "--leaderboard needs max_length in --model_args" in capsys.readouterr().err


TASKS = ("ruler_offline_vt", "ruler_offline_cwe")


def write_run(folder, model, model_args, values: dict, group: bool = True):
    folder.mkdir(parents=True)
    results = {task: {"string_match_all,none": value} for task, value in values.items()}
    if group:
        results["ruler_offline"] = {"string_match_all,none": sum(values.values()) / len(values)}
    data = {"config": {"model": model, "model_args": {"pretrained": "m"} | model_args}, "results": results,
            "groups": {"ruler_offline": {}} if group else {}}
    (folder / "results_2026-01-01T00-00-00.000000.json").write_text(json.dumps(data))


@pytest.mark.parametrize("group", [True, False], ids=["group", "tasks only"])
def test_the_table_is_methods_by_ratios_for_each_task_and_the_average(group, tmp_path, monkeypatch):
    write_run(tmp_path / "runs" / "dense", "hf", {}, dict(zip(TASKS, (1.0, 0.5))), group)
    wanted = {}
    for run in leaderboard.leaderboard_grid([0.25, 0.75], 1024, {}):
        if run.model == "hf":
            continue
        entry, ratio = leaderboard.entry_of(compare.Result(run.name, run.model, run.stream, {}, None))
        values = dict(zip(TASKS, (round(1 - ratio, 3), len(entry.label) / 100)))
        wanted[entry.label, ratio] = values | {"average": sum(values.values()) / 2}
        write_run(tmp_path / "runs" / run.name, run.model, run.stream, values, group)
    write_run(tmp_path / "runs" / "other", "streaming_hf", {"recent_size": 16}, dict(zip(TASKS, (0.1, 0.1))), group)

    refuse_evaluation(monkeypatch)
    compare.main(["--from-results", str(tmp_path / "runs"), "-o", str(tmp_path / "out"), "--leaderboard"])
    rows = list(csv.DictReader((tmp_path / "out" / "leaderboard.csv").open()))
    assert [r["method"] for r in rows[1::2]] == [e.label for e in leaderboard.ENTRIES if not e.needs]
    assert rows[0]["method"] == "dense (hf)" and float(rows[0]["average"]) == 0.75
    for row in rows[1:]:  # the run of another grid is no row
        for task, value in wanted[row["method"], float(row["compression_ratio"])].items():
            assert float(row[task]) == pytest.approx(value)
    text = (tmp_path / "out" / "leaderboard.md").read_text()
    assert "## average" in text and "## ruler_offline_vt" in text
    assert "| knorm | 75.0 | 25.0 |" in text  # vt is 1 - r
    pytest.importorskip("matplotlib")
    assert (tmp_path / "out" / "leaderboard.png").read_bytes().startswith(PNG_MAGIC)


def test_the_grid_runs_end_to_end_and_every_row_streams(tiny_dir, tmp_path, excerpt_text, monkeypatch):
    """The whole leaderboard at one ratio through lm-eval on the tiny model (a multiple-choice task: its contexts are
    read once after the context or every K tokens): every row but duo (no pattern given) is a results file whose run
    evicted, and the leaderboard table has a value for each."""
    import lm_eval
    import lm_eval.tasks
    from functools import partial

    from helpers.local_tasks import MC_YAML, write_task
    from streaming_lm.compare import run as compare_run

    text = " ".join(excerpt_text.split())
    docs = [{"question": text[i * 300 : i * 300 + 260], "choices": [" the", " a"], "answer": 0} for i in range(2)]
    write_task(tmp_path, "tiny_mc", MC_YAML, docs)
    for key, value in {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(lm_eval.tasks, "TaskManager", partial(lm_eval.tasks.TaskManager, include_defaults=False))
    monkeypatch.setattr(compare_run, "say", lambda *a: None)
    out = tmp_path / "out"
    compare.main(["--leaderboard", "--pretrained", str(tiny_dir), "--model_args", "dtype=float32,max_length=256",
                  "--tasks", "tiny_mc", "--include_path", str(tmp_path), "--device", "cpu",
                  "--compression-ratios", "0.5", "-o", str(out)])
    results = compare.load_results_dir(out)
    streamed = {leaderboard.entry_of(r)[0].label: r.data["config"]["streaming"]["evicted_tokens"]
                for r in results if r.model == "streaming_hf"}
    assert set(streamed) == {e.label for e in leaderboard.ENTRIES if not e.needs}
    assert all(evicted > 0 for evicted in streamed.values()), streamed  # no row quietly read the dense model
    rows = list(csv.DictReader((out / "leaderboard.csv").open()))
    assert len(rows) == len(streamed) + 1 and all(row["average"] != "" for row in rows)
