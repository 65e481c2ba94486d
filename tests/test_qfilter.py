"""Q-Filter (methods/qfilter.py): its filters read from a local checkpoint, refused where they do not fit the model,
and its score. Its kept sets against the definition every K tokens: tests/test_schedule.py (helpers.policies.CASES);
once after the context: tests/test_context_regime.py; kvpress 0.5.5's numbers: tests/test_context_kvpress.py."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from helpers.models import tiny_llama

from streaming_lm.methods import policy_for
from streaming_lm.settings import resolve

TINY = Path(__file__).parent / "data" / "qfilter_tiny"


@pytest.fixture(scope="module")
def model():
    return tiny_llama()


def settings(filters):
    return resolve(policy="qfilter", heavy_size=8, start_size=1, evict_every=4, policy_params={"filters": str(filters)})


@pytest.mark.parametrize("path", [TINY, TINY / "model.safetensors"], ids=["folder", "file"])
def test_the_score_is_minus_the_filter_dot_the_key(model, path):
    policy = policy_for(settings(path), model, None)
    filters = load_file(str(TINY / "model.safetensors"))["q_filters"]
    keys = torch.randn(2, 5, 16)
    for layer in (0, 1):
        expected = torch.stack([-(keys[h] @ filters[layer, h]) for h in range(2)])
        torch.testing.assert_close(policy.score(keys, None, None, layer=layer), expected)


def test_filters_of_another_shape_are_refused_when_the_model_loads(model, tmp_path):
    save_file({"q_filters": torch.zeros(3, 2, 16)}, str(tmp_path / "model.safetensors"))
    s = settings(tmp_path)  # the file exists: accepted before loading
    with pytest.raises(ValueError, match=r"filters=.*q_filters is \(3, 2, 16\).*the model has \(2, 2, 16\)"):
        policy_for(s, model, None)
    save_file({"other": torch.zeros(2, 2, 16)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match="no tensor q_filters"):
        policy_for(s, model, None)


def test_shifted_positions_are_refused():
    """The score reads the key as rotated at its position: shifting positions would change it."""
    with pytest.raises(ValueError, match="positions"):
        resolve(policy="qfilter", heavy_size=8, positions="shifted", policy_params={"filters": str(TINY)})
