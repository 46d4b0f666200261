"""Attention over a paged KV cache, for a flat batch of prefill chunks and decode tokens.

The cache of each layer is a pool of fixed-size blocks, (num_blocks, block_size, H_kv, D).
A request owns a list of blocks (its block table); token ``p`` of a request lives in
slot ``block_table[p // block_size] * block_size + p % block_size``.

One forward pass carries every scheduled token of every request in one row: single
tokens (decode, or a one-token chunk) come first, then the multi-token chunks. New
keys and values are written to their slots, then:

- the single-token queries are batched: their blocks are gathered into a padded
  (rows, S, H_kv, D) tensor and attended with a length mask;
- each chunk attends causally to its request's earlier keys (gathered from its
  blocks) and its own.

The PyTorch code here is the reference path, exact on every device. On CPU the
decode part runs a C kernel that reads the blocks in place (``cpu_kernels``), since
the gather copies every key and value once more per layer and step; on CUDA a
Triton kernel does the same (``triton_kernels``). Chunks in bf16 on CPU take a C
kernel too (``cpu_kernels.prefill_attention``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from tokenmill.layers import cpu_kernels
from tokenmill.layers.attention import _MATMUL_ATTN_MAX, _matmul_attention


class PagedKVCache:
    """K and V block pools of every layer: (num_blocks, block_size, H_kv, D) each."""

    def __init__(
        self,
        num_layers: int,
        num_blocks: int,
        block_size: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device,
        v_head_dim: int | None = None,
    ) -> None:
        shape = (num_blocks, block_size, num_kv_heads, head_dim)
        vshape = (num_blocks, block_size, num_kv_heads, v_head_dim or head_dim)
        # Zeroed, not empty: attention reads whole blocks, and a NaN left in memory past a
        # sequence's end would survive its zero weight (0 * NaN).
        self.k = [_zeros(shape, dtype, device) for _ in range(num_layers)]
        self.v = [_zeros(vshape, dtype, device) for _ in range(num_layers)]
        self.num_blocks, self.block_size = num_blocks, block_size

    @staticmethod
    def bytes_per_block(
        num_layers: int,
        block_size: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        v_head_dim: int | None = None,
    ) -> int:
        elt = torch.empty((), dtype=dtype).element_size()
        return num_layers * block_size * num_kv_heads * (head_dim + (v_head_dim or head_dim)) * elt

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)


def _zeros(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A zeroed tensor; on CPU from calloc'd pages, which the OS maps only once touched, so
    a large pool costs memory as it fills rather than all at start-up."""
    if device.type != "cpu":
        return torch.zeros(shape, dtype=dtype, device=device)
    nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    return torch.from_numpy(np.zeros(nbytes, dtype=np.uint8)).view(dtype).view(shape)


@dataclass
class PrefillChunk:
    start: int  # first row of the chunk in the flat batch
    num_tokens: int
    context_len: int  # keys the chunk's last token sees (earlier context + the chunk)
    blocks: torch.Tensor | None  # block ids covering the context, None when the chunk is all of it


