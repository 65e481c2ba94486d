"""``python -m streaming_lm compare``: a 2x2 grid on the tiny model, resumption, --from-results (bad grids:
tests/test_bad_inputs.py, cases compare-*)."""

import csv
import json
import os
import shutil
import subprocess
import sys
from functools import partial

import lm_eval
import lm_eval.tasks
import pytest

from streaming_lm import compare, settings
from streaming_lm.compare import run as compare_run

from helpers.engine import token_loop_word_perplexity
from helpers.local_tasks import ROLLING_YAML, read_docs, write_task
from helpers.models import streaming

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: threads only cost

OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
RUNS = ["hf", "streaming_s0_r16_shifted", "streaming_s0_r32_shifted", "streaming_s4_r16_shifted",
        "streaming_s4_r32_shifted"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def grid_args(tiny_dir, task_dir, out, **overrides):
    options = {"--pretrained": str(tiny_dir), "--model_args": "dtype=float32", "--tasks": "tiny_rolling",
               "--include_path": str(task_dir), "--device": "cpu", "--start-sizes": "0,4",
               "--recent-sizes": "16,32", "--metadata": '{"max_words": 250}', "--output-dir": str(out)}
    options |= overrides
    return [item for key, value in options.items() if value is not None for item in (key, value)]


def read_csv(path):
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def refuse_evaluation(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("no evaluation expected")

    monkeypatch.setattr(lm_eval, "simple_evaluate", fail)
    monkeypatch.setattr(lm_eval.tasks, "TaskManager", fail)


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory, excerpt_text):
    # Byte tokenizer: ~240 + ~120 tokens, well over C <= 36, so every setting evicts.
    root = tmp_path_factory.mktemp("compare_tasks")
    lines = [line.strip() for line in excerpt_text.splitlines() if line.strip()]
    return write_task(root, "tiny_rolling", ROLLING_YAML, [{"text": text} for text in (lines[1][:240], lines[2][:120])])


@pytest.fixture(scope="module")
def grid(tmp_path_factory, tiny_dir, task_dir):
    """Runs the 2x2 grid once for the module; counts lm-eval evaluations and keeps the progress lines. The task
    manager skips lm-eval's ~10k built-in tasks (seconds to index; the task comes from --include_path)."""
    out = tmp_path_factory.mktemp("compare") / "out"
    calls, said = [], []
    real = lm_eval.simple_evaluate
    with pytest.MonkeyPatch.context() as mp:
        for key, value in OFFLINE.items():
            mp.setenv(key, value)
        mp.setattr(lm_eval, "simple_evaluate", lambda **kw: calls.append(kw) or real(**kw))
        mp.setattr(lm_eval.tasks, "TaskManager", partial(lm_eval.tasks.TaskManager, include_defaults=False))
        mp.setattr(compare_run, "say", said.append)
        compare.main(grid_args(tiny_dir, task_dir, out))
    return out, calls, said


def test_grid_runs_each_setting_once_and_tables_the_saved_results(grid, tiny, task_dir):
    out, calls, said = grid
    assert [(c["model"], c["model_args"].get("recent_size")) for c in calls] == [
        ("hf", None), ("streaming_hf", 16), ("streaming_hf", 32), ("streaming_hf", 16), ("streaming_hf", 32)]
    assert "run 1/5: hf (dense baseline)" in said
    assert "run 5/5: streaming_hf start_size=4 recent_size=32 positions=shifted" in said
    assert {p.name for p in out.iterdir()} == {*RUNS, "comparison.csv", "comparison.md", "comparison.png"}

    saved = {name: compare.load_result(compare.results_files(out / name)[-1]).data for name in RUNS}
    texts = [doc["text"] for doc in read_docs(task_dir, "tiny_rolling")]
    for name in RUNS[1:]:
        config = saved[name]["config"]["streaming"]
        assert config["evicted_tokens"] > 0
        # Each run's number is the engine's token loop with its cache settings, not merely not the dense one.
        lm = streaming(tiny, start_size=config["start_size"], recent_size=config["recent_size"])
        expected = token_loop_word_perplexity(lm, texts)
        assert saved[name]["results"]["tiny_rolling"]["word_perplexity,none"] == pytest.approx(expected, rel=1e-5)
    assert saved["streaming_s4_r16_shifted"]["configs"]["tiny_rolling"]["metadata"]["max_words"] == 250

    rows = read_csv(out / "comparison.csv")
    assert [(r["task"], r["metric"]) for r in rows] == [
        ("tiny_rolling", m) for m in ("word_perplexity", "byte_perplexity", "bits_per_byte")]
    for row in rows:
        base = saved["hf"]["results"]["tiny_rolling"][row["metric"] + ",none"]
        assert float(row["baseline"]) == base
        for name in RUNS[1:]:
            value = saved[name]["results"]["tiny_rolling"][row["metric"] + ",none"]
            assert float(row[name]) == value
            assert value != pytest.approx(base, rel=1e-9)  # streaming evicted: not the dense number
            assert float(row[f"{name} rel"]) == pytest.approx((value - base) / base, rel=1e-12)

    text = (out / "comparison.md").read_text()
    word = rows[0]
    cell = f"{float(word['streaming_s4_r16_shifted']):.6g} ({float(word['streaming_s4_r16_shifted rel']):+.2%})"
    assert cell in text
    assert "| streaming_s4_r16_shifted | streaming_hf | 4 | 16 | 20 | shifted |" in text
    for table in text.split("\n\n"):  # every markdown table: header, separator and rows line up
        lines = [line for line in table.splitlines() if line.startswith("|")]
        if lines:
            assert set(lines[1].replace("|", "")) == {"-"}
            assert {line.count(" | ") for line in lines if line != lines[1]} == {lines[0].count(" | ")}
            assert lines[1].count("|") == lines[0].count("|")


def test_rerun_evaluates_nothing(grid, tiny_dir, task_dir, monkeypatch, capsys):
    out, _, _ = grid
    before = (out / "comparison.csv").read_text()
    refuse_evaluation(monkeypatch)
    compare.main(grid_args(tiny_dir, task_dir, out))
    assert (out / "comparison.csv").read_text() == before
    assert capsys.readouterr().err.count("already done") == 5


def test_interrupted_grid_runs_only_what_is_missing(grid, tiny_dir, task_dir, tmp_path, monkeypatch):
    out = tmp_path / "out"
    shutil.copytree(grid[0], out)
    missing = compare.load_result(compare.results_files(out / "streaming_s4_r32_shifted")[-1])
    shutil.rmtree(out / "streaming_s4_r32_shifted")
    calls = []

    def fake_evaluate(**kwargs):  # hands back the deleted run's numbers instead of recomputing them
        calls.append(kwargs)
        return json.loads(json.dumps(missing.data))

    monkeypatch.setattr(lm_eval, "simple_evaluate", fake_evaluate)
    monkeypatch.setattr(lm_eval.tasks, "TaskManager", lambda **kwargs: None)
    compare.main(grid_args(tiny_dir, task_dir, out))
    expected = {"start_size": 4, "recent_size": 32, "positions": "shifted"}
    assert [c["model_args"] for c in calls] == [{"pretrained": str(tiny_dir), "dtype": "float32"} | expected]
    assert compare.results_files(out / "streaming_s4_r32_shifted")
    assert read_csv(out / "comparison.csv") == read_csv(grid[0] / "comparison.csv")

    # A different request (here --limit 1) is not "already done": it is evaluated again.
    def evaluated(**kwargs):
        raise RuntimeError("evaluated")

    monkeypatch.setattr(lm_eval, "simple_evaluate", evaluated)
    with pytest.raises(RuntimeError, match="evaluated"):
        compare.main(grid_args(tiny_dir, task_dir, out, **{"--limit": "1"}))


@pytest.mark.parametrize("count", [2, 3])
def test_shards_split_the_grid_and_their_results_merge_into_its_table(grid, tiny_dir, task_dir, tmp_path,
                                                                      monkeypatch, count):
    """``--shard i/n``: each shard evaluates a disjoint part of the grid (the dense baseline in shard 1), together
    all of it; ``--from-results`` on the shards' folders copied into one writes the whole grid's table."""
    done = {name: compare.load_result(compare.results_files(grid[0] / name)[-1]) for name in RUNS}
    evaluated = []
    monkeypatch.setattr(lm_eval.tasks, "TaskManager", lambda **kwargs: None)
    merged = tmp_path / "merged"
    for index in range(1, count + 1):
        def fake_evaluate(**kwargs):  # the full grid's numbers for the run asked, not recomputed
            name = next(n for n in RUNS if (n == "hf") == (kwargs["model"] == "hf") and
                        json.loads(json.dumps(done[n].data))["config"]["model_args"] == kwargs["model_args"])
            evaluated.append((index, name))
            return json.loads(json.dumps(done[name].data))

        monkeypatch.setattr(lm_eval, "simple_evaluate", fake_evaluate)
        out = tmp_path / f"shard{index}"
        compare.main(grid_args(tiny_dir, task_dir, out, **{"--shard": f"{index}/{count}"}))
        assert not (out / "comparison.csv").exists()  # a part of the grid: no table of its own
        shutil.copytree(out, merged, dirs_exist_ok=True)
    names = [name for _, name in evaluated]
    assert sorted(names) == sorted(RUNS) and len(set(names)) == len(RUNS)  # disjoint, and the whole grid
    assert [name for index, name in evaluated if index == 1][0] == "hf"
    refuse_evaluation(monkeypatch)
    compare.main(["--from-results", str(merged), "--output-dir", str(tmp_path / "table")])
    assert read_csv(tmp_path / "table" / "comparison.csv") == read_csv(grid[0] / "comparison.csv")


@pytest.mark.parametrize("shard", ["0/2", "3/2", "1", "a/b", "1/0"])
def test_a_bad_shard_is_refused(tiny_dir, task_dir, tmp_path, shard, capsys):
    with pytest.raises(SystemExit):
        compare.main(grid_args(tiny_dir, task_dir, tmp_path / "out", **{"--shard": shard}))
    assert "--shard must be i/n" in capsys.readouterr().err


def test_from_results_gives_the_same_table(grid, tmp_path, monkeypatch):
    refuse_evaluation(monkeypatch)
    compare.main(["--from-results", str(grid[0]), "--output-dir", str(tmp_path / "a")])
    assert read_csv(tmp_path / "a" / "comparison.csv") == read_csv(grid[0] / "comparison.csv")

    # Files written by lm-eval's own CLI keep model_args as a "k=v,..." string; they name the runs alike.
    cli_dir = tmp_path / "cli"
    for name in RUNS:
        source = compare.results_files(grid[0] / name)[-1]
        data = json.loads(source.read_text())
        data["config"]["model_args"] = ",".join(f"{k}={v}" for k, v in data["config"]["model_args"].items())
        (cli_dir / name).mkdir(parents=True)
        (cli_dir / name / source.name).write_text(json.dumps(data))
    reference = tmp_path / "reference.csv"
    reference.write_text("task,metric,value,source\ntiny_rolling,word_perplexity,12.5,paper\n")
    compare.main(["--from-results", str(cli_dir), "-o", str(tmp_path / "b"), "--reference", str(reference)])
    rows = read_csv(tmp_path / "b" / "comparison.csv")
    without_reference = [{k: v for k, v in r.items() if k != "ref: paper"} for r in rows]
    assert without_reference == read_csv(grid[0] / "comparison.csv")
    assert [r["ref: paper"] for r in rows] == ["12.5", "", ""]


def test_python_m_streaming_lm_compare_reaches_compare(tiny_dir, task_dir, tmp_path):
    args = grid_args(tiny_dir, task_dir, tmp_path / "out", **{"--recent-sizes": "0"})
    proc = subprocess.run([sys.executable, "-m", "streaming_lm", "compare", *args], capture_output=True, text=True,
                          env=os.environ | OFFLINE, timeout=120)
    assert proc.returncode == 2
    assert "recent_size must be an integer >= 1, got 0" in proc.stderr


def test_png_is_valid_and_optional(grid, tmp_path, monkeypatch, capsys):
    pytest.importorskip("matplotlib")
    png = (grid[0] / "comparison.png").read_bytes()
    assert png.startswith(PNG_MAGIC) and png.endswith(b"IEND\xaeB`\x82")

    refuse_evaluation(monkeypatch)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if not installed
    compare.main(["--from-results", str(grid[0]), "--output-dir", str(tmp_path)])
    assert "matplotlib is not installed: skipping comparison.png" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["comparison.csv", "comparison.md"]


# ---------------------------------------------------------------- every knob reaches compare


def write_results(folder, model, model_args, value, task="tiny_rolling", metric="word_perplexity"):
    """A results file as plain lm_eval writes it, in a folder not named after the run."""
    folder.mkdir(parents=True)
    data = {"config": {"model": model, "model_args": {"pretrained": "m"} | model_args},
            "results": {task: {f"{metric},none": value}}}
    (folder / "results_2026-01-01T00-00-00.000000.json").write_text(json.dumps(data))


def test_recompute_runs_differing_only_in_stride_stay_apart(tmp_path, monkeypatch):
    runs = compare.build_grid(["4"], ["16"], [], ["shifted"], "recompute", strides=["1", "4", "04"])
    assert [r.name for r in runs] == ["hf", "streaming_s4_r16_shifted_recompute_stride1",
                                      "streaming_s4_r16_shifted_recompute_stride4"]
    assert runs[2].stream == {"start_size": 4, "recent_size": 16, "positions": "shifted", "method": "recompute",
                              "stride": 4}

    write_results(tmp_path / "runs" / "a", "hf", {}, 10.0)
    for number, run in enumerate(runs[1:], start=1):
        write_results(tmp_path / "runs" / f"b{number}", run.model, run.stream, 10.0 + number)
    assert [r.name for r in compare.load_results_dir(tmp_path / "runs")] == [r.name for r in runs]
    refuse_evaluation(monkeypatch)
    compare.main(["--from-results", str(tmp_path / "runs"), "--output-dir", str(tmp_path / "out")])
    row = read_csv(tmp_path / "out" / "comparison.csv")[0]
    assert [row[r.name] for r in runs[1:]] == ["11.0", "12.0"]


@pytest.mark.parametrize("knob", settings.KNOBS)
def test_every_knob_is_read_back_and_kept_out_of_model_args(knob, tmp_path, monkeypatch, capsys):
    write_results(tmp_path / "run", "streaming_hf", {knob: 1}, 10.0)
    assert compare.load_result(compare.results_files(tmp_path / "run")[0]).stream == {knob: 1}

    refuse_evaluation(monkeypatch)
    with pytest.raises(SystemExit) as exit_info:
        compare.main(["--pretrained", "m", "--tasks", "tiny_rolling", "--recent-sizes", "16",
                      "--output-dir", str(tmp_path / "out"), "--model_args", f"{knob}=1"])
    assert exit_info.value.code == 2
    assert f"--model_args must not set {knob}: the grid sets them" in capsys.readouterr().err


def test_policy_parameters_are_read_back_into_the_run(tmp_path):
    plugin = "helpers.policies:Recency"  # a plug-in with a parameter (tests/helpers/policies.py)
    stream = {"start_size": 4, "recent_size": 16, "positions": "original", "policy": plugin}
    write_results(tmp_path / "run", "streaming_hf", stream | {"step": -1.0, "other": 3}, 10.0)
    result = compare.load_result(compare.results_files(tmp_path / "run")[0])
    assert result.stream == stream | {"step": -1.0}  # the knobs and the policy's own parameter
    assert result.name.endswith("_step-1.0")
    (run,) = [r for r in compare.build_grid(["4"], ["16"], [], [], policies=[plugin], params={"step": ["-1"]})
              if r.model == "streaming_hf"]
    assert run.name == result.name  # a rerun finds it


def test_names_of_runs_without_new_knobs_are_unchanged():
    assert compare.run_name("streaming_hf", {"start_size": 4, "recent_size": 252, "positions": "shifted"}) == \
        "streaming_s4_r252_shifted"
    stream = {"start_size": 0, "compression_ratio": 0.5, "positions": "original", "method": "token", "chunk_size": 64}
    assert compare.run_name("streaming_hf", stream) == "streaming_s0_cr0.5_original_token"


# Two values of each knob; any other knob is an integer (as stride is).
KNOB_VALUES = {"positions": ("shifted", "original"), "method": ("chunked", "token"),
               "compression_ratio": (0.25, 0.5), "policy": ("tova", "h2o")}


@pytest.mark.parametrize("knob", settings.KNOBS)
def test_every_result_knob_changes_the_run_name(knob):
    names = {compare.run_name("streaming_hf", {knob: value}) for value in KNOB_VALUES.get(knob, (7, 16))}
    if knob in settings.RESULT_KNOBS:
        assert len(names) == 2, names
    else:  # speed only (chunk_size): same numbers, same name
        assert names == {compare.run_name("streaming_hf", {})}


def test_a_policy_grid_names_each_policy_and_heavy_size():
    runs = compare.build_grid(["0"], ["64"], [], [], policies=["sink_window", "tova", "h2o"], heavy_sizes=["32", "64"])
    assert [r.name for r in runs] == [
        "hf", "streaming_s0_r64_shifted", "streaming_tova_s0_r64_h32_original", "streaming_tova_s0_r64_h64_original",
        "streaming_h2o_s0_r64_h32_original", "streaming_h2o_s0_r64_h64_original"]
    assert runs[2].stream == {"start_size": 0, "recent_size": 64, "positions": "original", "policy": "tova",
                              "heavy_size": 32}


def test_plot_of_a_metric_against_compression_ratio_one_line_per_policy(tmp_path, monkeypatch, capsys):
    # kvpress's plot: accuracy against compression ratio, one line per method, from results files alone.
    accuracy = {"sink_window": [0.9, 0.5, 0.1], "knorm": [0.8, 0.6, 0.4]}
    write_results(tmp_path / "runs" / "dense", "hf", {}, 1.0, "ruler_offline_vt", "string_match_all")
    for policy, values in accuracy.items():
        for ratio, value in zip((0.75, 0.25, 0.5), (values[2], values[0], values[1])):  # any order on disk
            args = {"compression_ratio": ratio} | ({"policy": policy} if policy != "sink_window" else {})
            write_results(tmp_path / "runs" / f"{policy}{ratio}", "streaming_hf", args, value, "ruler_offline_vt",
                          "string_match_all")
    write_results(tmp_path / "runs" / "sized", "streaming_hf", {"recent_size": 16}, 0.3, "ruler_offline_vt",
                  "string_match_all")  # has no ratio: not on this plot
    results = compare.load_results_dir(tmp_path / "runs")
    lines = compare.plot_lines(results, "ruler_offline_vt", "string_match_all", "compression_ratio")
    # Labels name what tells the lines apart (not the start size both have, nor the recent size the ratio sets).
    assert lines == {"sink_window shifted": list(zip((0.25, 0.5, 0.75), accuracy["sink_window"])),
                     "knorm original": list(zip((0.25, 0.5, 0.75), accuracy["knorm"]))}
    # A line alone is labelled with its whole setting.
    assert compare.plot_lines(results, "ruler_offline_vt", "string_match_all") == {
        "sink_window W=16 S=4 shifted": [(20, 0.3)]}

    pytest.importorskip("matplotlib")
    refuse_evaluation(monkeypatch)
    compare.main(["--from-results", str(tmp_path / "runs"), "-o", str(tmp_path / "out"),
                  "--plot-metric", "string_match_all", "--plot-x", "compression_ratio"])
    assert (tmp_path / "out" / "comparison.png").read_bytes().startswith(PNG_MAGIC)
    assert "runs without a compression_ratio are left out of the plot" in capsys.readouterr().err
