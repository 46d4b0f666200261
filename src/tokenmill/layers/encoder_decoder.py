"""Decoder state of encoder-decoder models (T5, BART, mBART, Marian) and their attention.

The encoder runs once per request. Its output is projected to cross-attention keys and
values once, when decoding starts, and every decoder step reuses them; the decoder's own
keys and values grow by the tokens of each step. Rows can be dropped (finished requests)
or reordered (beam search follows its beams) with one ``select_rows`` call.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


class EncoderDecoderCache:
    """Per-layer self-attention K/V (growing) and cross-attention K/V (fixed), batch-major.

    Args:
        cross_k, cross_v: per decoder layer, (B, H, S, D) projections of the encoder output.
        encoder_mask: (B, S) bool, True for real encoder tokens.
        capacity: decoder positions to preallocate; the buffers grow when a step exceeds it.
    """

    def __init__(
        self,
        cross_k: list[torch.Tensor],
        cross_v: list[torch.Tensor],
        encoder_mask: torch.Tensor,
        capacity: int = 0,
    ) -> None:
        self.cross_k = cross_k
        self.cross_v = cross_v
        self.encoder_mask = encoder_mask
        self.capacity = capacity
        n = len(cross_k)
        self.self_k: list[torch.Tensor | None] = [None] * n
        self.self_v: list[torch.Tensor | None] = [None] * n
        #: decoder tokens already in the cache (the position of the next one)
        self.length = 0

    @property
    def batch(self) -> int:
        return self.encoder_mask.shape[0]

    def cross_mask(self) -> torch.Tensor | None:
        """(B, 1, 1, S) keys-to-keep mask for cross-attention, or None when nothing is padded."""
        if bool(self.encoder_mask.all()):
            return None
        return self.encoder_mask[:, None, None, :]

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store this step's (B, H, T, D) keys and values after the cached ones; return all of them.

        ``length`` does not move here: every layer writes at the same offset, and the model
        calls :meth:`advance` once after its last layer.
        """
        T = k.shape[2]
        end = self.length + T
        buf_k, buf_v = self.self_k[layer], self.self_v[layer]
        if buf_k is None or buf_v is None or end > buf_k.shape[2]:
            size = max(end, self.capacity, 2 * buf_k.shape[2] if buf_k is not None else 0)
            B, H, _, D = k.shape
            new_k = k.new_empty(B, H, size, D)
            new_v = v.new_empty(B, H, size, v.shape[-1])
            if buf_k is not None and buf_v is not None and self.length:
                new_k[:, :, : self.length] = buf_k[:, :, : self.length]
                new_v[:, :, : self.length] = buf_v[:, :, : self.length]
            buf_k, buf_v = new_k, new_v
            self.self_k[layer], self.self_v[layer] = buf_k, buf_v
        buf_k[:, :, self.length : end] = k
        buf_v[:, :, self.length : end] = v
        return buf_k[:, :, :end], buf_v[:, :, :end]

    def advance(self, num_tokens: int) -> None:
        self.length += num_tokens

    def select_rows(self, rows: torch.Tensor) -> None:
        """Keep only ``rows`` of the batch, in that order (repeats allowed: beams fork)."""
        self.encoder_mask = self.encoder_mask.index_select(0, rows)
        self.cross_k = [t.index_select(0, rows) for t in self.cross_k]
        self.cross_v = [t.index_select(0, rows) for t in self.cross_v]
        # Only the filled prefix is copied; the next append grows the buffer again.
        self.self_k = [
            None if t is None else t[:, :, : self.length].index_select(0, rows) for t in self.self_k
        ]
        self.self_v = [
            None if t is None else t[:, :, : self.length].index_select(0, rows) for t in self.self_v
        ]


def split_heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """(B, T, H * D) -> (B, H, T, D)."""
    B, T, C = x.shape
    return x.view(B, T, num_heads, C // num_heads).transpose(1, 2)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """(B, H, T, D) -> (B, T, H * D), heads concatenated as output projections expect."""
    B, H, T, D = x.shape
    return x.transpose(1, 2).reshape(B, T, H * D)


def causal_mask(num_queries: int, past: int, device: torch.device) -> torch.Tensor | None:
    """(T, past + T) bool mask: query i (at position past + i) sees keys 0..past + i.

    None for a single query, which sees every cached key.
    """
    if num_queries == 1:
        return None
    q_pos = torch.arange(past, past + num_queries, device=device).unsqueeze(1)
    k_pos = torch.arange(past + num_queries, device=device).unsqueeze(0)
    return k_pos <= q_pos


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """Scaled dot-product attention of (B, H, T, D) queries over (B, H, S, D) keys.

    Args:
        mask: bool, broadcastable to (B, H, T, S); True keeps a key.
        bias: float added to the scores (T5's relative position bias), broadcastable likewise.
        scale: None for 1/sqrt(D); T5 uses 1.0.

    Returns:
        (B, T, H * D).
    """
    attn_mask = mask
    if bias is not None:
        attn_mask = bias.to(q.dtype)
        if mask is not None:
            # The dtype's lowest value rather than -inf, as transformers masks.
            attn_mask = attn_mask.masked_fill(~mask, torch.finfo(q.dtype).min)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=scale)  # (B, H, T, D)
    return merge_heads(out)
