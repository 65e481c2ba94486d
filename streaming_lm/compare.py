"""Dense ``hf`` against a grid of ``streaming_hf`` settings, in one table and one plot.

``python -m streaming_lm compare`` (or ``scripts/compare.py``); see docs/compare.md. Every run goes
through lm-eval's Python API and is saved in lm-eval's own results format, one sub-directory per run,
so an interrupted grid resumes and ``--from-results`` can rebuild the table from any lm-eval output.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import itertools
import json
import math
import os
import sys
from pathlib import Path

from . import settings as settings_mod

STREAMING_KEYS = ("start_size", "recent_size", "compression_ratio", "positions", "method", "chunk_size")
BASELINE = "hf"


class CompareError(ValueError):
    """A bad argument or input file; the CLI prints it and exits with status 2."""


def say(message: str) -> None:
    # stderr, like lm-eval's own logs and progress bars, so stdout keeps only the table.
    print(message, file=sys.stderr, flush=True)


# ---------------------------------------------------------------- the grid


@dataclasses.dataclass(frozen=True)
class Run:
    model: str  # "hf" or "streaming_hf"
    stream: dict  # streaming_hf model args as passed ({} for the baseline)

    @property
    def name(self) -> str:
        return run_name(self.model, self.stream)

    def describe(self) -> str:
        if self.model == BASELINE:
            return "hf (dense baseline)"
        return "streaming_hf " + " ".join(f"{k}={v}" for k, v in self.stream.items())


def run_name(model: str, stream: dict) -> str:
    """Sub-directory and column name, e.g. ``streaming_s4_r252_shifted``; defaults filled as the model does."""
    if model == BASELINE:
        return BASELINE
    start = stream.get("start_size", settings_mod.DEFAULT_START_SIZE)
    if stream.get("compression_ratio") is not None:
        size = f"cr{float(stream['compression_ratio']):g}"
    else:
        size = f"r{stream.get('recent_size', settings_mod.DEFAULT_RECENT_SIZE)}"
    name = f"streaming_s{start}_{size}_{stream.get('positions', 'shifted')}"
    # The method is named only when chosen, so the model's default can change without renaming runs.
    return name + (f"_{stream['method']}" if stream.get("method") else "")


def _split(text: str | None, convert, flag: str) -> list:
    if text is None:
        return []
    values = []
    for item in (part.strip() for part in text.split(",")):
        try:
            values.append(convert(item))
        except ValueError:
            raise CompareError(f"{flag}: {item!r} is not a valid value; expected comma-separated numbers") from None
    return list(dict.fromkeys(values))  # drop repeats, keep order


def build_grid(
    start_sizes, recent_sizes, compression_ratios, positions, method=None, max_length=None, chunk_size=None
) -> list[Run]:
    """The baseline plus one run per setting, every setting validated by ``settings.resolve``."""
    if recent_sizes and compression_ratios:
        # Both budget the same cache (C); mixing them would put two kinds of x value on one axis.
        raise CompareError("give --recent-sizes or --compression-ratios, not both")
    if not recent_sizes and not compression_ratios:
        raise CompareError("give --recent-sizes or --compression-ratios (comma-separated lists)")
    size_key, sizes = ("recent_size", recent_sizes) if recent_sizes else ("compression_ratio", compression_ratios)
    runs = [Run(BASELINE, {})]
    for pos, start, size in itertools.product(positions, start_sizes, sizes):
        stream = {"start_size": start, size_key: size, "positions": pos}
        if method is not None:
            stream["method"] = method
        if chunk_size is not None:  # speed only: same numbers, so not part of the run's name
            stream["chunk_size"] = chunk_size
        try:
            resolved = settings_mod.resolve(**stream, max_length=max_length)
        except ValueError as error:
            shown = " ".join(f"{k}={v}" for k, v in stream.items())
            raise CompareError(f"bad grid setting ({shown}): {error}") from None
        # Pass the validated values on, so "04" and 4 are one run with one name.
        stream["start_size"] = resolved.start_size
        if size_key == "recent_size":
            stream["recent_size"] = resolved.recent_size
        runs.append(Run("streaming_hf", stream))
    return _unique(runs)


def _unique(runs: list[Run]) -> list[Run]:
    seen, out = set(), []
    for run in runs:
        if run.name not in seen:
            seen.add(run.name)
            out.append(run)
    return out


# ---------------------------------------------------------------- results files


def _model_args(data: dict) -> dict:
    args = data.get("config", {}).get("model_args") or {}
    if isinstance(args, str):  # files written by lm-eval's CLI keep the "k=v,..." string
        from lm_eval.utils import simple_parse_args_string

        args = simple_parse_args_string(args)
    return args


def _jsonable(value):
    return json.loads(json.dumps(value, default=str))


def results_files(folder: Path) -> list[Path]:
    # lm-eval names them results_<ISO time>.json, so sorting by name is oldest first.
    return sorted(folder.rglob("results_*.json"), key=lambda p: p.name)


def find_done(run_dir: Path, model: str, model_args: dict, tasks: list[str], limit, metadata: dict) -> Path | None:
    """The newest results file in ``run_dir`` made by the same request, or None (run it)."""
    for path in reversed(results_files(run_dir) if run_dir.is_dir() else []):
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            continue
        config = data.get("config", {})
        done = set(data.get("results", {})) | set(data.get("groups", {})) | set(data.get("group_subtasks", {}))
        task_metadata = [c.get("metadata") or {} for c in data.get("configs", {}).values()]
        if (
            config.get("model") == model
            and _jsonable(_model_args(data)) == _jsonable(model_args)
            and config.get("limit") == limit
            and set(tasks) <= done
            and all(_jsonable(m.get(k)) == _jsonable(v) for m in task_metadata for k, v in metadata.items())
        ):
            return path
    return None


@dataclasses.dataclass
class Result:
    name: str
    model: str
    stream: dict
    data: dict
    path: Path

    @property
    def capacity(self) -> int | None:
        """C = start_size + recent_size as the model resolved it (known after a ratio run too)."""
        if self.model == BASELINE:
            return None
        capacity = self.data.get("config", {}).get("streaming", {}).get("capacity")
        if capacity is None and self.stream.get("compression_ratio") is None:
            start = self.stream.get("start_size", settings_mod.DEFAULT_START_SIZE)
            capacity = int(start) + int(self.stream.get("recent_size", settings_mod.DEFAULT_RECENT_SIZE))
        return capacity


def load_result(path: Path) -> Result:
    data = json.loads(path.read_text(encoding="utf-8"))
    model = data.get("config", {}).get("model")
    stream = {k: v for k, v in _model_args(data).items() if k in STREAMING_KEYS}
    return Result(run_name(model, stream), model, stream, data, path)


def load_results_dir(folder: Path) -> list[Result]:
    """Every hf / streaming_hf results file under ``folder``; the newest wins where two share a name."""
    if not folder.is_dir():
        raise CompareError(f"--from-results: {folder} is not a directory")
    found: dict[str, Result] = {}
    for path in results_files(folder):
        try:
            result = load_result(path)
        except (OSError, json.JSONDecodeError) as error:
            say(f"skipping {path}: {error}")
            continue
        if result.model not in (BASELINE, "streaming_hf"):
            say(f"skipping {path}: model {result.model!r} is neither hf nor streaming_hf")
            continue
        if result.name in found:
            say(f"{result.name}: using {path}, newer than {found[result.name].path}")
        found[result.name] = result
    if not found:
        raise CompareError(f"--from-results: no hf or streaming_hf results_*.json under {folder}")
    baseline = [found.pop(BASELINE)] if BASELINE in found else []
    return baseline + sorted(found.values(), key=_plot_key)


# ---------------------------------------------------------------- the table


def metrics(data: dict):
    """(task, metric, value) for every numeric metric, "word_perplexity,none" shown as "word_perplexity"."""
    for task, values in data.get("results", {}).items():
        for key, value in values.items():
            numeric = isinstance(value, (int, float)) and not isinstance(value, bool)  # not "N/A" stderr
            if "," not in key or "_stderr," in key or not numeric:
                continue
            metric, _, filt = key.partition(",")
            yield task, (metric if filt == "none" else key), float(value)


def main_metric(results: list[Result], task: str) -> str | None:
    """The first metric the task's YAML lists, else the first one reported."""
    available = [m for r in results for t, m, _ in metrics(r.data) if t == task]
    for result in results:
        for entry in result.data.get("configs", {}).get(task, {}).get("metric_list") or []:
            if entry.get("metric") in available:
                return entry["metric"]
    return available[0] if available else None


