"""The w4a8 mode: int4 weights with activations rounded to int8 per row and group.

The C kernel (kernels/int4a8_gemm.c) against ``Int4Linear.reference_a8`` (the same
arithmetic in float32 PyTorch), its activation rounding against ``quantize_activations``
bit for bit, the fallbacks, and a whole model against its int4 self.
"""

from __future__ import annotations

import copy
import ctypes

import pytest
import torch

import tiny
from tokenmill.layers import cpu_kernels
from tokenmill.layers.attention import DenseAttention
from tokenmill.layers.quantized import Int4Linear, quantize_activations, quantize_model

needs_kernel = pytest.mark.skipif(not cpu_kernels.int4a8_available(), reason="no AVX512-VNNI kernel here")


def _layer(N: int, K: int, G: int, dtype=torch.bfloat16, bias: bool = True, seed: int = 0) -> Int4Linear:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(N, K, generator=g) * 0.5
    w[:, 0] += 3.0  # an outlier column
    b = torch.randn(N, generator=g) if bias else None
    return Int4Linear.from_float(w, b, G, dtype=dtype, act8=True)


def _x(M: int, K: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=g) * torch.logspace(-1, 1, M).unsqueeze(1)
    x[0, :5] = 0  # a group that is partly zero, and (for G <= 5) all zero
    return x.bfloat16()


