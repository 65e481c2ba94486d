"""The token loop one step at a time, for tests that check what every head holds after every step."""

from __future__ import annotations

import torch

from streaming_lm.rotary import find_rotary
from streaming_lm.streams import open_stream


def stepped(model, ids: torch.Tensor, setting):
    """Log-probs of ``ids[1:]`` read one ``step`` at a time, after every step each layer's per-head counts
    ([layers][kv_heads]: heads may hold different counts, AdaKV, duo), and the stream's evicted count."""
    stream = open_stream(model, setting, find_rotary(model))
    logits, counts = [], []
    for token in ids[:-1].tolist():
        logits.append(stream.step(token))
        counts.append([layer.held_per_head().tolist() for layer in stream.cache.layers])
    return torch.log_softmax(torch.stack(logits), -1).gather(-1, ids[1:, None])[:, 0], counts, stream.evicted
