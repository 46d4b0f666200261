"""The w8a8 mode: int8 weights (one scale per output) with activations rounded to int8 per
row and group of 32, the rounding w4a8 uses.

The C kernel (``int8a8_gemm_bf16`` in kernels/int4a8_gemm.c) against
``Int8Linear.reference_a8`` (the same arithmetic in float32 PyTorch), its packed layout,
the fallbacks, and a whole model against its int8 self.
"""

from __future__ import annotations

import copy

import pytest
import torch

import tiny
from tokenmill.layers import cpu_kernels
from tokenmill.layers.attention import DenseAttention
from tokenmill.layers.quantized import Int8Linear, quantize_activations, quantize_model

needs_kernel = pytest.mark.skipif(not cpu_kernels.int8a8_available(), reason="no AVX512-VNNI kernel here")


def _layer(N: int, K: int, dtype=torch.bfloat16, bias: bool = True, seed: int = 0) -> Int8Linear:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(N, K, generator=g) * 0.5
    w[:, 0] += 3.0  # an outlier column
    b = torch.randn(N, generator=g) if bias else None
    return Int8Linear.from_float(w, b, dtype=dtype, act8=True)


def _x(M: int, K: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=g) * torch.logspace(-1, 1, M).unsqueeze(1)
    x[0, :5] = 0
    return x.bfloat16()


def test_reference_is_the_codes_times_the_rounded_activations():
    """Written out by hand: per output, scale * sum_g a_g * sum q * xq + bias."""
    layer = _layer(24, 70, dtype=torch.float32)
    x = _x(3, 70).float()
    q, s, b = layer.codes().double(), layer.scales.double(), layer.bias.double()
    xq, a = quantize_activations(x, cpu_kernels.W8A8_GROUP)
    want = torch.zeros(3, 24, dtype=torch.float64)
    for g0 in range(0, 70, 32):
        cols = slice(g0, min(g0 + 32, 70))
        want += a[:, g0 : g0 + 1].double() * (xq[:, cols].double() @ q[:, cols].t())
    want = want * s + b
    torch.testing.assert_close(
        layer.reference_a8(x).double(), want, atol=1e-4 * want.abs().max().item(), rtol=0
    )


def _assert_within_rounding(got: torch.Tensor, ref: torch.Tensor) -> None:
    """Exact integer sums on both sides; they part only in the float32 epilogue's order and
    the final rounding to bf16: half a bf16 step of each value, and a little for values
    near zero that float32 sums of larger terms give."""
    got, ref = got.float(), ref.float()
    bound = 2**-8 * ref.abs() + 2**-12 * ref.abs().max()
    assert ((got - ref).abs() <= bound).all(), ((got - ref).abs() - bound).max()


@needs_kernel
@pytest.mark.parametrize("N,K", [(64, 128), (49, 130), (576, 1536), (1536, 576), (16, 31)])
@pytest.mark.parametrize("M", [1, 5, 9, 40])
def test_kernel_equals_the_float32_reference(N, K, M):
    layer = _layer(N, K)
    assert layer.kernel == "tokenmill.int8a8_mm" and layer.fallback is None
    x = _x(M, K)
    _assert_within_rounding(layer(x), layer(x, use_kernel=False))


@needs_kernel
def test_rows_in_several_spans_equal_the_reference():
    """80 rows of 4,096 inputs: more activation codes than one span keeps in L2, so the
    blocks pass over the rows twice."""
    layer = _layer(48, 4096)
    x = _x(80, 4096)
    _assert_within_rounding(layer(x), layer(x, use_kernel=False))


@needs_kernel
def test_a_wrong_offset_or_a_dropped_group_is_caught():
    """The comparison above is tight enough to see the code offset and each group."""
    layer = _layer(32, 96, bias=False)
    x = _x(4, 96)
    ref = layer(x, use_kernel=False).float()
    step = 2**-7 * ref.abs().max().item()
    shifted = copy.deepcopy(layer)
    shifted.qweight.add_(1)  # every code one larger: off by the sum of each row's activations
    assert (shifted(x).float() - ref).abs().max() > 2 * step
    dropped = x.clone()
    dropped[:, 64:] = 0  # the last group gone
    assert (layer(dropped).float() - ref).abs().max() > 2 * step


