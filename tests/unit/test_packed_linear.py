"""bf16 linear layers pre-packed for oneDNN give the plain layer's result."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tokenmill.layers.linear import OneDNNPackedLinear, pack_linears_for_onednn


@pytest.mark.parametrize("rows", [1, 2, 3, 16, 130])
@pytest.mark.parametrize("bias", [False, True])
def test_packed_linear_matches_the_plain_one(rows, bias):
    torch.manual_seed(0)
    plain = nn.Linear(96, 200, bias=bias).to(torch.bfloat16)
    model = nn.Sequential(plain)
    x = torch.randn(1, rows, 96, dtype=torch.bfloat16)
    want = plain(x).float()
    if not pack_linears_for_onednn(model):
        pytest.skip("this PyTorch build has no oneDNN weight packing")
    assert isinstance(model[0], OneDNNPackedLinear)
    got = model[0](x)
    assert got.shape == (1, rows, 200) and got.dtype == torch.bfloat16
    # Same products, possibly summed in another order: within bf16 rounding.
    torch.testing.assert_close(got.float(), want, atol=3e-2, rtol=2e-2)


def test_packing_keeps_tied_weights_tied_and_skips_other_dtypes():
    emb = nn.Embedding(50, 32).to(torch.bfloat16)
    head = nn.Linear(32, 50, bias=False).to(torch.bfloat16)
    head.weight = emb.weight
    fp32 = nn.Linear(8, 8)
    model = nn.ModuleDict({"emb": emb, "head": head, "fp32": fp32})
    if not pack_linears_for_onednn(model):
        pytest.skip("this PyTorch build has no oneDNN weight packing")
    assert model["head"].weight is model["emb"].weight
    assert type(model["fp32"]) is nn.Linear
