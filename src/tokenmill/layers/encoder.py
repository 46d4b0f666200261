"""Bidirectional (encoder) attention over right-padded batches.

Encoder families keep their own module names (BERT's ``attention.self.query``, DistilBERT's
``q_lin``), so what they share is the attention arithmetic, not a block: a key-padding mask
and one ``scaled_dot_product_attention`` call over all heads.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def key_padding_mask(attention_mask: torch.Tensor | None) -> torch.Tensor | None:
    """(B, T) 0/1 attention mask -> boolean (B, 1, 1, T) keys-to-keep mask for SDPA.

    Returns None when nothing is padded: SDPA picks its fastest kernels only without a
    mask, and a full batch of equal lengths is common (one host sync per forward, not per layer).
    """
    if attention_mask is None:
        return None
    keep = attention_mask.bool()
    if bool(keep.all()):
        return None
    return keep[:, None, None, :]  # (B, 1, 1, T): broadcast over heads and queries


def bidirectional_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_heads: int, mask: torch.Tensor | None
) -> torch.Tensor:
    """Multi-head attention of every position over every unpadded key.

    Args:
        q, k, v: projected (B, T, C) tensors, C = num_heads * head_dim.
        mask: from :func:`key_padding_mask`. Padded queries still attend to the real keys, so
            their rows stay finite (callers ignore them).

    Returns:
        (B, T, C), heads concatenated as the output projection expects.
    """
    B, T, C = q.shape
    shape = (B, T, num_heads, C // num_heads)
    q, k, v = (t.view(shape).transpose(1, 2) for t in (q, k, v))  # (B, H, T, D)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, H, T, D)
    return out.transpose(1, 2).reshape(B, T, C)