@needs_kernel
@pytest.mark.parametrize("M,K,G", [(1, 64, 32), (7, 130, 32), (40, 576, 64), (3, 8, 128), (2, 200, 8)])
def test_activation_rounding_matches_the_kernels_bit_for_bit(M, K, G):
    lib = cpu_kernels._library()
    f = lib.int4a8_quantize_rows
    f.argtypes = [ctypes.c_void_p] * 5 + [ctypes.c_int64] * 3 + [ctypes.c_int]
    f.restype = None
    x = _x(M, K)
    groups = -(-K // G)
    xq = torch.empty(M, groups * G, dtype=torch.int8)
    a, xsum = torch.empty(M, groups), torch.empty(M, groups)
    xqsum = torch.empty(M, groups, dtype=torch.int32)
    f(x.data_ptr(), xq.data_ptr(), a.data_ptr(), xsum.data_ptr(), xqsum.data_ptr(), M, K, G, 2)
    ref_q, ref_a = quantize_activations(x, G)
    assert torch.equal(xq[:, :K].float(), ref_q)
    assert (xq[:, K:] == 0).all()
    assert torch.equal(a.repeat_interleave(G, dim=1)[:, :K], ref_a)
    assert torch.equal(xqsum, xq.view(M, groups, G).sum(-1, dtype=torch.int32))
    # the rounding itself: within half a step of x (and float32 rounding), |xq| = 127 at each group's max
    assert ((ref_q * ref_a - x.float()).abs() <= ref_a / 2 + 1e-6 * x.float().abs()).all()
    assert (xq.view(M, groups, G).abs().amax(-1) == torch.where(a > 0, 127, 0)).all()


@needs_kernel
@pytest.mark.parametrize(
    "N,K,G", [(64, 128, 32), (49, 130, 32), (576, 1536, 32), (40, 256, 128), (16, 96, 64)]
)
@pytest.mark.parametrize("M", [1, 5, 9, 40])
def test_kernel_equals_the_float32_reference(N, K, G, M):
    layer = _layer(N, K, G)
    assert layer.kernel == "tokenmill.int4a8_mm" and layer.fallback is None
    x = _x(M, K)
    got, ref = layer(x), layer(x, use_kernel=False)
    # Exact integer sums on one side, float32 on the other: they part only in the rounding
    # of the float32 epilogue and the final bf16 rounding (and the bias add).
    step = 2**-7 * ref.float().abs().max().item()
    torch.testing.assert_close(got.float(), ref.float(), atol=2 * step, rtol=0)


@needs_kernel
def test_rounding_the_activations_costs_little_and_is_not_nothing():
    """Against the int4 layer with bf16 activations (the same codes): a relative error of a
    few tenths of a percent, as int8 rounding of each group's activations gives."""
    a8 = _layer(576, 1536, 32, bias=False)
    sz = a8.scales_and_zeros
    w16 = Int4Linear(a8.codes(), sz[..., 0].t(), sz[..., 1].t(), None, 32)
    x = _x(16, 1536)
    exact = x.float() @ w16.dequantized_weight().t()
    err = (a8(x).float() - exact).norm() / exact.norm()
    assert 1e-4 < err < 2e-2, err.item()


def test_codes_round_trip_and_equal_the_int4_layers():
    w = torch.randn(49, 130)
    a8 = Int4Linear.from_float(w, None, 32, dtype=torch.bfloat16, act8=True)
    i4 = Int4Linear.from_float(w, None, 32, dtype=torch.bfloat16)
    assert torch.equal(a8.codes(), i4.codes())
    assert torch.equal(a8.dequantized_weight(), i4.dequantized_weight())


def test_float32_activations_fall_back_to_the_reference_and_say_why():
    layer = _layer(32, 64, 32, dtype=torch.float32)
    assert layer.layout == "plain" and layer.kernel is None
    assert layer.fallback == "torch.float32 activations (the w4a8 kernel takes bfloat16)"
    x = _x(3, 64).float()
    torch.testing.assert_close(layer(x), layer.reference_a8(x))
    with pytest.raises(ValueError, match="w4a8 layout must be 'cpu' or 'plain', got 'cuda'"):
        Int4Linear(layer.codes(), torch.ones(32, 2), torch.zeros(32, 2), None, 32, layout="cuda", act8=True)


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    B, T = ids.shape
    with torch.inference_mode():
        return model(ids, torch.arange(T).expand(B, T), DenseAttention(None, 0, T, T - 1), None).float()


@needs_kernel
def test_w4a8_model_stays_close_to_its_int4_self():
    original = tiny.native_from_hf(tiny.hf_model("llama"), dtype=torch.bfloat16)
    a8, i4 = copy.deepcopy(original), copy.deepcopy(original)
    report = quantize_model(a8, "w4a8")
    quantize_model(i4, "int4")
    assert report.mode == "w4a8" and report.group_size == 32 and report.fallback == {}
    assert all(m.act8 for m in a8.modules() if isinstance(m, Int4Linear))
    ids = torch.randint(0, tiny.VOCAB, (1, 24), generator=torch.Generator().manual_seed(0))
    got, ref = _logits(a8, ids), _logits(i4, ids)
    assert not torch.equal(got, ref)
    assert (got - ref).abs().max() <= 8 * 2**-7 * ref.abs().max()
    assert (got.argmax(-1) == ref.argmax(-1)).float().mean() > 0.8


@needs_kernel
def test_int4a8_mm_rejects_what_does_not_fit():
    layer = _layer(32, 64, 32, bias=False)
    packed, sz = layer.qweight, layer.scales_and_zeros
    with pytest.raises(
        ValueError, match=r"int4a8_mm: x \(1, 64\) torch.float32.*an \(32, 64\) weight in groups of 32"
    ):
        cpu_kernels.int4a8_mm(torch.randn(1, 64), packed, sz, 32, 32)
    with pytest.raises(ValueError, match=r"1024 packed bytes and scales \(2, 32, 2\) .* \(48, 64\) weight"):
        cpu_kernels.int4a8_mm(torch.randn(1, 64, dtype=torch.bfloat16), packed, sz, 48, 32)
    with pytest.raises(ValueError, match=r"int4a8_mm: x \(2, 0\) torch.bfloat16"):
        cpu_kernels.int4a8_mm(torch.empty(2, 0, dtype=torch.bfloat16), packed, sz, 32, 32)


@needs_kernel
def test_tiny_and_huge_groups_agree_with_the_reference():
    """A group whose largest value is so small that 127 / max overflows rounds to zeros on
    both paths (no NaN on either), and groups wider than the kernel's vector buffer (512)
    take its scalar rounding."""
    g = torch.Generator().manual_seed(5)
    codes = torch.randint(0, 16, (32, 1024), dtype=torch.uint8, generator=g)
    for G in (32, 512):
        scales = (torch.rand(32, 1024 // G, generator=g) * 0.1).bfloat16()
        zeros = (torch.randn(32, 1024 // G, generator=g) * 0.1).bfloat16()
        layer = Int4Linear(codes, scales, zeros, None, G, act8=True)
        x = torch.randn(3, 1024, generator=g).bfloat16()
        x[1, :G] = 1e-38  # a whole group below 127 / FLT_MAX
        got, ref = layer(x), layer(x, use_kernel=False)
        assert torch.isfinite(got).all() and torch.isfinite(ref).all()
        step = 2**-7 * ref.float().abs().max().item()
        torch.testing.assert_close(got.float(), ref.float(), atol=2 * step, rtol=0)
        assert torch.equal(quantize_activations(x[1:2, :G], G)[0], torch.zeros(1, G))