def load_reference(path: Path) -> dict[str, dict[tuple[str, str], float]]:
    """{source: {(task, metric): value}} from a CSV or JSON list of {task, metric, value, source}."""
    try:
        text = path.read_text(encoding="utf-8")
        rows = json.loads(text) if path.suffix.lower() == ".json" else list(csv.DictReader(text.splitlines()))
    except (OSError, json.JSONDecodeError) as error:
        raise CompareError(f"--reference {path}: {error}") from None
    reference: dict[str, dict] = {}
    for number, row in enumerate(rows if isinstance(rows, list) else [], start=1):
        try:
            key = (str(row["task"]).strip(), str(row["metric"]).strip().removesuffix(",none"))
            value = float(row["value"])
        except (KeyError, TypeError, ValueError):
            message = f"--reference {path}: row {number} needs task, metric and a numeric value: {row}"
            raise CompareError(message) from None
        reference.setdefault(str(row.get("source") or "reference").strip(), {})[key] = value
    if not reference:
        raise CompareError(f"--reference {path}: no rows (expected a list of task, metric, value, source)")
    return reference


def build_table(results: list[Result], reference: dict | None = None) -> tuple[list[str], list[dict]]:
    """Columns and rows: task, metric, baseline, reference columns, then each setting and its change."""
    reference = reference or {}
    baseline = next((r for r in results if r.model == BASELINE), None)
    settings = [r for r in results if r.model != BASELINE]
    values = {r.name: {(t, m): v for t, m, v in metrics(r.data)} for r in results}
    keys = list(dict.fromkeys(k for r in results for k in values[r.name]))
    columns = ["task", "metric", "baseline", *(f"ref: {s}" for s in reference)]
    for result in settings:
        columns += [result.name, f"{result.name} rel"]
    rows = []
    for key in keys:
        base = values[baseline.name].get(key) if baseline else None
        row = {"task": key[0], "metric": key[1], "baseline": base}
        row |= {f"ref: {s}": ref.get(key) for s, ref in reference.items()}
        for result in settings:
            value = values[result.name].get(key)
            row[result.name] = value
            # (setting - baseline) / |baseline|; undefined without both or with a zero baseline.
            row[f"{result.name} rel"] = (value - base) / abs(base) if value is not None and base else None
        rows.append(row)
    return columns, rows


