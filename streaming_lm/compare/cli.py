"""``python -m streaming_lm compare``: the command line; see docs/compare.md."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from .. import settings as settings_mod
from ..offline_models import resolve_pretrained
from .errors import CompareError, say
from .grid import _split, build_grid
from .leaderboard import RATIOS, leaderboard_grid, write_leaderboard
from .report import PLOT_X, load_reference, write_outputs
from .results import load_results_dir
from .run import run_grid


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


def _param_axes(items: list[str]) -> dict[str, list[str]]:
    """``--param NAME=V1,V2`` (repeated) as {NAME: [V1, V2]}; resolve() checks the values."""
    axes = {}
    for item in items:
        name, sep, values = item.partition("=")
        if not sep or not name.strip() or not values.strip():
            raise CompareError(f"--param: expected NAME=V1,V2,...; got {item!r}")
        axes[name.strip()] = _split(values, str, f"--param {name.strip()}")
    return axes


def _shard(text: str | None) -> tuple[int, int] | None:
    """``--shard i/n``: the i-th (1-based) of n disjoint parts of the grid."""
    if text is None:
        return None
    index, sep, count = text.partition("/")
    if not (sep and index.strip().isdigit() and count.strip().isdigit() and 1 <= int(index) <= int(count)):
        raise CompareError(f"--shard must be i/n with 1 <= i <= n (e.g. 2/4); got {text!r}")
    return int(index), int(count)


def shard_of(runs: list, shard: tuple[int, int] | None) -> list:
    """The runs of shard ``i/n``: every n-th run from the i-th (the dense baseline is the first run: shard 1's), so
    that the shards are disjoint, cover the grid and take about as long each."""
    if shard is None:
        return runs
    index, count = shard
    return runs[index - 1 :: count]


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
    grid.add_argument("--leaderboard", action="store_true",
                      help="kvpress's leaderboard as the grid: every method it ranks that runs here, and ours, at "
                      f"--compression-ratios (default {','.join(map(str, RATIOS))}); writes leaderboard.md, .csv, .png")
    grid.add_argument("--start-sizes", "--start_sizes", default=None,
                      help=f"attention sinks S (default {settings_mod.DEFAULT_START_SIZE})")
    grid.add_argument("--recent-sizes", "--recent_sizes", default=None)
    grid.add_argument("--compression-ratios", "--compression_ratios", default=None)
    grid.add_argument("--positions", default=None,
                      help="shifted, original, or shifted,original for both (default: each policy's own)")
    grid.add_argument("--policies", default=None,
                      help=f"eviction policies, from {', '.join(settings_mod.POLICIES)} or package.module:Class "
                      "(default sink_window)")
    grid.add_argument("--heavy-sizes", "--heavy_sizes", default=None,
                      help="heavy_size of the scored policies (C = start + recent + heavy); sink_window ignores it")
    grid.add_argument("--evict-every", "--evict_every", dest="evict_every", default=None,
                      help="evict_every K: the cache is compressed after every K tokens (default: the model's own, 1); "
                      "context: once per request, after its context (kvpress's regime)")
    grid.add_argument("--query-size", "--query_size", dest="query_size", default=None,
                      help="query_size of the evict_every=context runs (default: the model's own, 1)")
    grid.add_argument("--param", action="append", default=[], metavar="NAME=V1,V2",
                      help="a policy parameter as a grid axis, for the runs whose policy has it "
                      "(e.g. --param window_size=16,32); repeat for more")
    grid.add_argument("--method", default=None, help="streaming_hf method; default: the model's own")
    grid.add_argument("--chunk-size", "--chunk_size", dest="chunk_size", default=None,
                      help="streaming_hf chunk_size (speed only); default: the model's own")
    grid.add_argument("--strides", default=None,
                      help="streaming_hf stride, with --method recompute; default: the model's own (1)")
    out = p.add_argument_group("input and output")
    out.add_argument("--output-dir", "--output_dir", "--output_path", "-o", type=Path, default=None)
    out.add_argument("--from-results", "--from_results", type=Path, default=None,
                     help="build the comparison from existing lm-eval results files instead of running")
    out.add_argument("--shard", default=None, metavar="I/N",
                     help="run only the I-th of N disjoint parts of the grid (a SLURM array task, one GPU each); "
                     "every shard writes into --output-dir, and --from-results on it (or on the shards' folders "
                     "copied into one) writes the comparison")
    out.add_argument("--reference", type=Path, default=None, help="CSV or JSON of task, metric, value, source")
    out.add_argument("--plot-metric", "--plot_metric", default=None,
                     help="metric drawn in comparison.png, e.g. string_match_all (default: each task's main metric)")
    out.add_argument("--plot-x", "--plot_x", choices=tuple(PLOT_X), default="capacity",
                     help="x axis of comparison.png: the cache size C (default) or the compression ratio of "
                     "--compression-ratios runs; one line per other setting (policy, start size, positions)")
    return p


def compare(args: argparse.Namespace) -> dict[str, Path]:
    reference = load_reference(args.reference) if args.reference else None
    shard = _shard(args.shard)
    if args.from_results is not None:
        if shard is not None:
            raise CompareError("--shard splits a run of the grid; --from-results reads every shard's results: drop "
                               "--shard")
        if args.tasks or args.pretrained:
            raise CompareError("--from-results reads existing results: drop --pretrained and --tasks")
        return finish(args.output_dir or args.from_results, load_results_dir(args.from_results), reference, args)

    from lm_eval.utils import simple_parse_args_string

    common = simple_parse_args_string(args.model_args)
    if clash := [k for k in settings_mod.KNOBS if k in common]:
        raise CompareError(f"--model_args must not set {', '.join(clash)}: the grid sets them")
    if args.pretrained:
        common = {"pretrained": args.pretrained} | common
    if "pretrained" not in common:
        raise CompareError("give --pretrained (or pretrained=... in --model_args)")
    # A named offline checkpoint (smollm2) becomes its folder and file here, so the dense hf run finds it too.
    name = common["pretrained"]  # the results folders are named after it, as lm-eval's CLI names them
    try:
        pretrained, common = resolve_pretrained(name, common)
    except ModuleNotFoundError as error:
        raise CompareError(str(error)) from None
    common["pretrained"] = pretrained
    if not args.tasks:
        raise CompareError("give --tasks (or --from-results DIR)")
    if args.output_dir is None:
        raise CompareError("give --output-dir: every run is saved there, which lets a rerun resume")
    runs = leaderboard_runs(args, common) if args.leaderboard else build_grid(
        _split(args.start_sizes or str(settings_mod.DEFAULT_START_SIZE), str, "--start-sizes"),  # resolve() checks
        _split(args.recent_sizes, str, "--recent-sizes"),
        _split(args.compression_ratios, float, "--compression-ratios"),
        _split(args.positions, str, "--positions"),
        args.method,
        common.get("max_length"),
        args.chunk_size,
        _split(args.strides, str, "--strides"),
        _split(args.policies, str, "--policies"),
        _split(args.heavy_sizes, str, "--heavy-sizes"),
        _split(args.evict_every, str, "--evict-every"),
        _param_axes(args.param),
        args.query_size,
    )
    tasks = [t for t in _split(args.tasks, str, "--tasks") if t]
    metadata = _metadata(args.metadata)
    mine = shard_of(runs, shard)
    part = "" if shard is None else f" (shard {shard[0]}/{shard[1]} of {len(runs)})"
    say(f"{len(mine)} runs{part} ({', '.join(r.name for r in mine)}) into {args.output_dir}")
    results = run_grid(mine, args.output_dir, common, tasks, args.include_path, args.limit, args.device,
                       args.batch_size, metadata, model_name=name)
    if shard is not None:  # a part of the grid: its table is made once every shard is done
        say(f"shard {shard[0]}/{shard[1]} done; when every shard is, write the comparison with "
            f"python -m streaming_lm compare --from-results {args.output_dir}")
        return {}
    return finish(args.output_dir, results, reference, args)


# The grid flags --leaderboard sets itself (each method its own policy, sinks, schedule and parameters).
_LEADERBOARD_SETS = ("start_sizes", "recent_sizes", "positions", "policies", "heavy_sizes", "evict_every", "strides")


def leaderboard_runs(args: argparse.Namespace, common: dict) -> list:
    if given := [name for name in _LEADERBOARD_SETS if getattr(args, name) is not None]:
        flags = ", ".join("--" + name.replace("_", "-") for name in given)
        raise CompareError(f"--leaderboard sets each method's settings itself: drop {flags} (it takes "
                           "--compression-ratios, --query-size, --method, --chunk-size and --param pattern=...)")
    ratios = _split(args.compression_ratios, float, "--compression-ratios")
    return leaderboard_grid(ratios, common.get("max_length"), _param_axes(args.param),
                            {"query_size": args.query_size, "method": args.method, "chunk_size": args.chunk_size})


def finish(output_dir: Path, results: list, reference, args: argparse.Namespace) -> dict[str, Path]:
    """The comparison, and with --leaderboard the leaderboard's table and plot."""
    plot_x = "compression_ratio" if args.leaderboard and args.plot_x == "capacity" else args.plot_x
    written = write_outputs(output_dir, results, reference, args.plot_metric, plot_x)
    if args.leaderboard:
        written |= write_leaderboard(output_dir, results, args.plot_metric)
    return written


def main(argv: list[str] | None = None) -> None:
    cli = parser()
    args = cli.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # as lm-eval's CLI does
    from lm_eval.utils import setup_logging

    from ..registration import register

    setup_logging()
    register()
    try:
        written = compare(args)
    except CompareError as error:
        cli.error(str(error))
    say("wrote " + ", ".join(str(path) for path in written.values()))
