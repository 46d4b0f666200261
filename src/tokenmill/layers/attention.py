"""Attention over a KV cache.

Models never touch the cache: each attention layer hands its projected q, k, v to an
attention context (``ctx.attend``), which stores k/v and computes attention. The dense
context here keeps one contiguous buffer per layer; it is the reference path every
faster backend is checked against.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F


class DenseKVCache:
    """Preallocated K/V buffers of shape (B, H_kv, S_max, D) per layer."""

    def __init__(
        self,
        num_layers: int,
        batch: int,
        num_kv_heads: int,
        head_dim: int,
        max_len: int,
        dtype: torch.dtype,
        device: torch.device,
        v_head_dim: int | None = None,
    ) -> None:
        shape = (batch, num_kv_heads, max_len, head_dim)
        vshape = (batch, num_kv_heads, max_len, v_head_dim or head_dim)
        self.k = [torch.empty(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.empty(vshape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.max_len = max_len

    @property
    def batch(self) -> int:
        return self.k[0].shape[0]

    def select_rows(self, rows: torch.Tensor) -> None:
        """Keep only ``rows`` (reorders too: beam search uses this to follow its beams)."""
        self.k = [t.index_select(0, rows) for t in self.k]
        self.v = [t.index_select(0, rows) for t in self.v]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)


@dataclass
class DenseAttention:
    """Attention context for one forward pass over a dense cache (or none).

    All rows write their ``num_tokens`` new keys at the same offset ``start``; rows of
    different prompt lengths are left-padded, and ``key_valid`` marks the real keys.
    """

    cache: DenseKVCache | None
    start: int
    num_tokens: int
    max_position: int
    key_valid: torch.Tensor | None = None  # (B, start + num_tokens) bool
    _masks: dict = field(default_factory=dict, repr=False)

    def _mask(self, device: torch.device, window: int | None) -> tuple[torch.Tensor | None, bool]:
        """The boolean attention mask (True = attend), or None with an ``is_causal`` flag."""
        T, S = self.num_tokens, self.start + self.num_tokens
        needs_window = window is not None and S > window
        if self.key_valid is None and not needs_window:
            if T == 1:
                return None, False
            if self.start == 0:
                return None, True
        q_pos = torch.arange(self.start, S, device=device).unsqueeze(1)  # (T, 1)
        k_pos = torch.arange(S, device=device).unsqueeze(0)  # (1, S)
        mask = k_pos <= q_pos  # (T, S)
        if needs_window:
            mask = mask & (q_pos - k_pos < window)
        if self.key_valid is not None:
            # A pad query of a left-padded row would see no key at all and give NaN, which
            # would leak into real rows through 0 * NaN; let every query see itself.
            mask = (mask.unsqueeze(0) & self.key_valid[:, None, :]) | (k_pos == q_pos)  # (B, T, S)
            mask = mask.unsqueeze(1)  # (B, 1, T, S)
        return mask, False

    def attend(
        self,
        layer: int,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        scale: float,
        window: int | None = None,
    ) -> torch.Tensor:
        """q: (B, T, H, D); k, v: (B, T, H_kv, D). Returns (B, T, H * Dv)."""
        B, T, H, _ = q.shape
        Hkv = k.shape[2]
        q = q.transpose(1, 2)  # (B, H, T, D)
        k = k.transpose(1, 2)  # (B, Hkv, T, D)
        v = v.transpose(1, 2)
        if self.cache is not None:
            end = self.start + T
            self.cache.k[layer][:, :, self.start : end] = k
            self.cache.v[layer][:, :, self.start : end] = v
            k = self.cache.k[layer][:, :, :end]
            v = self.cache.v[layer][:, :, :end]
        if window not in self._masks:  # built once per forward, shared by all layers
            self._masks[window] = self._mask(q.device, window)
        mask, causal = self._masks[window]
        if T == 1 and mask is None and H != Hkv:
            # Decode without a mask: fold the query heads of each KV group into the query
            # length, so no K/V copy is needed for grouped-query attention.
            g = H // Hkv
            out = F.scaled_dot_product_attention(q.reshape(B, Hkv, g, -1), k, v, scale=scale)
            return out.reshape(B, H * out.shape[-1]).unsqueeze(1)
        if (
            q.dtype == torch.bfloat16
            and q.device.type == "cpu"
            and T > 1
            and H * T * k.shape[2] <= _MATMUL_ATTN_MAX
        ):
            return _matmul_attention(q, k, v, mask, causal, scale)
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=causal, scale=scale, enable_gqa=H != Hkv
        )  # (B, H, T, Dv)
        return out.transpose(1, 2).reshape(B, T, -1)


# Score elements up to which bf16 prefill on CPU uses plain matmuls (64 MiB of fp32 scores).
_MATMUL_ATTN_MAX = 1 << 24


# Query rows per block of causal matmul attention: later blocks skip the keys they cannot see.
_CAUSAL_BLOCK = 128


def _matmul_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, causal: bool, scale: float
) -> torch.Tensor:
    """Attention as two bf16 matmuls and a softmax that accumulates in float32.

    On CPU, oneDNN's bf16 matmuls beat the fused SDPA kernel for prompt-sized blocks.
    A causal prompt is done in blocks of query rows, each against only the keys it can
    see, which skips most of the masked half of the work.
    q: (B, H, T, D); k, v: (B, Hkv, S, D). Returns (B, T, H * Dv).
    """
    B, H, T, _ = q.shape
    S = k.shape[2]
    q = q * scale  # scale the small q rather than the large scores
    if not causal:
        return _attend_block(q, k, v, mask).transpose(1, 2).reshape(B, T, -1)
    outs = []
    for c0 in range(0, T, _CAUSAL_BLOCK):
        c1 = min(T, c0 + _CAUSAL_BLOCK)
        end = S - T + c1  # the last key the block's last query sees
        block_mask = torch.ones(c1 - c0, end, dtype=torch.bool, device=q.device).tril(end - (c1 - c0))
        outs.append(_attend_block(q[:, :, c0:c1], k[:, :, :end], v[:, :, :end], block_mask))
    return torch.cat(outs, dim=2).transpose(1, 2).reshape(B, T, -1)


def _attend_block(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None
) -> torch.Tensor:
    """q (already scaled): (B, H, T, D); mask (T, S) or (B, 1, T, S). Returns (B, H, T, Dv)."""
    B, H, T, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    g = H // Hkv
    qg = q.reshape(B, Hkv, g * T, D)  # each KV group's query heads stacked along the length
    scores = torch.matmul(qg, k.transpose(-1, -2)).view(B, Hkv, g, T, S)
    if mask is not None:
        allowed = mask if mask.dim() == 2 else mask.unsqueeze(2)  # broadcast over the group
        scores.masked_fill_(~allowed, float("-inf"))
    # The softmax kernel accumulates in float32 and writes bf16 for the second matmul.
    probs = scores.softmax(dim=-1).view(B, Hkv, g * T, S)
    return torch.matmul(probs, v).view(B, H, T, -1)
