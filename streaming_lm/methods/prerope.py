"""Keys and queries before RoPE, for the methods that score them there (Expected Attention's queries, Leverage's and
Compactor's keys): the model's one rotary embedding, bound once, and the inverse rotation from text positions."""

from __future__ import annotations

from .lazy_torch import torch


def bind_rotary(name: str, model, shift) -> tuple[object, float]:
    """(the model's rotary shift, its attention scaling); ValueError naming ``policy=name`` where the model has no
    single RoPE for every layer."""
    from ..rotary import RotaryShift

    if not isinstance(shift, RotaryShift):
        raise ValueError(f"policy={name} needs one rotary embedding for every layer (RoPE); "
                         f"{type(model).__name__} has {'none' if shift is None else 'different ones by layer'}")
    scaling = {float(getattr(m, "attention_scaling")) for m in model.modules() if hasattr(m, "attention_scaling")}
    if len(scaling) > 1:
        raise ValueError(f"policy={name}: the model's rotary modules scale differently")
    return shift, scaling.pop() if scaling else 1.0


def before_rope(rotary, attention_scaling: float, x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``x`` [heads, s, head_dim] (queries or keys after RoPE at text positions ``index`` [s]) before RoPE: rotated
    back and its rotary scaling undone, float32. Equal to the projection's output up to float rounding."""
    return rotary.rotate(x.float(), -index) / attention_scaling