def write_csv(path: Path, columns: list[str], rows: list[dict]) -> None:
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        # repr keeps every digit, so the CSV equals the results files exactly.
        writer.writerows({k: "" if v is None else (repr(v) if isinstance(v, float) else v) for k, v in row.items()}
                         for row in rows)


def _fmt(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return f"{value:.6g}" if isinstance(value, float) else str(value)


def markdown(columns: list[str], rows: list[dict], results: list[Result]) -> str:
    lines = ["# Dense vs streaming", "",
             "| run | model | start_size | recent_size | C | positions | results file |", "|" + "---|" * 7]
    for r in results:
        config = r.data.get("config", {}).get("streaming", {})
        cells = [r.name, r.model, config.get("start_size", r.stream.get("start_size", "")),
                 config.get("recent_size", r.stream.get("recent_size", "")), r.capacity or "",
                 config.get("positions", r.stream.get("positions", "")), r.path]
        lines.append("| " + " | ".join("" if c is None else str(c) for c in cells) + " |")
    # One cell per setting, "value (change)", keeps the table readable; the CSV has separate columns.
    shown = [c for c in columns if not c.endswith(" rel")]
    lines += ["", "In brackets: the relative change (setting − baseline) / |baseline|.", "",
              "| " + " | ".join(shown) + " |", "|" + "---|" * len(shown)]
    for row in rows:
        cells = []
        for column in shown:
            cell, rel = _fmt(row.get(column)), row.get(f"{column} rel")
            cells.append(f"{cell} ({rel:+.2%})" if cell and rel is not None else cell)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- the plot


def _plot_key(result: Result):
    s = result.stream
    start = int(s.get("start_size", settings_mod.DEFAULT_START_SIZE))
    return s.get("positions", "shifted"), s.get("method") or "", start, result.capacity or 0


def write_plot(path: Path, results: list[Result]) -> bool:
    """Main metric of each task against C, one line per start size / positions; False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # no display needed
        import matplotlib.pyplot as plt
    except ImportError:
        say("matplotlib is not installed: skipping comparison.png (pip install 'streaming-lm[plot]')")
        return False
    tasks = list(dict.fromkeys(t for r in results for t, _, _ in metrics(r.data)))
    ncols = min(3, len(tasks)) or 1
    nrows = math.ceil(len(tasks) / ncols) or 1
    fig, axes = plt.subplots(nrows, ncols, figsize=(5 * ncols, 3.8 * nrows), squeeze=False)
    for ax, task in zip(axes.flat, tasks):
        metric = main_metric(results, task)
        lines: dict[str, list] = {}
        for r in sorted((r for r in results if r.model != BASELINE and r.capacity), key=_plot_key):
            value = dict(((t, m), v) for t, m, v in metrics(r.data)).get((task, metric))
            if value is not None:
                s = r.stream
                label = f"S={s.get('start_size', settings_mod.DEFAULT_START_SIZE)} {s.get('positions', 'shifted')}"
                label += f" {s['method']}" if s.get("method") else ""
                lines.setdefault(label, []).append((r.capacity, value))
        for label, points in lines.items():
            # original-position lines dotted: with start_size=0 they coincide with the shifted ones.
            style = dict(marker="s", linestyle=":") if "original" in label else dict(marker="o")
            ax.plot(*zip(*points), label=label, **style)
        shown = [v for points in lines.values() for _, v in points]
        for r in results:
            if r.model == BASELINE:
                base = dict(((t, m), v) for t, m, v in metrics(r.data)).get((task, metric))
                if base is not None:
                    ax.axhline(base, color="black", linestyle="--", label="dense (hf)")
                    shown.append(base)
        ax.set(title=task, xlabel="cache size C = start_size + recent_size", ylabel=metric)
        if shown and min(shown) > 0 and max(shown) > 10 * min(shown):
            ax.set_yscale("log")  # without sinks perplexity can grow by orders of magnitude
        ax.legend(fontsize="small")
    for ax in list(axes.flat)[len(tasks):]:
        ax.set_visible(False)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def write_outputs(output_dir: Path, results: list[Result], reference: dict | None) -> dict[str, Path]:
    output_dir.mkdir(parents=True, exist_ok=True)
    columns, rows = build_table(results, reference)
    written = {"csv": output_dir / "comparison.csv", "md": output_dir / "comparison.md"}
    write_csv(written["csv"], columns, rows)
    text = markdown(columns, rows, results)
    written["md"].write_text(text, encoding="utf-8")
    if write_plot(output_dir / "comparison.png", results):
        written["png"] = output_dir / "comparison.png"
    print(text)
    return written


# ---------------------------------------------------------------- running


def evaluate_run(run: Run, run_dir: Path, model_args: dict, options: dict, task_manager) -> Path:
    """One lm-eval evaluation, saved by EvaluationTracker the way lm-eval's CLI saves it."""
    from lm_eval import simple_evaluate
    from lm_eval.loggers import EvaluationTracker

    tracker = EvaluationTracker(output_path=str(run_dir))
    results = simple_evaluate(model=run.model, model_args=model_args, evaluation_tracker=tracker,
                              task_manager=task_manager, **options)
    tracker.save_results_aggregated(results=results, samples=None)
    # The tracker logs and swallows write errors; without the file the grid could never resume.
    if not results_files(run_dir):
        raise RuntimeError(f"lm-eval wrote no results file under {run_dir}")
    return results_files(run_dir)[-1]


def run_grid(runs: list[Run], output_dir: Path, common_args: dict, tasks: list[str], include_path, limit,
             device, batch_size, metadata: dict) -> list[Result]:
    task_manager = None
    # The task metadata holds the shared model args but not the streaming ones (lm-eval's CLI adds all
    # model args): every run then reads exactly the same task.
    task_metadata = common_args | metadata
    paths = []
    for number, run in enumerate(runs, start=1):
        model_args = common_args | run.stream
        run_dir = output_dir / run.name
        header = f"run {number}/{len(runs)}: {run.describe()}"
        done = find_done(run_dir, run.model, model_args, tasks, limit, metadata)
        if done is not None:
            say(f"{header}: already done ({done}), skipping")
            paths.append(done)
            continue
        say(header)
        if task_manager is None:  # indexing every lm-eval task takes seconds: once, and only if needed
            from lm_eval.tasks import TaskManager

            task_manager = TaskManager(include_path=include_path, metadata=task_metadata)
        options = dict(tasks=tasks, limit=limit, device=device, batch_size=batch_size, metadata=task_metadata)
        paths.append(evaluate_run(run, run_dir, model_args, options, task_manager))
        say(f"{header}: saved {paths[-1]}")
    return [load_result(p) for p in paths]


# ---------------------------------------------------------------- command line


def _metadata(text: str | None) -> dict:
    if not text:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        from lm_eval.utils import simple_parse_args_string  # lm-eval also takes key=val,...

        value = simple_parse_args_string(text)
    if not isinstance(value, dict):
        raise CompareError(f"--metadata must be a JSON object or key=val,...; got {text!r}")
    return value


def _batch_size(text: str):
    return int(text) if text.isdigit() else text  # "auto", "auto:4" as lm-eval takes them


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m streaming_lm compare",
        description="Evaluate dense hf once and streaming_hf for every setting of a grid; "
        "write comparison.md, comparison.csv and comparison.png. See docs/compare.md.",
    )
    model = p.add_argument_group("model and tasks (as in lm-eval's CLI)")
    model.add_argument("--pretrained", help="model name or local folder (or pretrained=... in --model_args)")
    model.add_argument("--model_args", "--model-args", default="",
                       help="more model args 'k=v,k2=v2', e.g. dtype=float32,gguf_file=model.gguf")
    model.add_argument("--tasks", "-t", help="comma-separated task names")
    model.add_argument("--device", default=None)
    model.add_argument("--batch_size", "--batch-size", "-b", type=_batch_size, default=1)
    model.add_argument("--limit", "-L", type=float, default=None, help="examples per task (count or fraction)")
    model.add_argument("--include_path", "--include-path", default=None, help="folder with extra task YAMLs")
    model.add_argument("--metadata", default=None, help='task metadata as JSON, e.g. \'{"max_words": 250}\'')
    grid = p.add_argument_group("streaming grid (comma-separated lists)")
    grid.add_argument("--start-sizes", "--start_sizes", default=str(settings_mod.DEFAULT_START_SIZE))
    grid.add_argument("--recent-sizes", "--recent_sizes", default=None)
    grid.add_argument("--compression-ratios", "--compression_ratios", default=None)
    grid.add_argument("--positions", default="shifted", help="shifted, original, or shifted,original for both")
    grid.add_argument("--method", default=None, help="streaming_hf method; default: the model's own")
    grid.add_argument("--chunk-size", "--chunk_size", dest="chunk_size", default=None,
                      help="streaming_hf chunk_size (speed only); default: the model's own")
    out = p.add_argument_group("input and output")
    out.add_argument("--output-dir", "--output_dir", "--output_path", "-o", type=Path, default=None)
    out.add_argument("--from-results", "--from_results", type=Path, default=None,
                     help="build the comparison from existing lm-eval results files instead of running")
    out.add_argument("--reference", type=Path, default=None, help="CSV or JSON of task, metric, value, source")
    return p


