"""DuoAttention: retrieval heads hold everything, streaming heads only sinks and a recent window.

Xiao et al., *DuoAttention: Efficient Long-Context LLM Inference with Retrieval and Streaming Heads*, 2024,
https://arxiv.org/abs/2410.10819. A pattern is a folder in DuoAttention's format (its ``attn_patterns/``):
``config.json`` with ``sink_size`` and ``recent_size``, and ``full_attention_heads.tsv``, one row per layer
and one tab-separated column per key/value head (the learned gate, clipped to [0, 1]).
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

from ..values import as_count, as_fraction
from .base import HeadIndexPolicy, Param
from .lazy_torch import torch


def _check_pattern(value: str) -> None:
    if value:  # the folder's format, before any model loads (its shape is checked against the model in bind)
        load_duo_pattern(value)


class Duo(HeadIndexPolicy):
    """DuoAttention: the ``round(h · layers · heads)`` key/value heads of lowest pattern score are *streaming
    heads*, holding the first ``sink_size`` and the last ``recent_size`` tokens (the pattern's); every other head
    holds everything (docs/methods.md). Sizes come from the pattern, not from ``C``.

    Xiao et al., *DuoAttention: Efficient Long-Context LLM Inference with Retrieval and Streaming Heads*, 2024,
    https://arxiv.org/abs/2410.10819
    """

    name = "duo"
    params = (Param("pattern", str, "", "a folder in DuoAttention's format (config.json with sink_size and "
                    "recent_size; full_attention_heads.tsv, one row per layer, one column per key/value head)",
                    check=_check_pattern),
              Param("head_compression_ratio", float, 0.5, "the fraction of (layer, key/value head) pairs that stream",
                    minimum=0.0, check=lambda value: as_fraction("head_compression_ratio", value)))

    @classmethod
    def check_settings(cls, settings) -> None:
        if not settings.policy_params["pattern"]:
            raise ValueError(f"policy=duo needs pattern=<folder>: {FORMAT}. No pattern ships with a model no one "
                             f"measured; DuoAttention publishes patterns for the models it trained")
        if settings.compression_ratio is not None:
            raise ValueError("policy=duo sizes its heads by the pattern and head_compression_ratio; compression_ratio "
                             f"does not apply (got compression_ratio={settings.compression_ratio})")

    def bind(self, model, shift) -> None:
        from ..forward_args import num_decoder_layers, num_key_value_heads

        pattern = load_duo_pattern(self.pattern, num_decoder_layers(model), num_key_value_heads(model))
        self.sink_size, self.recent_size = pattern.sink_size, pattern.recent_size
        self.streaming = streaming_heads(pattern.head_scores, self.head_compression_ratio)

    def event_keep(self, layer, alive, budget):
        """A streaming head keeps its first ``sink_size`` and last ``recent_size`` held tokens, a retrieval head
        everything (the budget is the pattern's, not the settings')."""
        return duo_held_keep(alive, self.streaming[layer], self.sink_size, self.recent_size)


FORMAT = ("a folder with config.json (integers sink_size >= 0, recent_size >= 1) and full_attention_heads.tsv "
          "(one row per layer, one tab-separated number per key/value head), as DuoAttention's attn_patterns/")


@dataclasses.dataclass(frozen=True)
class DuoPattern:
    sink_size: int
    recent_size: int
    head_scores: torch.Tensor  # float64 [layers, kv_heads], clipped to [0, 1]


def _bad(folder, why: str) -> ValueError:
    return ValueError(f"pattern={folder}: {why}; expected {FORMAT}")


def load_duo_pattern(folder, layers: int | None = None, kv_heads: int | None = None) -> DuoPattern:
    """Read a DuoAttention pattern folder; with ``layers``/``kv_heads`` (the model's), check its shape."""
    root = Path(folder)
    if not root.is_dir():
        raise _bad(folder, "no such folder")
    try:
        config = json.loads((root / "config.json").read_text())
        text = (root / "full_attention_heads.tsv").read_text()
    except (OSError, json.JSONDecodeError) as error:
        raise _bad(folder, f"cannot read it ({error})") from None
    sizes = {}
    for key, minimum in (("sink_size", 0), ("recent_size", 1)):
        value = config.get(key) if isinstance(config, dict) else None
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise _bad(folder, f"config.json {key} must be an integer >= {minimum}, got {value!r}")
        sizes[key] = value
    try:
        rows = [[float(cell) for cell in line.split("\t")] for line in text.splitlines() if line.strip()]
    except ValueError as error:
        raise _bad(folder, f"full_attention_heads.tsv holds a non-number ({error})") from None
    if not rows or len({len(row) for row in rows}) != 1 or not all(map(math.isfinite, sum(rows, []))):
        raise _bad(folder, "full_attention_heads.tsv must be a non-empty table of finite numbers, every row "
                           "as long")
    scores = torch.tensor(rows, dtype=torch.float64).clamp(0, 1)
    expected = (layers, kv_heads)
    if any(e is not None and e != a for e, a in zip(expected, scores.shape)):
        raise ValueError(f"pattern={folder}: full_attention_heads.tsv is {tuple(scores.shape)} (layers, key/value "
                         f"heads) but the model has {expected}: a pattern belongs to the model it was trained on")
    return DuoPattern(sizes["sink_size"], sizes["recent_size"], scores)


def streaming_heads(head_scores: torch.Tensor, head_compression_ratio: float) -> torch.Tensor:
    """bool [layers, kv_heads]: the ``round(h·layers·kv_heads)`` lowest-scored (layer, head) pairs.

    Equal scores: the earlier pair in row-major order (lower layer, then lower head) becomes streaming first.
    """
    h = as_fraction("head_compression_ratio", head_compression_ratio)
    count = round(head_scores.numel() * h)
    mask = torch.zeros(head_scores.numel(), dtype=torch.bool)
    mask[torch.sort(head_scores.flatten(), stable=True).indices[:count]] = True
    return mask.reshape(head_scores.shape)


def duo_keep(n: int, streaming: torch.Tensor, sink_size: int, recent_size: int) -> torch.Tensor:
    """bool [kv_heads, n]: a streaming head (``streaming`` bool [kv_heads], one layer's) keeps the first
    ``sink_size`` and the last ``recent_size`` of its ``n`` held tokens; every other head keeps all."""
    as_count("n", n, 0)
    return duo_held_keep(torch.ones((streaming.numel(), n), dtype=torch.bool), streaming, sink_size, recent_size)


def duo_held_keep(alive: torch.Tensor, streaming: torch.Tensor, sink_size: int, recent_size: int) -> torch.Tensor:
    """``duo_keep`` when heads hold different tokens: of the columns ``alive`` marks (bool [kv_heads, K], each head's
    held tokens in token order), a streaming head keeps its first ``sink_size`` and last ``recent_size``."""
    rank = alive.long().cumsum(1) - 1  # a column's place among its head's held tokens
    window = (rank < sink_size) | (rank >= alive.sum(1, keepdim=True) - recent_size)
    return alive & (window | ~streaming.bool().to(alive.device)[:, None])
