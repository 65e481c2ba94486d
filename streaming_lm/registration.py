"""Registering ``streaming_hf`` in lm-eval's model registry, lazily."""

from __future__ import annotations

MODEL_NAME = "streaming_hf"
TARGET = "streaming_lm.lm_eval_model:StreamingHFLM"


def register() -> None:
    """Add the lazy placeholder; importing nothing heavier than lm-eval's registry."""
    # lm-eval fills its registry with its own models only when it is empty: fill it first,
    # or registering ours would hide ``hf`` and every other built-in model.
    import lm_eval.models  # noqa: F401
    from lm_eval.api.registry import model_registry

    if MODEL_NAME not in model_registry:
        model_registry.register(MODEL_NAME, target=TARGET)
