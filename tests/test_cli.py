"""The installed command lines in subprocesses: lm_eval finds streaming_hf, hf still works.

Each subprocess pays the imports and a model load, so the runs are shared: one dense ``hf`` run and one
``streaming_hf`` run per command line, each over two tasks (documents longer than C + 1 tokens, which evict,
and documents no longer than C + 1, which must give the dense numbers).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers.engine import token_loop_word_perplexity
from helpers.local_tasks import ROLLING_YAML, read_docs, write_task

from streaming_lm import StreamingHFLM

START, RECENT = 4, 60  # C = 64: the byte tokenizer makes one token per byte, plus the prefix token
TASKS = "tiny_rolling,tiny_short"
LM_EVAL = [str(Path(sys.executable).with_name("lm_eval"))]
PYTHON_M = [sys.executable, "-m", "streaming_lm"]
ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory, excerpt_text):
    root = tmp_path_factory.mktemp("tasks")
    lines = [line for line in excerpt_text.splitlines() if line.strip()][:5]
    write_task(root, "tiny_rolling", ROLLING_YAML, [{"text": "\n".join(lines[:2])[:400]}, {"text": lines[2][:300]}])
    short = [{"text": lines[3][:START + RECENT - 1]}, {"text": lines[4][:40]}]
    assert all(len(doc["text"].encode()) + 1 <= START + RECENT + 1 for doc in short)  # nothing to evict
    return write_task(root, "tiny_short", ROLLING_YAML, short)


def run_cli(command, out, model, model_args, task_dir):
    args = [*command, "--model", model, "--model_args", model_args, "--tasks", TASKS,
            "--include_path", str(task_dir), "--device", "cpu", "--output_path", str(out)]
    proc = subprocess.run(args, capture_output=True, text=True, env=os.environ | ENV, cwd=out.parent, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    (result_file,) = out.rglob("results_*.json")
    return json.loads(result_file.read_text()), proc


@pytest.fixture(scope="module")
def dense(tmp_path_factory, tiny_dir, task_dir):
    return run_cli(LM_EVAL, tmp_path_factory.mktemp("dense") / "out", "hf", f"pretrained={tiny_dir},dtype=float32",
                   task_dir)[0]


@pytest.fixture(scope="module")
def streamed(tmp_path_factory, tiny_dir, task_dir):
    """``streaming_hf`` through a command line, run once per command."""
    done = {}

    def run(command):
        key = tuple(command)
        if key not in done:
            args = f"pretrained={tiny_dir},dtype=float32,start_size={START},recent_size={RECENT}"
            done[key] = run_cli(command, tmp_path_factory.mktemp("streaming") / "out", "streaming_hf", args, task_dir)
        return done[key]
    return run


@pytest.mark.slow
@pytest.mark.parametrize("command", [LM_EVAL, PYTHON_M], ids=["lm_eval", "python -m streaming_lm"])
def test_cli_streaming_and_dense(command, streamed, dense, tiny_dir, task_dir):
    streaming, proc = streamed(command)
    config = streaming["config"]["streaming"]
    assert (config["start_size"], config["recent_size"], config["positions"]) == (START, RECENT, "shifted")
    assert config["evicted_tokens"] > 0
    assert "tokens evicted" in proc.stderr
    got = streaming["results"]["tiny_rolling"]["word_perplexity,none"]
    assert got != pytest.approx(dense["results"]["tiny_rolling"]["word_perplexity,none"], rel=1e-6)
    # ... and it is the engine's token loop on each document's stream, as lm-eval aggregates it.
    lm = StreamingHFLM(pretrained=str(tiny_dir), device="cpu", dtype="float32", start_size=START, recent_size=RECENT)
    texts = [doc["text"] for doc in read_docs(task_dir, "tiny_rolling")]
    assert got == pytest.approx(token_loop_word_perplexity(lm, texts), rel=1e-5)


@pytest.mark.slow
def test_cli_short_documents_equal_dense(streamed, dense):
    streaming, _ = streamed(LM_EVAL)
    for metric in ("word_perplexity,none", "byte_perplexity,none", "bits_per_byte,none"):
        got, expected = streaming["results"]["tiny_short"][metric], dense["results"]["tiny_short"][metric]
        assert got == pytest.approx(expected, rel=1e-4)


@pytest.mark.slow
def test_cli_bad_argument_names_it(tmp_path, tiny_dir, task_dir):
    proc = subprocess.run(
        [*LM_EVAL, "--model", "streaming_hf", "--model_args", f"pretrained={tiny_dir},recent_size=0",
         "--tasks", "tiny_rolling", "--include_path", str(task_dir)],
        capture_output=True, text=True, env=os.environ | ENV, cwd=tmp_path, timeout=300,
    )
    assert proc.returncode != 0
    assert "recent_size must be an integer >= 1" in proc.stderr
