"""The fused bf16 CPU kernels equal the PyTorch op chains they replace."""

from __future__ import annotations

import math

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


@pytest.mark.parametrize("offset", [0.0, 1.0])
@pytest.mark.parametrize("hidden", [64, 100, 576, 640, 2048])
def test_small_bf16_norms_run_in_c_and_equal_pytorch_bit_for_bit(offset, hidden, monkeypatch):
    """A decode step's norms (a few rows) run in C: the same bits as the PyTorch ops, for
    Llama's norm and Gemma's (1 + w) one."""
    import tokenmill.layers.norms as norms

    taken = []
    real = norms._c_norm
    monkeypatch.setattr(norms, "_c_norm", lambda *a: taken.append(real(*a)) or taken[-1])
    g = torch.Generator().manual_seed(hidden)
    norm = RMSNorm(hidden, 1e-6, offset=offset).to(bf16)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(hidden, generator=g) * 0.5)
    for rows in (1, 7, 32):
        x = (torch.randn(rows, hidden, generator=g) * torch.logspace(-2, 2, rows).unsqueeze(1)).to(bf16)
        n = len(taken)
        out = norm(x)
        assert len(taken) == n + 1 and taken[-1] is not None  # the C norm ran
        assert torch.equal(out, norm.torch_norm(x))


@pytest.mark.parametrize("offset", [0.0, 1.0])
def test_rmsnorm_with_a_residual_returns_the_norm_of_the_sum_and_the_sum(offset):
    torch.manual_seed(3)
    norm = RMSNorm(96, 1e-5, offset=offset).to(bf16)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(96))
    x, res = torch.randn(2, 5, 96).to(bf16), torch.randn(2, 5, 96).to(bf16)
    out, new_res = norm(x, res)
    assert torch.equal(new_res, x + res)
    assert torch.equal(out, norm(x + res))


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


@pytest.mark.parametrize("rows", [1, 64])
def test_gelu_tanh_mul_equals_the_chain_and_is_exact_in_the_tail(rows):
    """gelu(gate, approximate="tanh") * up as PyTorch computes it, to the last bf16 bit but
    for rare ties, where gelu is not tiny; below x = -3 PyTorch's 1 + tanh cancels, and the
    kernel's x / (1 + exp(-2z)) is the closer of the two to the float64 value."""
    torch.manual_seed(rows)
    gu = (torch.randn(rows, 2 * 2048) * 3).to(bf16)
    gu[0, :5] = torch.tensor([-100.0, 100.0, 0.0, -0.0, -9.0])
    gate, up = gu.chunk(2, -1)
    out, ref = cpu_kernels.gelu_tanh_mul(gu), F.gelu(gate, approximate="tanh") * up
    body = gate.float() >= -3
    _assert_bf16_equal(out[body], ref[body])
    # The tail, activation alone: within one bf16 rounding of the float64 value, computed
    # as x sigmoid(2z) (0.5 (1 + tanh(z)) = sigmoid(2z)): F.gelu cancels in float64 too.
    act = cpu_kernels.gelu_tanh_mul(torch.cat([gate, torch.ones_like(gate)], -1)).double()
    x = gate.double()
    exact = x * torch.sigmoid(2 * math.sqrt(2 / math.pi) * (x + 0.044715 * x**3))
    tail = ~body
    assert bool(((act - exact).abs() <= exact.abs() * 2.0**-8 + 1e-37)[tail].all())  # 0 past exp range
    assert torch.equal(out[0, :4], ref[0, :4])  # far tails and signed zeros as PyTorch gives them


def test_bad_shapes_are_refused_with_a_message():
    with pytest.raises(ValueError, match="x, cos and sin do not agree"):
        cpu_kernels.rope_(
            torch.randn(2, 3, 8).to(bf16), torch.randn(3, 1, 8).to(bf16), torch.randn(3, 1, 8).to(bf16), 2
        )
    with pytest.raises(ValueError, match="gate and up halves"):
        cpu_kernels.silu_mul(torch.randn(2, 7).to(bf16))
    with pytest.raises(ValueError, match="gelu_tanh_mul: the last dim must hold gate and up halves"):
        cpu_kernels.gelu_tanh_mul(torch.randn(2, 7).to(bf16))


def test_fused_available_only_for_contiguous_cpu_bf16():
    x = torch.randn(4, 8)
    assert not cpu_kernels.fused_available(x)
    assert cpu_kernels.fused_available(x.to(bf16))
    assert not cpu_kernels.fused_available(x.to(bf16).t())
