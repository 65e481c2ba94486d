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

    def cos_sin(self, delta: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        """The float32 tables of one delta, for ``rotate_by``; memoised (the deltas in use are few and small)."""
        key = (delta, device)
        if key not in self._tables:
            self._tables[key] = self._cos_sin(torch.tensor(delta), device, torch.float32)
        return self._tables[key]

    def rotate(self, x: torch.Tensor, delta) -> torch.Tensor:
        """Rotate ``x`` of shape [..., seq, head_dim] by ``delta`` positions.

        ``delta`` is an int (all positions alike) or a 1-D tensor with one delta per
        sequence position. Computed in float32 at least, returned in ``x.dtype``.
        """
        if isinstance(delta, int):
            if delta == 0:
                return x
            cos, sin = self.cos_sin(delta, x.device)
        else:
            cos, sin = self._cos_sin(delta, x.device, torch.float32)
        return self.rotate_by(x, cos, sin)

    def rotate_by(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Rotate ``x`` with tables from ``cos_sin`` (or per-position tables of matching shape)."""
        work = x.to(torch.promote_types(x.dtype, torch.float32))
        rot, rest = work[..., : self.rotary_dim], work[..., self.rotary_dim :]
        half = self.rotary_dim // 2
        rotated_half = torch.cat((-rot[..., half:], rot[..., :half]), dim=-1)
        out = rot * cos + rotated_half * sin
        if rest.shape[-1]:
            out = torch.cat((out, rest), dim=-1)
        return out.to(x.dtype)
