"""Running the grid through lm-eval's Python API, one results folder per run, skipping runs already done."""

from __future__ import annotations

from pathlib import Path

from .errors import say
from .grid import Run
from .results import Result, find_done, load_result, results_files


def evaluate_run(run: Run, run_dir: Path, model_args: dict, options: dict, task_manager,
                 model_name: str | None = None) -> Path:
    """One lm-eval evaluation, saved by EvaluationTracker the way lm-eval's CLI saves it, in a folder named
    ``model_name`` (the model as the user named it) when given."""
    from lm_eval import simple_evaluate
    from lm_eval.loggers import EvaluationTracker
    from lm_eval.utils import sanitize_model_name

    tracker = EvaluationTracker(output_path=str(run_dir))
    results = simple_evaluate(model=run.model, model_args=model_args, evaluation_tracker=tracker,
                              task_manager=task_manager, **options)
    if model_name is not None:
        # lm-eval names the folder after model_args' pretrained: for pretrained=smollm2 that is the folder cli.py
        # resolved it to (so that hf finds it too), not the name the user gave.
        tracker.general_config_tracker.model_name = str(model_name)
        tracker.general_config_tracker.model_name_sanitized = sanitize_model_name(str(model_name))
    tracker.save_results_aggregated(results=results, samples=None)
    # The tracker logs and swallows write errors; without the file the grid could never resume.
    if not results_files(run_dir):
        raise RuntimeError(f"lm-eval wrote no results file under {run_dir}")
    return results_files(run_dir)[-1]


def run_grid(runs: list[Run], output_dir: Path, common_args: dict, tasks: list[str], include_path, limit,
             device, batch_size, metadata: dict, model_name: str | None = None) -> list[Result]:
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
        paths.append(evaluate_run(run, run_dir, model_args, options, task_manager, model_name))
        say(f"{header}: saved {paths[-1]}")
    return [load_result(p) for p in paths]
