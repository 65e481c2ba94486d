"""lm-eval's data-parallel mode: ``accelerate launch`` with 2 CPU processes gives one process's results.

On CPU, ``accelerate launch --cpu --num_processes 2`` starts ONE process (accelerate 1.x leaves
multi-CPU to ``mpirun``, which needs ``--mpirun_hostfile`` and an MPI build). Two processes come from
the torchrun launcher (``--multi_gpu``) with ``ACCELERATE_USE_CPU=1``, which makes the Accelerator
use gloo on CPU. lm-eval's ``HFLM`` splits requests only with 2+ GPUs; ``StreamingHFLM`` takes the
ranks from the Accelerator, so each process scores its own share (checked below from the logs).
The one-process reference is lm-eval run in this process (a launcher and a second interpreter would add
nothing to one process's numbers).
"""

import json
import os
import re
import subprocess
import sys

import pytest
from helpers.local_tasks import MC_YAML, ROLLING_YAML, write_task
import lm_eval
from lm_eval.models.huggingface import HFLM
from lm_eval.tasks import TaskManager
from helpers.requests import rolling
from helpers.engine import token_loop_loglikelihood

from streaming_lm import StreamingHFLM

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: threads only cost


START, RECENT = 4, 60  # C = 64 tokens; the byte tokenizer makes one token per byte
COMMON_ENV = {
    "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
    "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1", "CUDA_VISIBLE_DEVICES": "",
}
LAUNCH = [sys.executable, "-m", "accelerate.commands.launch", "--num_machines", "1",
          "--mixed_precision", "no", "--dynamo_backend", "no"]
TWO_PROCESSES = [*LAUNCH, "--multi_gpu", "--num_processes", "2", "--main_process_port", "0"]


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory, excerpt_text):
    root = tmp_path_factory.mktemp("mp_tasks")
    text = " ".join(excerpt_text.split())
    piece = lambda start, n: text[start : start + n].strip()  # noqa: E731
    # Six documents (even: no rank gets lm-eval's padding requests), four longer than C + 1 tokens.
    rolling = [{"text": piece(a, n)} for a, n in ((0, 300), (300, 40), (400, 250), (700, 200), (950, 30), (1000, 180))]
    mc = [{"question": piece(1200 + 130 * i, 120) + " Is that so?", "choices": [" yes", " no", " maybe"],
           "answer": i % 3} for i in range(4)]
    write_task(root, "mp_rolling", ROLLING_YAML, rolling)
    write_task(root, "mp_mc", MC_YAML, mc)
    return root, rolling


def run(launcher, tiny_dir, task_dir, out):
    args = [*launcher, "-m", "lm_eval", "--model", "streaming_hf",
            "--model_args", f"pretrained={tiny_dir},dtype=float32,start_size={START},recent_size={RECENT}",
            "--tasks", "mp_rolling,mp_mc", "--include_path", str(task_dir), "--device", "cpu",
            "--output_path", str(out), "--log_samples"]
    proc = subprocess.run(args, capture_output=True, text=True, env=os.environ | COMMON_ENV, cwd=out.parent,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    (results_file,) = out.rglob("results_*.json")
    samples = {}
    for path in out.rglob("samples_*.jsonl"):
        task = re.match(r"samples_(.+)_\d{4}-", path.name).group(1)
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        samples[task] = {row["doc_id"]: row["resps"] for row in rows}
    return json.loads(results_file.read_text()), samples, proc.stderr


def run_here(lm, task_dir):
    """What ``run`` returns, from lm-eval in this process (one process)."""
    tm = TaskManager(include_path=str(task_dir), include_defaults=False)
    out = lm_eval.simple_evaluate(model=lm, tasks=["mp_rolling", "mp_mc"], task_manager=tm, log_samples=True)
    samples = {task: {row["doc_id"]: row["resps"] for row in rows} for task, rows in out.pop("samples").items()}
    return json.loads(json.dumps(out, default=str)), samples


def scored_per_process(stderr):
    """Requests each process scored, from streaming_hf's log lines (one per process and request type)."""
    return [int(n) for n in re.findall(r"streaming_hf: (\d+) requests scored", stderr)]


@pytest.mark.slow
def test_two_processes_give_one_process_results(tiny_dir, task_dir, tmp_path):
    tasks, rolling_docs = task_dir
    dense = HFLM(pretrained=str(tiny_dir), device="cpu", dtype="float32")
    lm = StreamingHFLM(pretrained=dense.model, tokenizer=dense.tokenizer, start_size=START, recent_size=RECENT)
    one, one_samples = run_here(lm, tasks)
    two, two_samples, two_log = run(TWO_PROCESSES, tiny_dir, tasks, tmp_path / "two")

    # Data-parallel for real: two processes, each scored only its share of the rolling documents.
    assert re.search(r"Building contexts for mp_rolling on rank 1", two_log)
    assert sorted(scored_per_process(two_log)) == [3, 3]

    for task in ("mp_rolling", "mp_mc"):
        assert one["n-samples"][task] == two["n-samples"][task]
        metrics = {k: v for k, v in one["results"][task].items() if isinstance(v, (int, float))}
        assert metrics, one["results"][task]
        for metric, value in metrics.items():
            print(f"{task} {metric}: 1 process {value!r}, 2 processes {two['results'][task][metric]!r}")
            assert two["results"][task][metric] == pytest.approx(value, rel=1e-6), (task, metric)
        # Per document too (the samples of both ranks gathered by lm-eval on rank 0).
        assert one_samples[task].keys() == two_samples[task].keys()
        for doc_id, resps in one_samples[task].items():
            flat_one = _numbers(resps)
            flat_two = _numbers(two_samples[task][doc_id])
            assert flat_two == pytest.approx(flat_one, rel=1e-6), (task, doc_id)

    streaming_one, streaming_two = one["config"]["streaming"], two["config"]["streaming"]
    assert streaming_one["evicted_tokens"] == streaming_two["evicted_tokens"] > 0  # added up over ranks
    assert (streaming_two["start_size"], streaming_two["recent_size"]) == (START, RECENT)

    # Streams longer than C really streamed: their numbers are not the dense model's, they are the token loop's.
    long_docs = [i for i, d in enumerate(rolling_docs) if len(d["text"].encode()) + 1 > START + RECENT + 1]
    assert len(long_docs) >= 3
    dense_ll = dense.loglikelihood_rolling(rolling(*(rolling_docs[i]["text"] for i in long_docs)))
    for i, expected in zip(long_docs, dense_ll, strict=True):
        (got,) = _numbers(two_samples["mp_rolling"][i])
        assert abs(got - expected) > 0.05, i
        assert got == pytest.approx(token_loop_loglikelihood(lm, rolling_docs[i]["text"]), rel=1e-5), i


def _numbers(value):
    """Flatten a logged response ([[ll]] for rolling, [[ll, is_greedy]] per choice) to its numbers."""
    if isinstance(value, (list, tuple)):
        return [x for item in value for x in _numbers(item)]
    if value in ("True", "False"):  # lm-eval logs responses as strings
        return [float(value == "True")]
    return [float(value)]
