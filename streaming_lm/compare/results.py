"""Reading lm-eval results files: which run a file belongs to, and whether a request is already done."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from .. import settings as settings_mod
from .errors import CompareError, say
from .grid import BASELINE, knob, param_names, run_name


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
        """C = start_size + recent_size + heavy_size as the model resolved it (known after a ratio run too)."""
        if self.model == BASELINE:
            return None
        capacity = self.data.get("config", {}).get("streaming", {}).get("capacity")
        if capacity is None and self.stream.get("compression_ratio") is None:
            capacity = sum(int(knob(self.stream, k)) for k in ("start_size", "recent_size", "heavy_size"))
        return capacity


def plot_key(result: Result):
    """The order of runs in the table and the plot (here, not in report, so reading needs no report import)."""
    s = result.stream
    start = int(knob(s, "start_size"))
    return (knob(s, "policy"), knob(s, "positions"), s.get("method") or "", start, s.get("stride") or 0,
            result.capacity or 0)


def load_result(path: Path) -> Result:
    data = json.loads(path.read_text(encoding="utf-8"))
    model = data.get("config", {}).get("model")
    args = _model_args(data)
    stream = {k: v for k, v in args.items() if k in settings_mod.KNOBS}
    stream |= {k: args[k] for k in param_names(stream) if k in args}  # the policy's own parameters
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
    return baseline + sorted(found.values(), key=plot_key)
