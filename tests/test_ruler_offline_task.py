"""Tests of tasks/ruler_offline: lm-eval's RULER generators, offline, seeded, scored (tiny word tokenizer)."""

import importlib.util
import random
import re
from pathlib import Path

import lm_eval
import numpy as np
import pytest
import transformers
import yaml
from lm_eval.tasks import TaskManager

from helpers.models import streaming, tiny_llama

TASK_DIR = Path(__file__).resolve().parents[1] / "tasks" / "ruler_offline"
FAST = ["ruler_offline_vt", "ruler_offline_cwe", "ruler_offline_fwe"]
# Importing lm-eval's NIAH generator builds a 6M-word key list (about 15 s on one core): slow tests only.
NIAH = ["ruler_offline_niah_single_1", "ruler_offline_niah_multikey_2", "ruler_offline_niah_multikey_3"]


@pytest.fixture(scope="module")
def word_tokenizer_dir(tmp_path_factory) -> Path:
    """One token per word or punctuation run, about as many tokens per character as a real tokenizer
    (the byte tokenizer would make lm-eval's vt generator, whose example is sized to 500 tokens, loop)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = ["<unk>", "<s>", "</s>", *"0123456789", "VAR", "=", ".", "Answer", ":"]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>",
                                                     unk_token="<unk>")
    out = tmp_path_factory.mktemp("word_tokenizer")
    tokenizer.save_pretrained(out)
    return out


def load(name, **metadata):
    tm = TaskManager(include_path=str(TASK_DIR.parent), include_defaults=False, metadata=metadata)
    return tm.load([name])["tasks"][name]


def docs(name, tokenizer_dir, **metadata):
    return list(load(name, tokenizer=str(tokenizer_dir), num_samples=3, **metadata).test_docs())


def utils():
    spec = importlib.util.spec_from_file_location("ruler_offline_utils", TASK_DIR / "utils.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def check_docs(got, tokenizer_dir, max_seq_length, fwe=False):
    tokenizer = transformers.AutoTokenizer.from_pretrained(tokenizer_dir)
    assert len(got) == 3
    for doc in got:
        assert doc["outputs"] and all(answer in doc["input"] for answer in doc["outputs"])  # the needles are there
        prompt = len(tokenizer(doc["input"]).input_ids)
        # `length` is the generators' count, prompt plus answer budget; fwe (as RULER) sizes its prompt alone
        assert doc["max_length"] == max_seq_length and max_seq_length // 2 < prompt < doc["length"]
        assert doc["length"] <= max_seq_length or (fwe and prompt <= max_seq_length)


@pytest.mark.parametrize("name", FAST)
def test_documents_offline_seeded(name, word_tokenizer_dir):
    got = docs(name, word_tokenizer_dir, max_seq_length=1024)
    check_docs(got, word_tokenizer_dir, 1024, fwe=name == "ruler_offline_fwe")
    assert docs(name, word_tokenizer_dir, max_seq_length=1024) == got  # same options, same documents
    assert docs(name, word_tokenizer_dir, max_seq_length=1024, seed=1)[0]["input"] != got[0]["input"]


@pytest.mark.slow
@pytest.mark.parametrize("name", NIAH)
def test_niah_documents_offline(name, word_tokenizer_dir):
    got = docs(name, word_tokenizer_dir, max_seq_length=1024)
    check_docs(got, word_tokenizer_dir, 1024)
    assert docs(name, word_tokenizer_dir, max_seq_length=1024) == got
    for doc in got:
        answer = doc["outputs"][0]
        # the needle sentence with its key, and the question about that key
        key = re.search(r"special magic \w+ for (\S+) mentioned", doc["gen_prefix"]).group(1)
        assert f"for {key} is: {answer}." in doc["input"]


def test_global_random_state_is_put_back(word_tokenizer_dir):
    cwe = utils().cwe
    cwe(tokenizer=str(word_tokenizer_dir), num_samples=1)  # imports lm-eval's modules, whose import draws
    state, numpy_state = random.getstate(), np.random.get_state()[1].copy()
    first = cwe(tokenizer=str(word_tokenizer_dir), num_samples=1)  # global random, numpy and cwe's own RNG
    assert random.getstate() == state and (np.random.get_state()[1] == numpy_state).all()
    assert cwe(tokenizer=str(word_tokenizer_dir), num_samples=1)["test"][0] == first["test"][0]


def test_group_lists_every_task():
    group = yaml.safe_load((TASK_DIR / "ruler_offline.yaml").read_text())
    assert sorted(group["task"]) == sorted(FAST + NIAH) == sorted(p.stem for p in TASK_DIR.glob("ruler_offline_*.yaml"))


@pytest.mark.parametrize("metadata, message", [
    ({"max_seq_length": 512}, "max_seq_length must be an integer >= 1024 (--metadata), got 512"),
    ({"num_samples": "none"}, "num_samples must be an integer >= 1 (--metadata), got 'none'"),
    ({"max_seq_lengths": [4096]}, "take one max_seq_length (--metadata), not lm-eval's max_seq_lengths"),
])
def test_bad_metadata_names_the_key(metadata, message, word_tokenizer_dir):
    with pytest.raises(ValueError, match=re.escape(message)):
        load("ruler_offline_vt", tokenizer=str(word_tokenizer_dir), **metadata)


def test_needs_a_tokenizer():
    with pytest.raises(ValueError, match="size their prompts in tokens: give --model_args pretrained="):
        load("ruler_offline_fwe")


def test_string_match_all():
    u = utils()
    doc = {"outputs": ["ABCDE", "FGHIJ"]}
    assert u.process_results(doc, [" abcde and FGHIJ\n"]) == {"string_match_all": 1.0}
    assert u.process_results(doc, ["ABCDE"]) == {"string_match_all": 0.5}


@pytest.mark.usefixtures("one_thread")
def test_e2e_streaming_hf(word_tokenizer_dir):
    tokenizer = transformers.AutoTokenizer.from_pretrained(word_tokenizer_dir)
    model = tiny_llama(vocab_size=len(tokenizer))
    tm = TaskManager(include_path=str(TASK_DIR.parent), include_defaults=False,
                     metadata={"tokenizer": str(word_tokenizer_dir), "num_samples": 2})
    lm = streaming((model, tokenizer), start_size=4, recent_size=60)
    out = lm_eval.simple_evaluate(model=lm, tasks=["ruler_offline_vt"], task_manager=tm, bootstrap_iters=0,
                                  log_samples=True)
    assert out["n-samples"]["ruler_offline_vt"]["effective"] == 2
    assert lm._evicted > 2 * (700 - 64)  # every context (700+ tokens) streamed through the 64-token cache
    assert 0 <= out["results"]["ruler_offline_vt"]["string_match_all,none"] <= 1
    sample = out["samples"]["ruler_offline_vt"][0]
    assert sample["arguments"][0][0].endswith(sample["doc"]["gen_prefix"])  # RULER's answer prefix ends the context
