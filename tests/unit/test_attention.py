"""The bf16 CPU matmul attention against PyTorch's SDPA in float32."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tokenmill.layers import attention as A


@pytest.mark.parametrize(
    "T,S,kind",
    [(300, 300, "causal"), (37, 37, "causal"), (200, 260, "causal"), (5, 20, "offset"), (16, 16, "padded")],
)
def test_matmul_attention_matches_sdpa(T, S, kind):
    torch.manual_seed(0)
    q = torch.randn(2, 6, T, 32, dtype=torch.bfloat16)
    k = torch.randn(2, 2, S, 32, dtype=torch.bfloat16)
    v = torch.randn(2, 2, S, 32, dtype=torch.bfloat16)
    if kind == "padded":
        mask = (torch.rand(2, 1, T, S) > 0.3) | torch.eye(T, S, dtype=torch.bool)
        ref_mask = mask
    else:
        ref_mask = torch.ones(T, S, dtype=torch.bool).tril(S - T)
        mask = None if kind == "causal" else ref_mask
    out = A._matmul_attention(q, k, v, mask, kind == "causal", 0.2)  # (B, T, H * D)
    ref = F.scaled_dot_product_attention(
        q.float(), k.float(), v.float(), attn_mask=ref_mask, enable_gqa=True, scale=0.2
    )
    ref = ref.transpose(1, 2).reshape(2, T, -1)
    # bf16 keeps 8 bits of mantissa: outputs of size ~1 agree to a few 1e-3.
    assert (out.float() - ref).abs().max() < 3e-2
    assert (out.float() - ref).abs().mean() < 3e-3
