"""Keys and queries before RoPE, for the methods that score them there (Expected Attention's queries, Leverage's and
Compactor's keys): the model's one rotary embedding, bound once, and the inverse rotation from text positions; and
the module whose output is a layer's keys before RoPE, which the context path records while it reads a prefill."""

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


def before_rope(rotary, attention_scaling: float, x: torch.Tensor, index: torch.Tensor, tables=None) -> torch.Tensor:
    """``x`` [heads, s, head_dim] (queries or keys after RoPE at text positions ``index`` [s]) before RoPE: rotated
    back and its rotary scaling undone, float32. Equal to the projection's output up to float rounding. ``tables``:
    ``rotary.tables(-index)``, where the caller keeps them for several layers."""
    back = rotary.tables(-index, x.device) if tables is None else tables
    return rotary.rotate_by(x.float(), *back) / attention_scaling


def prerope_key_module(attention):
    """The submodule of an attention module whose output is its keys before RoPE, as kvpress's
    ``get_prerope_key_states`` recomputes them: ``k_norm`` where the model normalises its keys (Qwen3, Gemma 3),
    else ``k_proj``; None for a fused projection (then the keys are rotated back: ``before_rope``)."""
    for name in ("k_norm", "k_proj"):
        module = getattr(attention, name, None)
        if isinstance(module, torch.nn.Module):
            return module
    return None


def prerope_key_modules(model) -> dict[int, tuple[object, int]]:
    """{layer: (``prerope_key_module`` of its attention, its head_dim)} for every attention layer that has one."""
    found = {}
    for attention in model.modules():
        module = prerope_key_module(attention) if hasattr(attention, "layer_idx") else None
        if module is not None and isinstance(getattr(attention, "head_dim", None), int):
            found[attention.layer_idx] = (module, attention.head_dim)
    return found
