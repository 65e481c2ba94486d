"""The command lines: lm_eval finds streaming_hf, hf still works, ``python -m streaming_lm`` is lm-eval's CLI.

One real ``lm_eval`` subprocess runs ``streaming_hf``: a fresh interpreter that finds the model through the
installed start-up hook (tests/test_install.py checks the registry itself in fresh interpreters). The other command
lines run in this process through their entry functions (lm-eval's ``cli_evaluate``, ``streaming_lm.__main__.main``)
with the same arguments: a subprocess would add ~25 s each of imports and of lm-eval indexing its ~10k built-in
tasks, which these runs skip (their tasks come from --include_path; the subprocess run indexes them as users do).
Each run covers two tasks (documents longer than C + 1 tokens, which evict, and documents no longer than C + 1,
which must give the dense numbers).
"""

import json
import logging
import os
import subprocess
import sys
from functools import partial
from pathlib import Path

import lm_eval.__main__
import lm_eval.tasks
import pytest
from helpers.engine import token_loop_word_perplexity
from helpers.local_tasks import ROLLING_YAML, read_docs, write_task

from streaming_lm import StreamingHFLM
from streaming_lm.__main__ import main as streaming_lm_main

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: threads only cost

START, RECENT = 4, 60  # C = 64: the byte tokenizer makes one token per byte, plus the prefix token
TASKS = "tiny_rolling,tiny_short"
LM_EVAL = [str(Path(sys.executable).with_name("lm_eval"))]
ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory, excerpt_text):
    root = tmp_path_factory.mktemp("tasks")
    lines = [line for line in excerpt_text.splitlines() if line.strip()][:5]
    write_task(root, "tiny_rolling", ROLLING_YAML, [{"text": "\n".join(lines[:2])[:400]}, {"text": lines[2][:300]}])
    short = [{"text": lines[3][:START + RECENT - 1]}, {"text": lines[4][:40]}]
    assert all(len(doc["text"].encode()) + 1 <= START + RECENT + 1 for doc in short)  # nothing to evict
    return write_task(root, "tiny_short", ROLLING_YAML, short)


def cli_args(out, model, model_args, task_dir):
    return ["--model", model, "--model_args", model_args, "--tasks", TASKS, "--include_path", str(task_dir),
            "--device", "cpu", "--output_path", str(out)]


def results_of(out):
    (result_file,) = out.rglob("results_*.json")
    return json.loads(result_file.read_text())


def run_cli(command, out, model, model_args, task_dir):
    """``command`` in a subprocess: (results, its stderr)."""
    proc = subprocess.run([*command, *cli_args(out, model, model_args, task_dir)], capture_output=True, text=True,
                          env=os.environ | ENV, cwd=out.parent, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return results_of(out), proc.stderr


def run_here(entry, argv):
    """A command line's entry function on ``argv`` in this process: (what it raised or None, its streaming_hf log).
    lm-eval's task manager skips its built-in tasks; its logging set-up (a handler on lm-eval's logger for the rest
    of the session) is left out, streaming_hf's log lines are collected instead."""
    records = []
    handler = logging.Handler()
    handler.emit = lambda record: records.append(record.getMessage())
    logger = logging.getLogger("lm_eval.models.streaming_hf")
    level = logger.level
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sys, "argv", ["command", *argv])
        patch.setattr(lm_eval.tasks, "TaskManager", partial(lm_eval.tasks.TaskManager, include_defaults=False))
        patch.setattr(lm_eval.__main__, "setup_logging", lambda: None)
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        try:
            entry()
        except Exception as error:  # noqa: BLE001 - handed to the caller, which asserts what it must be
            return error, "\n".join(records)
        finally:
            logger.removeHandler(handler)
            logger.setLevel(level)
    return None, "\n".join(records)


def run_cli_here(entry, out, model, model_args, task_dir):
    """``run_cli`` in this process (``run_here``): (results, streaming_hf's log)."""
    error, log = run_here(entry, cli_args(out, model, model_args, task_dir))
    assert error is None, repr(error)
    return results_of(out), log


@pytest.fixture(scope="module")
def dense(tmp_path_factory, tiny_dir, task_dir):
    """``hf`` through lm-eval's CLI, in this process."""
    return run_cli_here(lm_eval.__main__.cli_evaluate, tmp_path_factory.mktemp("dense") / "out", "hf",
                        f"pretrained={tiny_dir},dtype=float32", task_dir)[0]


@pytest.fixture(scope="module")
def streamed(tmp_path_factory, tiny_dir, task_dir):
    """``streaming_hf`` through a command line, run once per command: ``lm_eval`` in a subprocess,
    ``python -m streaming_lm`` (its main) in this process."""
    done = {}

    def run(command):
        if command not in done:
            args = ("streaming_hf", f"pretrained={tiny_dir},dtype=float32,start_size={START},recent_size={RECENT}",
                    task_dir)
            out = tmp_path_factory.mktemp("streaming") / "out"
            done[command] = (run_cli(LM_EVAL, out, *args) if command == "lm_eval"
                             else run_cli_here(streaming_lm_main, out, *args))
        return done[command]
    return run


@pytest.mark.slow
@pytest.mark.parametrize("command", ["lm_eval", "python -m streaming_lm"])
def test_cli_streaming_and_dense(command, streamed, dense, tiny_dir, task_dir):
    streaming, log = streamed(command)
    config = streaming["config"]["streaming"]
    assert (config["start_size"], config["recent_size"], config["positions"]) == (START, RECENT, "shifted")
    assert config["evicted_tokens"] > 0
    assert "tokens evicted" in log
    got = streaming["results"]["tiny_rolling"]["word_perplexity,none"]
    assert got != pytest.approx(dense["results"]["tiny_rolling"]["word_perplexity,none"], rel=1e-6)
    # ... and it is the engine's token loop on each document's stream, as lm-eval aggregates it.
    lm = StreamingHFLM(pretrained=str(tiny_dir), device="cpu", dtype="float32", start_size=START, recent_size=RECENT)
    texts = [doc["text"] for doc in read_docs(task_dir, "tiny_rolling")]
    assert got == pytest.approx(token_loop_word_perplexity(lm, texts), rel=1e-5)


@pytest.mark.slow
def test_cli_short_documents_equal_dense(streamed, dense):
    streaming, _ = streamed("lm_eval")
    for metric in ("word_perplexity,none", "byte_perplexity,none", "bits_per_byte,none"):
        got, expected = streaming["results"]["tiny_short"][metric], dense["results"]["tiny_short"][metric]
        assert got == pytest.approx(expected, rel=1e-4)


@pytest.mark.slow
def test_cli_bad_argument_names_it(tmp_path, tiny_dir, task_dir):
    error, _ = run_here(lm_eval.__main__.cli_evaluate, [
        "--model", "streaming_hf", "--model_args", f"pretrained={tiny_dir},recent_size=0", "--tasks", "tiny_rolling",
        "--include_path", str(task_dir), "--output_path", str(tmp_path / "out")])
    assert isinstance(error, ValueError) and "recent_size must be an integer >= 1, got 0" in str(error), repr(error)
