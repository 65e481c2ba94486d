"""Tiny lm-eval tasks over local JSONL files, for the tests that run lm-eval end to end."""

from __future__ import annotations

import json
from pathlib import Path

# What every local task shares: a JSONL file as its test split.
HEADER = """\
task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
"""

ROLLING_YAML = HEADER + """\
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - metric: word_perplexity
  - metric: byte_perplexity
  - metric: bits_per_byte
metadata:
  version: 1.0
"""

MC_YAML = HEADER + """\
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: choices
doc_to_target: answer
metric_list:
  - metric: acc
  - metric: acc_norm
metadata:
  version: 1.0
"""


def write_task(root: Path, name: str, yaml: str, docs: list[dict]) -> Path:
    """``docs`` as ``root/name.jsonl`` and the task ``name`` as ``root/name.yaml`` (``yaml`` a template above)."""
    data = root / f"{name}.jsonl"
    data.write_text("".join(json.dumps(doc) + "\n" for doc in docs))
    (root / f"{name}.yaml").write_text(yaml.format(name=name, data=data))
    return root


def read_docs(root: Path, name: str) -> list[dict]:
    """The documents ``write_task`` wrote for task ``name``."""
    return [json.loads(line) for line in (root / f"{name}.jsonl").read_text().splitlines()]
