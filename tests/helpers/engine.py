"""Shortcuts to the engine's paths for tests: the token loop (the reference) and the chunked path."""

from __future__ import annotations

import dataclasses

from streaming_lm.scoring import score
from streaming_lm.settings import StreamingSettings


def score_stream(model, ids, settings: StreamingSettings, shift):
    """The token loop (one token per pass), whatever method the settings name."""
    return score(model, ids, dataclasses.replace(settings, method="token", stride=None), shift)


def score_stream_chunked(model, ids, settings: StreamingSettings, shift, chunk_size: int):
    """The chunked path with ``chunk_size`` tokens per pass."""
    return score(model, ids, dataclasses.replace(settings, method="chunked", chunk_size=chunk_size, stride=None), shift)
