"""The installed command lines in subprocesses: lm_eval finds streaming_hf, hf still works."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers.engine import token_loop_word_perplexity
from helpers.local_tasks import ROLLING_YAML, read_docs, write_task

from streaming_lm import StreamingHFLM



@pytest.fixture(scope="module")
def task_dir(tmp_path_factory, excerpt_text):
    root = tmp_path_factory.mktemp("tasks")
    lines = [line for line in excerpt_text.splitlines() if line.strip()][:3]
    docs = [{"text": "\n".join(lines[:2])[:400]}, {"text": lines[2][:300]}]
    return write_task(root, "tiny_rolling", ROLLING_YAML, docs)


def run_cli(command, tmp_path, model, model_args, task_dir, tasks="tiny_rolling"):
    out = tmp_path / f"out-{model}"
    env = os.environ | {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    args = [*command, "--model", model, "--model_args", model_args, "--tasks", tasks,
            "--include_path", str(task_dir), "--device", "cpu", "--output_path", str(out)]
    proc = subprocess.run(args, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    (result_file,) = out.rglob("results_*.json")
    return json.loads(result_file.read_text()), proc


LM_EVAL = [str(Path(sys.executable).with_name("lm_eval"))]
PYTHON_M = [sys.executable, "-m", "streaming_lm"]


@pytest.mark.slow
@pytest.mark.parametrize("command", [LM_EVAL, PYTHON_M], ids=["lm_eval", "python -m streaming_lm"])
def test_cli_streaming_and_dense(command, tmp_path, tiny_dir, task_dir):
    common = f"pretrained={tiny_dir},dtype=float32"
    streaming, proc = run_cli(command, tmp_path, "streaming_hf", f"{common},start_size=4,recent_size=60", task_dir)
    dense, _ = run_cli(command, tmp_path, "hf", common, task_dir)
    config = streaming["config"]["streaming"]
    assert (config["start_size"], config["recent_size"], config["positions"]) == (4, 60, "shifted")
    assert config["evicted_tokens"] > 0
    assert "tokens evicted" in proc.stderr
    got = streaming["results"]["tiny_rolling"]["word_perplexity,none"]
    assert got != pytest.approx(dense["results"]["tiny_rolling"]["word_perplexity,none"], rel=1e-6)
    # ... and it is the engine's token loop on each document's stream, as lm-eval aggregates it.
    lm = StreamingHFLM(pretrained=str(tiny_dir), device="cpu", dtype="float32", start_size=4, recent_size=60)
    texts = [doc["text"] for doc in read_docs(task_dir, "tiny_rolling")]
    assert got == pytest.approx(token_loop_word_perplexity(lm, texts), rel=1e-5)


@pytest.mark.slow
def test_cli_short_documents_equal_dense(tmp_path, tiny_dir, task_dir):
    common = f"pretrained={tiny_dir},dtype=float32"
    streaming, _ = run_cli(LM_EVAL, tmp_path, "streaming_hf", f"{common},start_size=4,recent_size=1020", task_dir)
    dense, _ = run_cli(LM_EVAL, tmp_path, "hf", common, task_dir)
    for metric in ("word_perplexity,none", "byte_perplexity,none", "bits_per_byte,none"):
        got, expected = streaming["results"]["tiny_rolling"][metric], dense["results"]["tiny_rolling"][metric]
        assert got == pytest.approx(expected, rel=1e-4)


@pytest.mark.slow
def test_cli_bad_argument_names_it(tmp_path, tiny_dir, task_dir):
    env = os.environ | {"HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [*LM_EVAL, "--model", "streaming_hf", "--model_args", f"pretrained={tiny_dir},recent_size=0",
         "--tasks", "tiny_rolling", "--include_path", str(task_dir)],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300,
    )
    assert proc.returncode != 0
    assert "recent_size must be an integer >= 1" in proc.stderr
