"""Q-Filter: keep the keys most aligned with a learned per-head filter (kvpress's ``QFilterPress``), read from a local
file instead of the Hub.

Godey et al., *Q-Filters: Leveraging QK Geometry for Efficient KV Cache Compression*, 2025,
https://arxiv.org/abs/2503.02812
"""

from __future__ import annotations

from pathlib import Path

from .base import ScoredPolicy
from .lazy_torch import torch
from .params import Param

FORMAT = ("a Q-Filters checkpoint: a folder with model.safetensors (as the Hub's nthngdy/<model>_qfilt holds it) or "
          "a .safetensors file, whose tensor q_filters is [layers, key/value heads, head_dim]")


def filters_file(value: str) -> Path:
    """The safetensors file ``filters`` names (a folder's ``model.safetensors``); ValueError naming ``filters``."""
    path = Path(value).expanduser()
    if path.is_dir():
        path = path / "model.safetensors"
    if not path.is_file() or path.suffix != ".safetensors":
        raise ValueError(f"filters={value}: no such file; expected {FORMAT}")
    return path


def load_filters(value: str, layers: int, kv_heads: int, head_dim: int) -> torch.Tensor:
    """float32 [layers, kv_heads, head_dim]: the checkpoint's ``q_filters``, its shape checked against the model's."""
    from safetensors.torch import load_file

    tensors = load_file(str(filters_file(value)))
    if "q_filters" not in tensors:
        raise ValueError(f"filters={value}: no tensor q_filters (it has {', '.join(sorted(tensors))}); expected "
                         f"{FORMAT}")
    found = tuple(tensors["q_filters"].shape)
    if found != (layers, kv_heads, head_dim):
        raise ValueError(f"filters={value}: q_filters is {found} (layers, key/value heads, head_dim) but the model has "
                         f"{(layers, kv_heads, head_dim)}: filters are trained for one model")
    return tensors["q_filters"].float()


class QFilter(ScoredPolicy):
    """Q-Filter (kvpress's ``QFilterPress``): a held key's score is its dot product with its layer's and key/value
    head's learned filter, negated (``-(f · k)``, the key as cached, after RoPE). The filters are a local checkpoint
    (``filters``; kvpress downloads ``nthngdy/<model>_qfilt`` from the Hub: download it once, pass its folder).

    Godey et al., *Q-Filters: Leveraging QK Geometry for Efficient KV Cache Compression*, 2025,
    https://arxiv.org/abs/2503.02812
    """

    name = "qfilter"
    reaches_budget = True
    params = (Param("filters", str, "", FORMAT, check=lambda value: filters_file(value) if value else None),)
    paths = {"token": ("original",), "chunked": ("original",)}  # keys at their text positions (RoPE moves the score)
    observes = frozenset({"layer"})
    per_token = True

    @classmethod
    def check_settings(cls, settings) -> None:
        if not settings.policy_params["filters"]:
            raise ValueError(f"policy=qfilter needs filters=<path>: {FORMAT}")

    def bind(self, model, shift) -> None:
        from ..forward_args import head_dim, num_decoder_layers, num_key_value_heads

        self.filters = load_filters(self.filters, num_decoder_layers(model), num_key_value_heads(model), head_dim(model))

    def score(self, keys, values, attention, layer):
        if self.filters.device != keys.device:
            self.filters = self.filters.to(keys.device)
        return -(keys.float() * self.filters[layer][:, None, :]).sum(dim=-1)
