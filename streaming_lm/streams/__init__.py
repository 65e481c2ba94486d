"""Execution paths: how tokens are read. ``open_stream`` is the one place that picks a path.

| path | module | reads |
|---|---|---|
| token loop (``method="token"``) | token.py | one token per pass, the reference |
| chunked (``method="chunked"``) | chunked.py | ``chunk_size`` tokens per pass; decodes through decode.py |
| chunked, scored policies | scored_chunked.py | ``chunk_size`` tokens per pass, attention rows in order |
| decode | decode.py | one token per pass from preallocated slots |
| recompute (``method="recompute"``) | recompute.py | a fresh dense pass per window, no cache |
| once after the context (``evict_every=context``) | context.py | the prefill densely, one event, then the rest |
| dense baseline (``settings=None``) | dense.py | transformers' own cache, nothing evicted |
"""

from __future__ import annotations

from ..methods import policy_class
from ..methods.base import INDEX
from ..rotary import RotaryShift
from ..settings import StreamingSettings
from .base import Stream
from .chunked import ChunkedStream
from .context import ContextStream
from .decode import DecodeStream
from .dense import DenseStream
from .recompute import RecomputeStream
from .scored_chunked import ScoredChunkedStream
from .token import TokenStream

PATHS = {"token": TokenStream, "chunked": ChunkedStream, "recompute": RecomputeStream}


def open_stream(model, settings: StreamingSettings | None, shift: RotaryShift | None = None,
                batch_size: int = 1, policy=None) -> Stream:
    """An empty stream on the path ``settings.method`` names; the dense baseline for ``settings=None``.

    ``batch_size``: passes run together where the path can (recompute windows); the cache paths read one
    token stream at a time and ignore it. ``policy``: the settings' method bound to the model (``engine.Engine``
    binds it once); bound afresh when None.
    """
    if settings is None:
        return DenseStream(model)
    if settings.context_regime:
        return ContextStream(model, settings, shift, batch_size, policy)
    path = PATHS[settings.method]
    if path is ChunkedStream and (policy or policy_class(settings.policy)).kind != INDEX:
        path = ScoredChunkedStream  # scored methods (and heads holding different tokens) decide row by row
    return path(model, settings, shift, batch_size, policy)


def uses_batch_size(settings: StreamingSettings) -> bool:
    """Whether ``batch_size`` changes how the settings' path runs (it never changes a number)."""
    return not settings.context_regime and PATHS[settings.method].uses_batch_size


__all__ = ["Stream", "open_stream", "uses_batch_size", "TokenStream", "ChunkedStream", "DecodeStream", "RecomputeStream",
           "ScoredChunkedStream", "DenseStream", "ContextStream", "PATHS"]
