"""Rotary position embeddings (rotate-half layout, as Hugging Face checkpoints store q/k)."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "dynamic", "yarn", "freq_factors")


def rope_inv_freq(dim: int, base: float, scaling: dict[str, Any] | None) -> tuple[torch.Tensor, float]:
    """Inverse frequencies for ``dim`` rotary dimensions, and the attention scaling factor.

    Follows the definitions Hugging Face uses for each ``rope_type``.
    """
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    rope_type = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ValueError(f"rope_scaling type must be one of {SUPPORTED_ROPE_TYPES}, got {rope_type!r}")
    if rope_type == "default" or scaling is None:
        return inv_freq, 1.0
    if rope_type == "freq_factors":
        # GGUF files of Llama 3 store the scaled frequencies as per-frequency divisors.
        return inv_freq / torch.as_tensor(scaling["factors"], dtype=torch.float32), 1.0
    factor = float(scaling["factor"])
    if rope_type == "linear":
        return inv_freq / factor, 1.0
    if rope_type == "dynamic":
        # Dynamic NTK only changes frequencies past the trained length; within it, it is the default.
        return inv_freq, 1.0
    if rope_type == "llama3":
        low = float(scaling["low_freq_factor"])
        high = float(scaling["high_freq_factor"])
        old_len = float(scaling["original_max_position_embeddings"])
        low_wavelen = old_len / low
        high_wavelen = old_len / high
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        is_medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        return torch.where(is_medium, smoothed, scaled), 1.0
    # yarn
    old_len = float(scaling.get("original_max_position_embeddings") or scaling["_max_position_embeddings"])
    beta_fast = float(scaling.get("beta_fast", 32.0))
    beta_slow = float(scaling.get("beta_slow", 1.0))
    mscale = scaling.get("attention_factor")
    if mscale is None:
        mscale = 0.1 * math.log(factor) + 1.0 if factor > 1 else 1.0

    def correction_dim(rot: float) -> float:
        return (dim * math.log(old_len / (rot * 2 * math.pi))) / (2 * math.log(base))

    low_d = max(math.floor(correction_dim(beta_fast)), 0)
    high_d = min(math.ceil(correction_dim(beta_slow)), dim - 1)
    if low_d == high_d:
        high_d += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low_d) / (high_d - low_d)).clamp(0, 1)
    extrapolation = 1 - ramp
    inv = (inv_freq / factor) * (1 - extrapolation) + inv_freq * extrapolation
    return inv, float(mscale)


class RotaryEmbedding(nn.Module):
    """Holds a growing float32 cos/sin table and gathers rows by position."""

    def __init__(self, dim: int, base: float, scaling: dict[str, Any] | None = None) -> None:
        super().__init__()
        inv_freq, self.attention_scaling = rope_inv_freq(dim, base, scaling)
        # A plain attribute, not a buffer: model.to(bfloat16) must not round the frequencies.
        self.inv_freq = inv_freq
        self._cos: torch.Tensor | None = None
        self._sin: torch.Tensor | None = None
        self._cast: dict[torch.dtype, tuple[torch.Tensor, torch.Tensor]] = {}

    def _grow(self, length: int, device: torch.device) -> None:
        size = 1 << max(10, (length - 1).bit_length())
        t = torch.arange(size, device=device, dtype=torch.float32)
        freqs = torch.outer(t, self.inv_freq.to(device=device, dtype=torch.float32))
        emb = torch.cat((freqs, freqs), dim=-1)  # (S, D)
        self._cos = emb.cos() * self.attention_scaling
        sin = emb.sin() * self.attention_scaling
        # rotate_half(x) * sin == roll(x, D/2) * sin_signed, with the first half of sin negated.
        half = sin.shape[-1] // 2
        self._sin = torch.cat((-sin[:, :half], sin[:, half:]), dim=-1)
        self._cast = {torch.float32: (self._cos, self._sin)}

    def forward(
        self, positions: torch.Tensor, dtype: torch.dtype, max_position: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin of shape ``positions.shape + (1, D)`` in ``dtype``, ready to broadcast over heads.

        ``max_position`` is known on the host, so no device sync is needed to size the table.
        """
        need = max_position + 1
        if self._cos is None or self._cos.shape[0] < need or self._cos.device != positions.device:
            self._grow(need, positions.device)
        if dtype not in self._cast:
            # Rounded once per table, as the reference rounds cos/sin to the model dtype.
            self._cast[dtype] = (self._cos.to(dtype), self._sin.to(dtype))
        cos, sin = self._cast[dtype]
        # index_select, not cos[positions]: the same rows without advanced indexing's
        # overhead (tens of microseconds a decode step)
        shape = (*positions.shape, 1, cos.shape[-1])
        flat = positions.reshape(-1)
        return cos.index_select(0, flat).view(shape), sin.index_select(0, flat).view(shape)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half rope. x: (B, T, H, D); cos and the half-negated sin: (B, T, 1, D)."""
    return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * sin
