"""Normalisation layers, computed in float32 as the reference implementations do."""

from __future__ import annotations

import torch
from torch import nn


class RMSNorm(nn.Module):
    """Llama-style RMSNorm. ``offset=1.0`` gives Gemma's ``(1 + weight)`` scaling."""

    def __init__(self, dim: int, eps: float = 1e-6, offset: float = 0.0) -> None:
        super().__init__()
        self.eps = eps
        self.offset = offset
        self.weight = nn.Parameter(torch.ones(dim) if offset == 0.0 else torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.offset:
            # Gemma scales in float32 before the cast back.
            return (h * (self.offset + self.weight.float())).to(dtype)
        # Llama casts back first, then scales in the model dtype.
        return self.weight * h.to(dtype)


class LayerNorm(nn.LayerNorm):
    """Plain LayerNorm (GPT-2); kept as a name so models read uniformly."""
