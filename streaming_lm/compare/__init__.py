"""Dense ``hf`` against a grid of ``streaming_hf`` settings, in one table and one plot.

``python -m streaming_lm compare``; see docs/compare.md. Every run goes through lm-eval's Python API and is
saved in lm-eval's own results format, one sub-directory per run, so an interrupted grid resumes and
``--from-results`` can rebuild the table from any lm-eval output.

grid: the settings and run names; results: reading results files; run: evaluating the grid;
report: table, CSV, markdown and plot; cli: the command line.
"""

from .cli import compare, main, parser
from .errors import CompareError, say
from .grid import BASELINE, Run, build_grid, run_name
from .report import (build_table, load_reference, main_metric, markdown, metrics, plot_lines, write_csv, write_outputs,
                     write_plot)
from .results import Result, find_done, load_result, load_results_dir, results_files
from .run import evaluate_run, run_grid

__all__ = [
    "BASELINE", "CompareError", "Result", "Run", "build_grid", "build_table", "compare", "evaluate_run", "find_done",
    "load_reference", "load_result", "load_results_dir", "main", "main_metric", "markdown", "metrics", "parser",
    "plot_lines", "results_files", "run_grid", "run_name", "say", "write_csv", "write_outputs", "write_plot",
]
