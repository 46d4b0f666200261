"""Normalisation layers, computed in float32 as the reference implementations do."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    """Llama-style RMSNorm. ``offset=1.0`` gives Gemma's ``(1 + weight)`` scaling."""

    def __init__(self, dim: int, eps: float = 1e-6, offset: float = 0.0) -> None:
        super().__init__()
        self.eps = eps
        self.offset = offset
        self.weight = nn.Parameter(torch.ones(dim) if offset == 0.0 else torch.zeros(dim))

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> Any:
        """``norm(x)``; with ``residual``, ``(norm(x + residual), x + residual)``."""
        if residual is not None:
            x = x + residual
            return self._norm(x), x
        return self._norm(x)

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        shape = (x.shape[-1],)
        if self.offset:
            # Gemma scales in float32 before the cast back.
            w = self.weight.float() + self.offset
            return F.rms_norm(x.float(), shape, w, self.eps).to(dtype)
        if dtype == torch.float32:
            return F.rms_norm(x, shape, self.weight, self.eps)
        # Llama normalises in float32, casts back, then scales in the model dtype.
        return self.weight * F.rms_norm(x.float(), shape, None, self.eps).to(dtype)


class LayerNorm(nn.LayerNorm):
    """Plain LayerNorm (GPT-2); kept as a name so models read uniformly."""
