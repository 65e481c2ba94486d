"""The comparison: the table (comparison.csv, comparison.md) and the plot (comparison.png)."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

from .. import settings as settings_mod
from .errors import CompareError, say
from .grid import BASELINE, knob, other_knobs
from .results import Result, plot_key


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


# What the plot's x axis can be: the cache size C, or the compression ratio of ratio runs (kvpress's plot).
PLOT_X = {"capacity": "cache size C = start_size + recent_size (+ heavy_size)", "compression_ratio": "compression ratio"}


def x_value(result: Result, x: str):
    """The run's value on the plot's x axis, None where it has none (a recent_size run has no ratio)."""
    if x == "capacity":
        return result.capacity
    ratio = result.stream.get("compression_ratio")
    return None if ratio is None else float(ratio)  # a CLI-written results file keeps it as a string


def plot_lines(results: list[Result], task: str, metric: str, x: str = "capacity") -> dict[str, list]:
    """{label: [(x, value), ...]}: one line per setting other than x (policy, start size, positions, ...). A label
    names what tells its line from the others (all of its setting when it is the only line)."""
    runs = []
    for r in sorted((r for r in results if r.model != BASELINE and x_value(r, x) is not None), key=plot_key):
        value = dict(((t, m), v) for t, m, v in metrics(r.data)).get((task, metric))
        if value is not None:
            runs.append((line_parts(r.stream, x), x_value(r, x), value))
    common = {k for k in runs[0][0] if all(parts.get(k) == runs[0][0][k] for parts, _, _ in runs)} if runs else set()
    lines: dict[str, list] = {}
    for parts, at, value in runs:
        shown = parts if len({tuple(p.items()) for p, _, _ in runs}) == 1 else \
            {k: v for k, v in parts.items() if k not in common}
        label = " ".join(str(v) if k in ("policy", "positions", "method") else f"{k}={v}" for k, v in shown.items())
        lines.setdefault(label, []).append((at, value))
    return {label: sorted(points) for label, points in lines.items()}


def line_parts(stream: dict, x: str) -> dict:
    """What sets a plotted run apart, in label order: its policy, recent size (unless x is the ratio that sets it),
    start size, positions, method and any other knob or policy parameter (e.g. one line per stride)."""
    parts = {"policy": knob(stream, "policy")}
    if x != "compression_ratio":
        parts["W"] = knob(stream, "recent_size")
    parts |= {"S": knob(stream, "start_size"), "positions": knob(stream, "positions")}
    if stream.get("method"):
        parts["method"] = stream["method"]
    return parts | other_knobs(stream)


def pyplot(skipped: str):
    """matplotlib's pyplot without a display, or None (said: ``skipped`` is not drawn) where it is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # no display needed
        import matplotlib.pyplot as plt
    except ImportError:
        say(f"matplotlib is not installed: skipping {skipped} (pip install 'streaming-lm[plot]')")
        return None
    return plt


def write_plot(path: Path, results: list[Result], metric: str | None = None, x: str = "capacity") -> bool:
    """``metric`` (default: each task's main one) against ``x`` (a PLOT_X key), one line per other setting
    (policy, start size, positions, ...), the dense baseline dashed; False without matplotlib."""
    plt = pyplot(path.name)
    if plt is None:
        return False
    tasks = list(dict.fromkeys(t for r in results for t, m, _ in metrics(r.data) if metric in (None, m)))
    if any(r.model != BASELINE and x_value(r, x) is None for r in results):
        say(f"comparison.png: runs without a {x} are left out of the plot")
    ncols = min(3, len(tasks)) or 1
    nrows = math.ceil(len(tasks) / ncols) or 1
    fig, axes = plt.subplots(nrows, ncols, figsize=(7.5 * ncols, 3.8 * nrows), squeeze=False)  # legends at the right
    for ax, task in zip(axes.flat, tasks):
        shown_metric = metric or main_metric(results, task)
        lines = plot_lines(results, task, shown_metric, x)
        for label, points in lines.items():
            # original-position lines dotted: with start_size=0 they coincide with the shifted ones.
            style = dict(marker="s", linestyle=":") if "original" in label.split() else dict(marker="o")
            ax.plot(*zip(*points), label=label, **style)
        shown = [v for points in lines.values() for _, v in points]
        for r in results:
            if r.model == BASELINE:
                base = dict(((t, m), v) for t, m, v in metrics(r.data)).get((task, shown_metric))
                if base is not None:
                    ax.axhline(base, color="black", linestyle="--", label="dense (hf)")
                    shown.append(base)
        ax.set(title=task, xlabel=PLOT_X[x], ylabel=shown_metric)
        if shown and min(shown) > 0 and max(shown) > 10 * min(shown):
            ax.set_yscale("log")  # without sinks perplexity can grow by orders of magnitude
        ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0)
    for ax in list(axes.flat)[len(tasks):]:
        ax.set_visible(False)
    fig.tight_layout()
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return True


def write_outputs(output_dir: Path, results: list[Result], reference: dict | None, plot_metric: str | None = None,
                  plot_x: str = "capacity") -> dict[str, Path]:
    output_dir.mkdir(parents=True, exist_ok=True)
    columns, rows = build_table(results, reference)
    written = {"csv": output_dir / "comparison.csv", "md": output_dir / "comparison.md"}
    write_csv(written["csv"], columns, rows)
    text = markdown(columns, rows, results)
    written["md"].write_text(text, encoding="utf-8")
    if write_plot(output_dir / "comparison.png", results, plot_metric, plot_x):
        written["png"] = output_dir / "comparison.png"
    print(text)
    return written
