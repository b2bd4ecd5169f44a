"""Inverted dropout with a cheaper mask on CPU.

``F.dropout`` draws its mask with ``bernoulli_``, which on CPU costs about twice a plain
uniform draw. The generator and its losses run dropout on every step over tens of thousands
of elements (the cross-attention weights alone are heads x rows x primitives), so they draw
the mask as floor(u + 1 - p) for u uniform in [0, 1): 1 exactly when u >= p, so each
element is kept with probability 1 - p, as in ``F.dropout`` (docs/performance.md, "The
generator step"). The draw comes from torch's default generator, like ``F.dropout``'s.
"""

from __future__ import annotations

import torch
from torch import nn


def dropout_mask(like: torch.Tensor, p: float) -> torch.Tensor:
    """Multipliers shaped and typed like ``like``: 0 with probability ``p``, else 1 / (1 - p).
    Drawn in at least float32: in half precision u + 1 - p would round to 1 for u a little
    below ``p``."""
    keep = 1.0 - p
    draw_dtype = like.dtype if like.dtype in (torch.float32, torch.float64) else torch.float32
    mask = torch.rand(like.shape, dtype=draw_dtype, device=like.device).add_(keep).floor_().mul_(1.0 / keep)
    return mask.to(like.dtype)


class Dropout(nn.Module):
    """``nn.Dropout`` (the same arguments, no state) drawing its mask with :func:`dropout_mask`."""

    def __init__(self, p: float = 0.5):
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"dropout probability must be in [0, 1), got {p}")
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        return x * dropout_mask(x, self.p)

    def extra_repr(self) -> str:
        return f"p={self.p}"