def compare(args: argparse.Namespace) -> dict[str, Path]:
    reference = load_reference(args.reference) if args.reference else None
    if args.from_results is not None:
        if args.tasks or args.pretrained:
            raise CompareError("--from-results reads existing results: drop --pretrained and --tasks")
        return write_outputs(args.output_dir or args.from_results, load_results_dir(args.from_results), reference)

    from lm_eval.utils import simple_parse_args_string

    common = simple_parse_args_string(args.model_args)
    if clash := [k for k in STREAMING_KEYS if k in common]:
        raise CompareError(f"--model_args must not set {', '.join(clash)}: the grid sets them")
    if args.pretrained:
        common = {"pretrained": args.pretrained} | common
    if "pretrained" not in common:
        raise CompareError("give --pretrained (or pretrained=... in --model_args)")
    if not args.tasks:
        raise CompareError("give --tasks (or --from-results DIR)")
    if args.output_dir is None:
        raise CompareError("give --output-dir: every run is saved there, which lets a rerun resume")
    runs = build_grid(
        _split(args.start_sizes, str, "--start-sizes"),  # resolve() checks and converts them
        _split(args.recent_sizes, str, "--recent-sizes"),
        _split(args.compression_ratios, float, "--compression-ratios"),
        _split(args.positions, str, "--positions"),
        args.method,
        common.get("max_length"),
        args.chunk_size,
    )
    tasks = [t for t in _split(args.tasks, str, "--tasks") if t]
    metadata = _metadata(args.metadata)
    say(f"{len(runs)} runs ({', '.join(r.name for r in runs)}) into {args.output_dir}")
    results = run_grid(runs, args.output_dir, common, tasks, args.include_path, args.limit, args.device,
                       args.batch_size, metadata)
    return write_outputs(args.output_dir, results, reference)


def main(argv: list[str] | None = None) -> None:
    cli = parser()
    args = cli.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # as lm-eval's CLI does
    from lm_eval.utils import setup_logging

    from .registration import register

    setup_logging()
    register()
    try:
        written = compare(args)
    except CompareError as error:
        cli.error(str(error))
    say("wrote " + ", ".join(str(path) for path in written.values()))


if __name__ == "__main__":
    main()
