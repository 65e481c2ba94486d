"""The KV-cache compression methods, one module each, and their one registry (``POLICIES``, the names the ``policy``
knob takes). No torch at import: settings.py reads the registry before any model loads.

A method's module holds its class (name, parameters with defaults and checks, paper link, what its events read) and
its math; ``base.py`` the kinds of method, ``budgets.py`` the budgets by layer and by head, ``ties.py`` the tie rule,
``event.py`` the one event rule every path hands its observation to. Adding a method: a module here, its line below
(docs/policies.md "Adding a method").
"""

from __future__ import annotations

import importlib

from .base import OBSERVATIONS, EvictionPolicy, HeadIndexPolicy, Policy, ScoredPolicy
from .compactor import Compactor
from .cur import CUR
from .duo import Duo
from .expected_attention import ExpectedAttention
from .h2o import H2O
from .keydiff import KeyDiff
from .knorm import KeyNorm
from .kvzip import KVzip
from .lagkv import LagKV
from .leverage import Leverage
from .observed_attention import ObservedAttention
from .qfilter import QFilter
from .params import Param
from .random import Random
from .sink_window import SinkWindow
from .snapkv import SnapKV
from .tova import TOVA
from .wrappers import WRAPPER_PARAMS, output_projections

POLICIES: dict[str, type[Policy]] = {cls.name: cls for cls in (SinkWindow, TOVA, H2O, KeyNorm, SnapKV,
                                                               ExpectedAttention, Duo, Random, KeyDiff, LagKV,
                                                               ObservedAttention, CUR, Leverage, Compactor,
                                                               KVzip, QFilter)}


def policy_class(name: str) -> type[Policy]:
    """The class a ``policy`` knob names: a built-in, or ``package.module:Class`` (a ``ScoredPolicy``).

    Called before any model loads, so a bad plug-in fails first."""
    if name in POLICIES:
        return POLICIES[name]
    module_name, _, class_name = name.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise ValueError(f"policy={name}: cannot import module {module_name!r} ({error})") from None
    cls = getattr(module, class_name, None)
    if cls is None:
        raise ValueError(f"policy={name}: module {module_name!r} has no attribute {class_name!r}")
    if not (isinstance(cls, type) and issubclass(cls, ScoredPolicy)) or cls.score is ScoredPolicy.score:
        raise ValueError(
            f"policy={name}: {class_name} must subclass streaming_lm.methods.ScoredPolicy and implement "
            "score(keys, values, attention) (see docs/policies.md)"
        )
    return cls


def policy_for(settings, model=None, shift=None, tokenizer=None) -> Policy:
    """The method the settings name, with its parameters; bound to ``model`` (and its rotary ``shift``) when given,
    and to ``tokenizer`` where the method builds a prompt (KVzip). An engine binds it once per model and settings
    (``engine.Engine``)."""
    policy = policy_class(settings.policy)(settings)
    if policy.needs_tokenizer and model is not None:
        if tokenizer is None:
            raise ValueError(f"policy={settings.policy} reads a prompt of its own (its replay) and needs the model's "
                             f"tokenizer: Engine(model, settings, tokenizer)")
        policy.bind_tokenizer(tokenizer)
    if model is not None:
        policy.bind(model, shift)
        if getattr(policy, "critical", False):  # CriticalKV reads each layer's output projection
            policy.output_projections = output_projections(model)
    return policy


__all__ = ["POLICIES", "OBSERVATIONS", "Param", "Policy", "EvictionPolicy", "HeadIndexPolicy", "ScoredPolicy",
           "policy_class", "policy_for", "SinkWindow", "TOVA", "H2O", "KeyNorm", "SnapKV", "ExpectedAttention", "Duo",
           "Random", "KeyDiff", "LagKV", "ObservedAttention", "CUR", "Leverage", "Compactor", "KVzip", "QFilter"]
