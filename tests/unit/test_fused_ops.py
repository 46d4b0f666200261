"""The fused bf16 CPU kernels equal the PyTorch op chains they replace, and the model
layers give the same output with and without them."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tokenmill.layers import cpu_kernels
from tokenmill.layers.norms import RMSNorm

pytestmark = pytest.mark.skipif(
    not cpu_kernels.paged_decode_available(torch.bfloat16), reason="no C compiler here"
)
bf16 = torch.bfloat16


def _assert_bf16_equal(out: torch.Tensor, ref: torch.Tensor) -> None:
    """Equal but for float32 summation order: at most one bf16 ulp apart, nearly all exact."""
    assert out.dtype == ref.dtype == bf16 and out.shape == ref.shape
    o, r = out.float(), ref.float()
    ulp = r.abs().clamp_min(1e-30) * 2.0**-7
    assert bool(((o - r).abs() <= ulp).all())
    assert (out != ref).float().mean().item() < 1e-3


@pytest.mark.parametrize("rows", [1, 16, 300])  # 300 x 576 runs multithreaded
@pytest.mark.parametrize("with_residual", [False, True])
def test_rmsnorm_equals_the_llama_chain(rows, with_residual):
    torch.manual_seed(rows)
    C = 576
    x, res = (torch.randn(rows, C) * 3).to(bf16), (torch.randn(rows, C) * 3).to(bf16)
    w = torch.rand(C).to(bf16)
    out, new_res = cpu_kernels.rmsnorm(x, w, 1e-5, res if with_residual else None)
    s = x + res if with_residual else x
    _assert_bf16_equal(out, w * F.rms_norm(s.float(), (C,), None, 1e-5).to(bf16))
    if with_residual:
        assert torch.equal(new_res, s)
    else:
        assert new_res is None


def test_rmsnorm_gemma_mode_scales_by_one_plus_weight_in_float32():
    torch.manual_seed(0)
    x, w = torch.randn(8, 64).to(bf16), torch.randn(64).to(bf16)
    out, _ = cpu_kernels.rmsnorm(x, w, 1e-6, gemma=True)
    _assert_bf16_equal(out, F.rms_norm(x.float(), (64,), w.float() + 1.0, 1e-6).to(bf16))


@pytest.mark.parametrize("offset", [0.0, 1.0])
def test_rmsnorm_module_gives_the_same_with_and_without_the_kernel(offset, monkeypatch):
    torch.manual_seed(3)
    norm = RMSNorm(96, 1e-5, offset=offset).to(bf16)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(96))
    x, res = torch.randn(2, 5, 96).to(bf16), torch.randn(2, 5, 96).to(bf16)
    fused_out, fused_res = norm(x, res)
    monkeypatch.setattr(cpu_kernels, "fused_available", lambda t: False)
    ref_out, ref_res = norm(x, res)
    assert torch.equal(fused_res, ref_res)
    _assert_bf16_equal(fused_out, ref_out)


def test_rope_in_place_rotates_only_q_and_k_heads():
    torch.manual_seed(0)
    N, H, Hkv, D = 7, 9, 3, 64
    qkv = torch.randn(N, H + 2 * Hkv, D).to(bf16)
    cos, sin = torch.randn(N, 1, D).to(bf16), torch.randn(N, 1, D).to(bf16)
    qk = qkv[:, : H + Hkv]
    ref = qk * cos + qk.roll(D // 2, -1) * sin
    out = qkv.clone()
    cpu_kernels.rope_(out, cos, sin, H + Hkv)
    assert torch.equal(out[:, : H + Hkv], ref)
    assert torch.equal(out[:, H + Hkv :], qkv[:, H + Hkv :])


@pytest.mark.parametrize("rows", [1, 64])
def test_silu_mul_equals_the_chain(rows):
    torch.manual_seed(rows)
    gu = (torch.randn(rows, 2 * 1536) * 4).to(bf16)
    gu[0, :4] = torch.tensor([-100.0, 100.0, 0.0, -0.0])  # far tails and zero
    gate, up = gu.chunk(2, -1)
    _assert_bf16_equal(cpu_kernels.silu_mul(gu), F.silu(gate) * up)


def test_bad_shapes_are_refused_with_a_message():
    x = torch.randn(4, 8).to(bf16)
    with pytest.raises(ValueError, match="weight must be a contiguous"):
        cpu_kernels.rmsnorm(x, torch.ones(9).to(bf16), 1e-5)
    with pytest.raises(ValueError, match="residual must match"):
        cpu_kernels.rmsnorm(x, torch.ones(8).to(bf16), 1e-5, residual=torch.randn(4, 9).to(bf16))
    with pytest.raises(ValueError, match="x, cos and sin do not agree"):
        cpu_kernels.rope_(
            torch.randn(2, 3, 8).to(bf16), torch.randn(3, 1, 8).to(bf16), torch.randn(3, 1, 8).to(bf16), 2
        )
    with pytest.raises(ValueError, match="gate and up halves"):
        cpu_kernels.silu_mul(torch.randn(2, 7).to(bf16))


def test_fused_available_only_for_contiguous_cpu_bf16():
    x = torch.randn(4, 8)
    assert not cpu_kernels.fused_available(x)
    assert cpu_kernels.fused_available(x.to(bf16))
    assert not cpu_kernels.fused_available(x.to(bf16).t())