@dataclass
class PagedAttention:
    """Attention context of one forward pass over the paged cache (built by the runner)."""

    cache: PagedKVCache
    slot_mapping: torch.Tensor  # (N,) slot of every new token
    max_position: int
    num_decode: int = 0
    decode_tables: torch.Tensor | None = None  # (num_decode, max_blocks) block ids, padded
    decode_lens: torch.Tensor | None = None  # (num_decode,) context lengths
    chunks: list[PrefillChunk] = field(default_factory=list)
    #: False forces the PyTorch reference path (tests compare the two)
    use_kernels: bool = True
    _masks: dict = field(default_factory=dict, repr=False)

    def _decode_mask(self, window: int | None, device: torch.device) -> torch.Tensor:
        """(rows, 1, 1, S) True where a key is visible to the row's query."""
        key = ("decode", window)
        if key not in self._masks:
            assert self.decode_tables is not None and self.decode_lens is not None
            S = self.decode_tables.shape[1] * self.cache.block_size
            k_pos = torch.arange(S, device=device).unsqueeze(0)
            lens = self.decode_lens.unsqueeze(1)
            mask = k_pos < lens
            if window is not None:
                mask &= k_pos > lens - 1 - window
            self._masks[key] = mask[:, None, None, :]
        return self._masks[key]

    def attend(
        self,
        layer: int,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        scale: float,
        window: int | None = None,
    ) -> torch.Tensor:
        """q: (1, N, H, D); k, v: (1, N, H_kv, D). Returns (1, N, H * Dv)."""
        _, N, H, D = q.shape
        Hkv = k.shape[2]
        kc, vc = self.cache.k[layer], self.cache.v[layer]
        Dv = vc.shape[-1]
        self._write(k[0], v[0], kc, vc)
        outs = []
        if self.num_decode:
            outs.append(self._decode(q[0, : self.num_decode], kc, vc, scale, window))
        for c in self.chunks:
            rows = slice(c.start, c.start + c.num_tokens)
            if c.blocks is None:
                kr, vr = k[0, rows], v[0, rows]
            else:
                kr = kc.index_select(0, c.blocks).view(-1, Hkv, D)[: c.context_len]
                vr = vc.index_select(0, c.blocks).view(-1, Hkv, Dv)[: c.context_len]
            outs.append(_chunk_attention(q[0, rows], kr, vr, scale, window, self.use_kernels))
        out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=0)
        return out.view(1, N, H * Dv)

    def _write(self, k: torch.Tensor, v: torch.Tensor, kc: torch.Tensor, vc: torch.Tensor) -> None:
        """New keys and values into their slots; on CPU one copy per row (index_copy_ is
        several times slower for these few-hundred-byte rows)."""
        if self.use_kernels and k.device.type == "cpu":
            if "slots_checked" not in self._masks:  # every layer shares the slots: check once
                n = self.slot_mapping.numel()
                if (
                    n
                    and not 0
                    <= int(self.slot_mapping.min())
                    <= int(self.slot_mapping.max())
                    < kc.shape[0] * kc.shape[1]
                ):
                    raise ValueError("slot mapping points outside the KV cache")
                self._masks["slots_checked"] = True
            if cpu_kernels.kv_write(k, v, self.slot_mapping, kc, vc):
                return
        kc.view(-1, k.shape[1], k.shape[2]).index_copy_(0, self.slot_mapping, k)
        vc.view(-1, v.shape[1], v.shape[2]).index_copy_(0, self.slot_mapping, v)

    def _decode(
        self, q: torch.Tensor, kc: torch.Tensor, vc: torch.Tensor, scale: float, window: int | None
    ) -> torch.Tensor:
        """q: (R, H, D) one query per row. Returns (R, H * Dv)."""
        assert self.decode_tables is not None and self.decode_lens is not None
        if self.use_kernels and q.device.type == "cpu" and cpu_kernels.paged_decode_available(q.dtype):
            # Every layer shares the tables: their range is checked on the first layer only.
            checked = self._masks.setdefault("bounds_checked", False)
            out = cpu_kernels.paged_decode(
                q, kc, vc, self.decode_tables, self.decode_lens, scale, window, check_bounds=not checked
            )
            self._masks["bounds_checked"] = True
            if out is not None:
                return out
        if self.use_kernels and q.device.type == "cuda":
            from tokenmill.layers import triton_kernels

            if triton_kernels.supports(q.shape[-1], vc.shape[-1], kc.shape[1]):
                out = triton_kernels.paged_decode(
                    q, kc, vc, self.decode_tables, self.decode_lens, scale, window
                )
                if out is not None:
                    return out
        R, H, D = q.shape
        Hkv = kc.shape[2]
        table = self.decode_tables.view(-1)
        # (R, S, H_kv, D) -> (R, H_kv, S, D)
        kd = kc.index_select(0, table).view(R, -1, Hkv, D).transpose(1, 2)
        vd = vc.index_select(0, table).view(R, -1, Hkv, vc.shape[-1]).transpose(1, 2)
        mask = self._decode_mask(window, q.device)
        # The query heads of each KV group go along the query length: no K/V expansion.
        qg = q.view(R, Hkv, H // Hkv, D)
        out = F.scaled_dot_product_attention(qg, kd, vd, attn_mask=mask, scale=scale)
        return out.reshape(R, -1)


def _chunk_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    window: int | None,
    use_kernel: bool = True,
) -> torch.Tensor:
    """Causal attention of a chunk's T queries (the last T of the S positions).

    q: (T, H, D); k, v: (S, H_kv, D). Returns (T, H * Dv). In bf16 on CPU a C kernel
    (``cpu_kernels.prefill_attention``, 2.4x the matmul path below on a 512-token
    SmolLM2 prompt) takes it; the PyTorch code is the reference.
    """
    if use_kernel and q.dtype == torch.bfloat16 and q.device.type == "cpu":
        out = cpu_kernels.prefill_attention(q, k, v, scale, window)
        if out is not None:
            return out
    T, H, _ = q.shape
    S, Hkv = k.shape[0], k.shape[1]
    q4, k4, v4 = q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None]
    mask = None
    if window is not None and S > window or S != T:
        q_pos = torch.arange(S - T, S, device=q.device).unsqueeze(1)
        k_pos = torch.arange(S, device=q.device).unsqueeze(0)
        mask = k_pos <= q_pos
        if window is not None:
            mask = mask & (q_pos - k_pos < window)
    if q.dtype == torch.bfloat16 and q.device.type == "cpu" and H * T * S <= _MATMUL_ATTN_MAX:
        causal = mask is None or (window is None or S <= window)
        out = _matmul_attention(q4, k4, v4, None if causal else mask, causal, scale)
        return out[0]
    out = F.scaled_dot_product_attention(
        q4, k4, v4, attn_mask=mask, is_causal=mask is None, scale=scale, enable_gqa=H != Hkv
    )
    return out[0].transpose(0, 1).reshape(T, -1)
