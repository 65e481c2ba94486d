"""Moving already-rotated keys (or queries) to another rotary position.

RoPE rotates each pair of dimensions by ``position * inv_freq``; rotations compose, so a
key stored at position p moves to p + delta by one more rotation of ``delta * inv_freq``.
The frequencies are read from the model's own rotary module, which already folds in
theta, scaling (linear, llama3, yarn, ...) and partial rotary dimensions.
"""

from __future__ import annotations

import torch


class RotaryShift:
    """Rotates the first ``rotary_dim`` features of head vectors by a position delta.

    Uses the ``rotate_half`` layout (pairs ``i`` and ``i + rotary_dim/2``) of Llama,
    Mistral, Qwen, Phi, Gemma and GPT-NeoX.
    """

    def __init__(self, inv_freq: torch.Tensor):
        self.inv_freq = inv_freq.detach().to(torch.float64).cpu()
        self.rotary_dim = 2 * self.inv_freq.numel()
        self._tables: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    def _cos_sin(self, delta: torch.Tensor, device, dtype):
        # Angles in float64: deltas are small integers, so this is exact to float32 rounding.
        angles = delta.to(torch.float64).cpu()[..., None] * self.inv_freq
        emb = torch.cat((angles, angles), dim=-1)
        return emb.cos().to(device=device, dtype=dtype), emb.sin().to(device=device, dtype=dtype)

    def rotate(self, x: torch.Tensor, delta) -> torch.Tensor:
        """Rotate ``x`` of shape [..., seq, head_dim] by ``delta`` positions.

        ``delta`` is an int (all positions alike) or a 1-D tensor with one delta per
        sequence position. Computed in float32 at least, returned in ``x.dtype``.
        """
        if isinstance(delta, int):
            if delta == 0:
                return x
            key = (delta, x.device)
            if key not in self._tables:
                self._tables[key] = self._cos_sin(torch.tensor(delta), x.device, torch.float32)
            cos, sin = self._tables[key]
        else:
            cos, sin = self._cos_sin(delta, x.device, torch.float32)
        work = x.to(torch.promote_types(x.dtype, torch.float32))
        rot, rest = work[..., : self.rotary_dim], work[..., self.rotary_dim :]
        half = self.rotary_dim // 2
        rotated_half = torch.cat((-rot[..., half:], rot[..., :half]), dim=-1)
        out = rot * cos + rotated_half * sin
        if rest.shape[-1]:
            out = torch.cat((out, rest), dim=-1)
        return out.to(x.dtype)


def find_rotary(model) -> RotaryShift | None:
    """The model's RoPE frequencies, or None for a model without rotary embeddings.

    Raises when layers use different frequencies (e.g. local/global RoPE), which one
    shared shift cannot serve.
    """
    found = [
        buf
        for name, buf in model.named_buffers()
        if name.endswith("inv_freq") and not name.endswith("original_inv_freq")
    ]
    if not found:
        return None
    first = found[0]
    if any(b.shape != first.shape or not torch.equal(b, first) for b in found[1:]):
        raise NotImplementedError(
            f"{type(model).__name__} uses several different rotary embeddings "
            "(e.g. separate local and global RoPE); streaming_lm supports one per model"
        )
    return RotaryShift(first)