def test_codes_round_trip_and_equal_the_int8_layers():
    w = torch.randn(49, 130)
    a8 = Int8Linear.from_float(w, None, dtype=torch.bfloat16, act8=True)
    i8 = Int8Linear.from_float(w, None, dtype=torch.bfloat16)
    assert torch.equal(a8.codes(), i8.codes())
    assert torch.equal(a8.dequantized_weight(), i8.dequantized_weight())
    q = torch.randint(-127, 128, (33, 70), dtype=torch.int8)
    assert torch.equal(cpu_kernels.int8a8_unpack(cpu_kernels.int8a8_pack(q), 33, 70), q)


def test_float32_activations_fall_back_to_the_reference_and_say_why():
    layer = _layer(32, 64, dtype=torch.float32)
    assert layer.kernel is None and not layer.own_kernel
    assert layer.fallback == "torch.float32 activations (the w8a8 kernel takes bfloat16)"
    x = _x(3, 64).float()
    torch.testing.assert_close(layer(x), layer.reference_a8(x))
    # cast to bf16 afterwards: still the reference path, and still said
    layer.to(torch.bfloat16)
    assert layer.fallback.startswith("quantized where the w8a8 kernel could not run")
    torch.testing.assert_close(layer(x.bfloat16()), layer.reference_a8(x.bfloat16()))


@needs_kernel
def test_a_packed_layer_cast_to_float32_says_it_no_longer_runs_the_kernel():
    layer = _layer(32, 64)
    assert layer.fallback is None
    layer.to(torch.float32)
    assert layer.fallback == "packed for the CPU w8a8 kernel, which takes bfloat16, not torch.float32"
    x = _x(3, 64).float()
    torch.testing.assert_close(layer(x), layer.reference_a8(x))


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    B, T = ids.shape
    with torch.inference_mode():
        return model(ids, torch.arange(T).expand(B, T), DenseAttention(None, 0, T, T - 1), None).float()


@needs_kernel
def test_w8a8_model_stays_close_to_its_int8_self():
    original = tiny.native_from_hf(tiny.hf_model("llama"), dtype=torch.bfloat16)
    a8, i8 = copy.deepcopy(original), copy.deepcopy(original)
    report = quantize_model(a8, "w8a8")
    quantize_model(i8, "int8")
    assert report.mode == "w8a8" and report.group_size is None and report.fallback == {}
    assert all(m.act8 for m in a8.modules() if isinstance(m, Int8Linear))
    assert set(report.modes.values()) == {"w8a8"}
    ids = torch.randint(0, tiny.VOCAB, (1, 24), generator=torch.Generator().manual_seed(0))
    got, ref = _logits(a8, ids), _logits(i8, ids)
    assert not torch.equal(got, ref)
    assert (got - ref).abs().max() <= 8 * 2**-7 * ref.abs().max()
    assert (got.argmax(-1) == ref.argmax(-1)).float().mean() > 0.8


@needs_kernel
def test_int8a8_mm_rejects_what_does_not_fit():
    layer = _layer(32, 64, bias=False)
    packed, s = layer.qweight, layer.scales
    with pytest.raises(
        ValueError, match=r"int8a8_mm: x \(1, 64\) torch.float32 on cpu.*an \(32, 64\) weight"
    ):
        cpu_kernels.int8a8_mm(torch.randn(1, 64), packed, s, None, 32, 64)
    with pytest.raises(ValueError, match=r"2048 packed bytes, scales \(32,\) .* an \(48, 64\) weight"):
        cpu_kernels.int8a8_mm(torch.randn(1, 64, dtype=torch.bfloat16), packed, s, None, 48, 64)
    with pytest.raises(ValueError, match=r"int8a8_mm: x \(2, 0\) torch.bfloat16"):
        cpu_kernels.int8a8_mm(torch.empty(2, 0, dtype=torch.bfloat16), packed, s, None, 32, 0)
