"""``torch`` for the modules of this package, imported when first used: the registry is read (settings.py) before any
model loads, in milliseconds, so no method module imports torch at import time."""

from __future__ import annotations

import importlib


class _OnFirstUse:
    """A module imported when one of its attributes is first read (then kept on this object: later reads are plain
    attribute reads)."""

    def __init__(self, name: str):
        self._name = name

    def __getattr__(self, attr: str):
        value = getattr(importlib.import_module(self._name), attr)
        setattr(self, attr, value)
        return value


torch = _OnFirstUse("torch")
F = _OnFirstUse("torch.nn.functional")
