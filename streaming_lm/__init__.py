"""KV-cache eviction (StreamingLLM's sink+window, and a policy interface for more) evaluated exactly in
lm-evaluation-harness.

Kept import-light (it is imported at interpreter start by the ``.pth`` hook): the
heavy names are resolved on first use.
"""

__version__ = "0.1.0"

_LAZY = {
    "StreamingHFLM": "streaming_lm.lm_eval_model",
    "StreamingSettings": "streaming_lm.settings",
    "EvictingDynamicCache": "streaming_lm.storage",
    "open_stream": "streaming_lm.streams",
    "score": "streaming_lm.rolling",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'streaming_lm' has no attribute {name!r}")
