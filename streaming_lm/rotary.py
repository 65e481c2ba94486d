"""Moving already-rotated keys (or queries) to another rotary position.

RoPE rotates each pair of dimensions by ``position * inv_freq``; rotations compose, so a
key stored at position p moves to p + delta by one more rotation of ``delta * inv_freq``.
The frequencies are read from the model's own rotary module, which already folds in
theta, scaling (linear, llama3, yarn, ...) and partial rotary dimensions: ``find_rotary`` discovers them
(and the pair layout, and layers without RoPE) on a loaded model.
"""

from __future__ import annotations

import inspect
import sys

import torch

HALF, INTERLEAVED = "rotate_half", "interleaved"
LAYOUTS = (HALF, INTERLEAVED)


class RotaryShift:
    """Rotates the first ``rotary_dim`` features of head vectors by a position delta.

    ``layout`` names which features form a rotated pair: ``rotate_half`` pairs ``i`` and ``i + rotary_dim/2``
    (Llama, Mistral, Qwen, Phi, Gemma, GPT-NeoX); ``interleaved`` pairs ``2i`` and ``2i + 1`` (GPT-J, Cohere,
    Helium, GLM). Pair ``i`` turns by ``inv_freq[i]`` per position in both.
    """

    def __init__(self, inv_freq: torch.Tensor, layout: str = HALF):
        if layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {', '.join(LAYOUTS)}; got {layout!r}")
        self.inv_freq = inv_freq.detach().to(torch.float64).cpu()
        self.rotary_dim = 2 * self.inv_freq.numel()
        self.layout = layout
        self._tables: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    def for_layer(self, layer_idx) -> RotaryShift:
        """One shift serves every layer."""
        return self

    def _cos_sin(self, delta: torch.Tensor, device, dtype):
        # Angles in float64: deltas are small integers, so this is exact to float32 rounding.
        angles = delta.to(torch.float64).cpu()[..., None] * self.inv_freq
        if self.layout == INTERLEAVED:
            emb = angles.repeat_interleave(2, dim=-1)
        else:
            emb = torch.cat((angles, angles), dim=-1)
        return emb.cos().to(device=device, dtype=dtype), emb.sin().to(device=device, dtype=dtype)

    def cos_sin(self, delta: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        """The float32 tables of one delta, for ``rotate_by``; memoised (the deltas in use are few and small)."""
        key = (delta, device)
        if key not in self._tables:
            self._tables[key] = self._cos_sin(torch.tensor(delta), device, torch.float32)
        return self._tables[key]

    def tables(self, delta: torch.Tensor, device) -> tuple[torch.Tensor, torch.Tensor]:
        """The float32 tables of a tensor of deltas, for ``rotate_by`` (worth keeping where several layers rotate
        by the same deltas: the chunk plan's sink queries)."""
        return self._cos_sin(delta, device, torch.float32)

    def rotate(self, x: torch.Tensor, delta) -> torch.Tensor:
        """Rotate ``x`` of shape [..., seq, head_dim] by ``delta`` positions.

        ``delta`` is an int (all positions alike) or a tensor of deltas that broadcasts against ``x``'s
        leading dimensions: one per sequence position, or one per head and position ([heads, seq]). Computed in float32 at least, returned in ``x.dtype``.
        """
        if isinstance(delta, int):
            if delta == 0:
                return x
            cos, sin = self.cos_sin(delta, x.device)
        else:
            cos, sin = self.tables(delta, x.device)
        return self.rotate_by(x, cos, sin)

    def rotate_by(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Rotate ``x`` with tables from ``cos_sin`` (or per-position tables of matching shape)."""
        work = x.to(torch.promote_types(x.dtype, torch.float32))
        rot, rest = work[..., : self.rotary_dim], work[..., self.rotary_dim :]
        if self.layout == INTERLEAVED:
            rotated_half = torch.stack((-rot[..., 1::2], rot[..., 0::2]), dim=-1).flatten(-2)
        else:
            half = self.rotary_dim // 2
            rotated_half = torch.cat((-rot[..., half:], rot[..., :half]), dim=-1)
        out = rot * cos + rotated_half * sin
        if rest.shape[-1]:
            out = torch.cat((out, rest), dim=-1)
        return out.to(x.dtype)


class LayerShifts:
    """A rotary shift per decoder layer, for models whose layers differ: local and global RoPE (Gemma 3's
    local base 10k, global 1M) or layers without RoPE (``None``: keys that carry no position never move).
    Every user asks ``for_layer(layer_idx)``; a plain ``RotaryShift`` answers itself."""

    def __init__(self, layers: list[RotaryShift | None]):
        self.layers = list(layers)
        if all(shift is None for shift in self.layers):
            raise ValueError("LayerShifts needs at least one rotary layer")

    def for_layer(self, layer_idx) -> RotaryShift | None:
        if layer_idx is None:
            raise RuntimeError("per-layer rotary shifts need the attention module's layer_idx")
        return self.layers[layer_idx]


def rotary_layout(model) -> str:
    """Which features the model rotates together, read off its own code: its rotary module's cos/sin at
    position 1, through its modeling module's ``apply_rotary_pos_emb``, turn feature 0 towards its partner.

    Falls back to ``rotate_half`` for a model without those two (no registered type is such a model; with
    ``trust_positions`` the start-up self-check would catch a wrong guess).
    """
    apply = getattr(sys.modules[type(model).__module__], "apply_rotary_pos_emb", None)
    rotary = next((module for name, module in model.named_modules() if name.endswith("rotary_emb")), None)
    params = list(inspect.signature(apply).parameters)[:4] if apply is not None else []
    if rotary is None or params not in (["q", "k", "cos", "sin"], ["tensor", "sin", "cos"]):
        return HALF
    table = next(buffer for name, buffer in rotary.named_buffers()
                 if name.endswith(("inv_freq", "embed_positions")))  # GPT-J: a [sin | cos] table
    width = 2 * table.numel() if table.dim() == 1 else table.shape[-1]
    probe = torch.zeros(1, 1, 1, width, device=table.device)
    extra = {}
    if "layer_type" in inspect.signature(rotary.forward).parameters:  # per-layer-type RoPE (Gemma3, Olmo3)
        extra["layer_type"] = next(iter(getattr(rotary, "layer_types", None) or ["full_attention"]))
    with torch.no_grad():
        first, second = (t.float() for t in rotary(
            probe.to(model.dtype), torch.ones(1, 1, dtype=torch.long, device=table.device), **extra))
        probe[..., 0] = 1.0
        if params[0] == "q":
            turned = apply(probe, probe, first, second)[0][0, 0, 0]
        else:  # GPT-J: the module returns (sin, cos), apply takes one tensor
            turned = apply(probe, first, second)[0, 0, 0]
    partner = int(turned[1:].abs().argmax()) + 1
    return INTERLEAVED if partner == 1 else HALF


def rotary_table(model) -> torch.Tensor | None:
    """GPT-J's rotary module keeps a [sin | cos] table of positions 0..n_positions - 1 instead of ``inv_freq``:
    positions beyond it do not exist for the model."""
    return next((module.embed_positions for module in model.modules()
                 if type(module).__name__.endswith("RotaryEmbedding") and hasattr(module, "embed_positions")), None)


# RoPE variants whose inv_freq the model rewrites in place once a position passes a limit (rotary_position_limit).
SEQUENCE_DEPENDENT_ROPE = ("dynamic", "longrope")


def rope_groups(text_config) -> list[dict]:
    """The config's RoPE parameter groups: one, or one per layer type as in Gemma 3."""
    params = getattr(text_config, "rope_parameters", None) or {}
    return [params] if "rope_type" in params else [p for p in params.values() if isinstance(p, dict)]


def rotary_position_limit(model) -> int | None:
    """Positions 0..limit-1 are rotated with fixed frequencies; beyond, GPT-J's table ends and ``dynamic`` /
    ``longrope`` RoPE switch to other frequencies (transformers' ``dynamic_rope_update``). None: no limit."""
    table = rotary_table(model)
    if table is not None:
        return table.shape[0]
    text = model.config.get_text_config(decoder=True)
    limits = []
    for group in rope_groups(text):
        kind = group.get("rope_type", "default")
        if kind == "longrope":  # long factors once max(position_ids) + 1 > original_max_position_embeddings
            limits.append(group.get("original_max_position_embeddings")
                          or getattr(text, "original_max_position_embeddings", None) or text.max_position_embeddings)
        elif kind == "dynamic":  # NTK base grows once max(position_ids) + 1 > max_position_embeddings
            limits.append(text.max_position_embeddings)
    return min(limits) if limits else None


def layers_without_rope(text_config) -> list[int]:
    """Layers that skip RoPE: their keys carry no position, and no rotary shift may move them. Known from the
    config only for the model types read here; under ``trust_positions`` the self-check catches the rest."""
    flags = getattr(text_config, "no_rope_layers", None)  # SmolLM3, Llama 4: 0 marks a layer without RoPE
    if flags is not None:
        return [i for i, flag in enumerate(flags) if not flag]
    # modeling_cohere2 rotates only on sliding layers; modeling_exaone4 too, once a window is set.
    if text_config.model_type == "cohere2" or (text_config.model_type == "exaone4" and text_config.sliding_window):
        return [i for i, kind in enumerate(text_config.layer_types) if kind != "sliding_attention"]
    return []


def find_rotary(model) -> RotaryShift | LayerShifts | None:
    """The model's RoPE frequencies and layout, or None for a model without rotary embeddings.

    One ``RotaryShift`` when every layer rotates alike; a ``LayerShifts`` when layers differ by their layer
    type (``<layer_type>_inv_freq`` buffers: Gemma 3's local and global RoPE) or skip RoPE
    (``layers_without_rope``). Raises for different frequencies not tied to layer types. For dynamic and
    longrope RoPE these are the frequencies below ``rotary_position_limit`` (``check_rotary_reach``).
    """
    # dynamic/longrope rewrite inv_freq in place past their limit and restore it below: read the frequencies of
    # positions below it, which check_rotary_reach keeps every path to.
    if getattr(model.config, "alibi", False):  # falcon-rw: it builds a rotary module and never applies it (ALiBi)
        return None
    changing = bool(rope_types(model.config) & set(SEQUENCE_DEPENDENT_ROPE))
    named = {
        name.replace("original_inv_freq", "inv_freq"): buf
        for name, buf in model.named_buffers()
        if name.endswith("inv_freq") and name.endswith("original_inv_freq") == changing
    }
    found = list(named.values()) or sinusoid_table_frequencies(model)
    if not found:
        return None
    model_type = getattr(model.config, "model_type", type(model).__name__)
    layout = rotary_layout(model)
    text = model.config.get_text_config(decoder=True)
    skipped = set(layers_without_rope(text))
    first = found[0]
    if all(b.shape == first.shape and torch.equal(b, first) for b in found[1:]):
        if not skipped:
            return RotaryShift(first, layout)
        by_layer = [first] * text.num_hidden_layers
    else:
        # Frequencies per layer type, as the model's rotary module names them (Gemma 3, Olmo 3).
        by_type = {name.rsplit(".", 1)[-1].removesuffix("_inv_freq"): buf for name, buf in named.items()}
        layer_types = getattr(text, "layer_types", None)
        if len(by_type) != len(named) or not layer_types or not set(layer_types) <= set(by_type):
            raise NotImplementedError(
                f"{model_type} ({type(model).__name__}) uses several different rotary embeddings that are not tied "
                "to its layer types; streaming_lm supports one rotary embedding per layer type (<layer_type>_inv_freq)"
            )
        by_layer = [by_type[kind] for kind in layer_types]
    shifts = {}  # one shift (and its memoised tables) per distinct frequency buffer
    layers = []
    for i, freq in enumerate(by_layer):
        layers.append(None if i in skipped else shifts.setdefault(id(freq), RotaryShift(freq, layout)))
    return LayerShifts(layers)


def sinusoid_table_frequencies(model) -> list[torch.Tensor]:
    """GPT-J keeps no ``inv_freq``: the row of position 1 of its [sin | cos] table gives the frequencies back
    (all at most 1 < pi, so atan2 returns them to float32 precision)."""
    table = rotary_table(model)
    if table is None:
        return []
    sin, cos = table[1].double().chunk(2)
    return [torch.atan2(sin, cos).float()]


def rope_types(config) -> set[str]:
    """The ``rope_type`` s a config names (one, or one per layer type as in Gemma3)."""
    groups = rope_groups(config.get_text_config(decoder=True))
    return {group.get("rope_type", "default") for group in groups}
