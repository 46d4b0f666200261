"""Weight-only int8/int4 layers: the packed kernels against the dequantized reference, the
quantization error against the original weight, whole models, and the error messages.

Tolerances: the fast path is compared with ``x @ dequantized_weight().T`` computed in
float32. fp32 activations: ``atol=1e-4``. bf16 activations: one bf16 step at the largest
output, ``2**-7 * max|ref|`` (both paths accumulate in fp32 and round the result; the
dequantize-then-matmul path also rounds the weight to bf16, which stays well inside that).
"""

from __future__ import annotations

import copy
import weakref

import pytest
import torch
from torch import nn

import tiny
from tokenmill.layers import cpu_kernels
from tokenmill.layers.attention import DenseAttention
from tokenmill.layers.quantized import (
    Int4Linear,
    Int8Linear,
    check_quantization,
    quantize_model,
)

HAS_INT4_CPU = hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu")
HAS_INT8 = hasattr(torch.ops.aten, "_weight_int8pack_mm")


def _weight(N: int, K: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(N, K, generator=g) * 0.5
    w[:, 0] += 3.0  # an outlier column: per-channel and per-group scales must cope
    return w, torch.randn(N, generator=g)


def _exact(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The reference: float32 matmul with the dequantized weight."""
    out = x.float() @ layer.dequantized_weight().t()
    return out if layer.bias is None else out + layer.bias.float()


def _close(
    got: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, slack: torch.Tensor | None = None
) -> None:
    if dtype == torch.float32:
        torch.testing.assert_close(got.float(), ref, atol=1e-4, rtol=1e-5)
    elif slack is None:
        step = 2**-7 * ref.abs().max().item()
        torch.testing.assert_close(got.float(), ref, atol=step, rtol=0)
    else:  # one step of the largest output, plus the given bound per element
        err = (got.float() - ref).abs()
        assert bool((err <= 2**-7 * ref.abs().max() + slack).all()), float((err - slack).max())


# Shapes (N, K): kernel-friendly ones, and odd ones that must fall back.
SHAPES = [(64, 128), (48, 96), (49, 130), (16, 33), (3, 7)]
DTYPES = [torch.float32, torch.bfloat16]
ROWS = [1, 5, 40]  # without tokenmill's int8 kernel: 1 and 5 rows take PyTorch's, 40 the converted weight


# -- int8 ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("own", [True, False], ids=["own kernel", "pytorch kernels"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_int8_fast_path_equals_the_dequantized_reference(shape, dtype, own, monkeypatch):
    if not own:  # PyTorch's int8 kernel and the converted-weight matmul, as without AVX512-BF16
        monkeypatch.setattr(cpu_kernels, "int8_available", lambda: False)
    w, b = _weight(*shape)
    layer = Int8Linear.from_float(w.to(dtype), b.to(dtype))
    assert layer.qweight.dtype == torch.int8 and layer.scales.dtype == dtype
    g = torch.Generator().manual_seed(1)
    for rows in ROWS:
        x = torch.randn(2, rows, shape[1], generator=g).to(dtype)  # a leading batch dimension is kept
        x2 = x.reshape(-1, shape[1])
        ref = _exact(layer, x2)
        # bf16 rows past the kernel's take the weight rounded to bf16: each product may move
        # by 2**-8 of itself, on top of the one step of the rounded output.
        slack = 2**-8 * (x2.float().abs() @ layer.dequantized_weight().abs().t())
        out = layer(x)
        assert out.shape == (2, rows, shape[0]) and out.dtype == dtype
        _close(out.reshape(-1, shape[0]), ref, dtype, slack)
        _close(layer(x, use_kernel=False).reshape(-1, shape[0]), ref, dtype, slack)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_int8_error_is_at_most_half_a_step_per_channel(shape):
    w, _ = _weight(*shape)
    layer = Int8Linear.from_float(w)
    err = (layer.dequantized_weight() - w).abs()
    step = layer.scales.float().unsqueeze(1)
    assert (err <= step / 2 * (1 + 1e-6)).all()
    assert err.mean() <= 0.3 * step.mean()  # rounding to nearest: a quarter step on average
    # and that step is the row's largest magnitude over 127
    torch.testing.assert_close(layer.scales, w.abs().amax(1) / 127)


@pytest.mark.skipif(not HAS_INT8, reason="this PyTorch has no int8 kernel")
def test_int8_bf16_kernel_is_skipped_where_it_is_wrong(monkeypatch):
    """torch 2.13's bf16 int8 kernel needs in_features % 16 == 0; other widths take the
    fallback (where this package's own int8 kernel is not there to take them)."""
    monkeypatch.setattr(cpu_kernels, "int8_available", lambda: False)
    w, _ = _weight(8, 130)
    layer = Int8Linear.from_float(w.to(torch.bfloat16))
    assert layer.fallback == "in_features 130 is not a multiple of 16, which the bf16 kernel needs"
    assert Int8Linear.from_float(w.float()).fallback is None  # fp32 is right at any width
    assert Int8Linear.from_float(_weight(8, 128)[0].to(torch.bfloat16)).fallback is None


@pytest.mark.skipif(not cpu_kernels.int8_available(), reason="no int8 kernel here (C compiler, AVX512-BF16)")
@pytest.mark.parametrize("shape", [(64, 130), (49, 33), (3, 7), (1000, 576)], ids=str)
def test_own_int8_kernel_takes_every_width_and_keeps_the_codes(shape):
    """The package's kernel takes any K and N (padding odd K and partial blocks of 16) at
    every row count, and its layout gives the codes back exactly."""
    w, b = _weight(*shape, seed=2)
    layer = Int8Linear.from_float(w.to(torch.bfloat16), b.to(torch.bfloat16))
    assert layer.kernel == "tokenmill.int8_mm" and layer.fallback is None
    wf = w.to(torch.bfloat16).float()  # the codes as quantization defines them
    scales = (wf.abs().amax(1) / 127).clamp(min=1e-8).to(torch.bfloat16)
    want = torch.round(wf / scales.float().unsqueeze(1)).clamp(-127, 127).to(torch.int8)
    assert torch.equal(layer.codes(), want) and torch.equal(layer.scales, scales)
    g = torch.Generator().manual_seed(3)
    for rows in (1, 7, 8, 9, 16, 17, 40, 300):  # 300 rows at K = 576: two spans of rows
        x = torch.randn(rows, shape[1], generator=g).to(torch.bfloat16)
        _close(layer(x), _exact(layer, x), torch.bfloat16)
    # float32 activations with the packed codes: the same product through PyTorch
    x = torch.randn(3, shape[1], generator=g)
    _close(layer(x), _exact(layer, x), torch.float32)


def test_int8_mm_rejects_what_does_not_fit():
    layer = Int8Linear.from_float(_weight(16, 64)[0].to(torch.bfloat16))
    if not layer.own_kernel:
        pytest.skip("no int8 kernel here")
    zeros = torch.zeros(2, 63, dtype=torch.bfloat16)  # 63 inputs pad to the same 64-wide layout
    with pytest.raises(
        ValueError,
        match=r"int8_mm: x \(2, 63\) torch.bfloat16 on cpu, 1024 packed bytes.* an \(16, 64\) weight",
    ):
        cpu_kernels.int8_mm(zeros, layer.qweight, layer.scales, None, 16, 64)
    with pytest.raises(ValueError, match="do not fit"):  # scales of another layer
        cpu_kernels.int8_mm(
            zeros[:, :1].expand(2, 64).contiguous(), layer.qweight, layer.scales[:8], None, 16, 64
        )


# -- int4 ---------------------------------------------------------------------------------------------------
@pytest.mark.skipif(not HAS_INT4_CPU, reason="this PyTorch has no CPU int4 kernel")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_int4_kernel_computes_q_minus_8_times_scale_plus_zero(dtype):
    """The semantics everything else relies on, checked on the raw op: w = (q - 8) * s + z with
    scales_and_zeros of shape (K / G, N, 2), and the kernel taking (N, K) int32 codes to pack."""
    g = torch.Generator().manual_seed(0)
    N, K, G = 32, 128, 32
    q = torch.randint(0, 16, (N, K), dtype=torch.int32, generator=g)
    s = torch.rand(K // G, N, generator=g) + 0.5
    z = torch.randn(K // G, N, generator=g)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
    x = torch.randn(3, K, generator=g).to(dtype)
    out = torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, G, torch.stack([s, z], -1).to(dtype))
    sz = torch.stack([s, z], -1).to(dtype).float()
    w = (q.float() - 8) * sz[..., 0].t().repeat_interleave(G, 1) + sz[..., 1].t().repeat_interleave(G, 1)
    _close(out, x.float() @ w.t(), dtype)
    # not w = q * s + z, the other common convention
    wrong = q.float() * sz[..., 0].t().repeat_interleave(G, 1) + sz[..., 1].t().repeat_interleave(G, 1)
    assert (out.float() - x.float() @ wrong.t()).abs().max() > 1


INT4_CASES = [
    # (N, K, group, dtype, layout expected on CPU, fallback reason or None)
    (64, 128, 32, torch.bfloat16, "cpu", None),
    (64, 128, 64, torch.bfloat16, "cpu", None),
    (64, 256, 128, torch.bfloat16, "cpu", None),
    (48, 96, 64, torch.bfloat16, "plain", "in_features 96 is not a multiple of the group size 64"),
    (48, 80, 32, torch.bfloat16, "plain", "in_features 80 is not a multiple of the group size 32"),
    (49, 128, 32, torch.bfloat16, "plain", "out_features 49 is not a multiple of 16"),
    (5, 33, 32, torch.bfloat16, "plain", "in_features 33 is not a multiple of the group size 32"),
    (64, 128, 32, torch.float32, "plain", "torch.float32 activations"),
    (49, 130, 64, torch.float32, "plain", "torch.float32 activations"),
]


@pytest.mark.parametrize("N,K,G,dtype,layout,reason", INT4_CASES, ids=lambda v: str(v))
def test_int4_fast_path_equals_the_dequantized_reference(N, K, G, dtype, layout, reason):
    w, b = _weight(N, K)
    layer = Int4Linear.from_float(w.to(dtype), b.to(dtype), G)
    if not HAS_INT4_CPU:
        layout = "plain"
    assert layer.layout == layout
    assert (layer.fallback is None) == (reason is None)
    if reason is not None:
        assert layer.fallback.startswith(reason), layer.fallback
    assert layer.scales_and_zeros.shape == (-(-K // G), N, 2)
    for rows in ROWS:
        x = torch.randn(rows, K).to(dtype)
        ref = _exact(layer, x)
        _close(layer(x), ref, dtype)
        _close(layer(x, use_kernel=False), ref, dtype)


@pytest.mark.parametrize("N,K,G,dtype,layout,reason", INT4_CASES, ids=lambda v: str(v))
def test_int4_error_is_at_most_half_a_step_per_group(N, K, G, dtype, layout, reason):
    w, _ = _weight(N, K)
    layer = Int4Linear.from_float(w.to(dtype), None, G)
    w = w.to(dtype).float()
    sz = layer.scales_and_zeros.float()
    s = sz[..., 0].t().repeat_interleave(G, 1)[:, :K]
    z = sz[..., 1].t().repeat_interleave(G, 1)[:, :K]
    # Half a step, plus what rounding the scale and zero to the activation dtype can move the grid.
    eps = torch.finfo(dtype).eps
    bound = s / 2 + (z.abs() + 24 * s) * eps + 1e-6
    err = (layer.dequantized_weight() - w).abs()
    assert (err <= bound).all()
    assert err.mean() <= 0.3 * s.mean()  # rounding to nearest: a quarter step on average


@pytest.mark.skipif(not HAS_INT4_CPU, reason="this PyTorch has no CPU int4 kernel")
def test_int4_codes_read_back_from_the_kernel_layout():
    w, _ = _weight(64, 192)
    packed = Int4Linear.from_float(w.to(torch.bfloat16), None, 64)
    plain = Int4Linear.from_float(w.to(torch.bfloat16), None, 64, layout="plain")
    assert packed.layout == "cpu" and plain.layout == "plain"
    assert packed.qweight.numel() == plain.qweight.numel() == 64 * 192 // 2  # two codes per byte
    assert torch.equal(packed.codes(), plain.codes())
    assert int(plain.codes().max()) <= 15


def test_int4_rejects_a_bad_group_size_and_layout():
    w, _ = _weight(16, 64)
    with pytest.raises(ValueError, match=r"int4 group_size must be one of 32, 64, 128, got 16"):
        Int4Linear.from_float(w, None, 16)
    with pytest.raises(ValueError, match=r"int4 layout must be 'cpu', 'cuda' or 'plain', got 'gpu'"):
        Int4Linear.from_float(w, None, 32, layout="gpu")


@pytest.mark.skipif(not HAS_INT4_CPU, reason="this PyTorch has no CPU int4 kernel")
def test_int4_packed_for_cpu_refuses_input_elsewhere():
    layer = Int4Linear.from_float(_weight(16, 64)[0].to(torch.bfloat16))
    with pytest.raises(RuntimeError, match=r"packed for cpu but got input on meta; quantize the model on"):
        layer(torch.empty(1, 64, dtype=torch.bfloat16, device="meta"))


# -- whole models -------------------------------------------------------------------------------------------
def _logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    B, T = ids.shape
    with torch.inference_mode():
        return model(ids, torch.arange(T).expand(B, T), DenseAttention(None, 0, T, T - 1), None).float()


@pytest.mark.parametrize("mode", ["int8", "int4"])
@pytest.mark.parametrize("arch", ["llama", "llama3", "gpt2"])
def test_quantized_model_equals_its_dequantized_weights(arch, mode):
    """fp32: the quantized model and a float model holding the dequantized weights agree to 1e-4."""
    original = tiny.native_from_hf(tiny.hf_model(arch))
    model = copy.deepcopy(original)
    report = quantize_model(model, mode, group_size=32)
    assert not [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    assert "lm_head" in report.layers and report.mode == mode
    ids = torch.randint(0, tiny.VOCAB, (2, 24), generator=torch.Generator().manual_seed(0))
    ref = _logits(tiny.dequantized_copy(original, model), ids)
    torch.testing.assert_close(_logits(model, ids), ref, atol=1e-4, rtol=0)
    # and the quantized model is still the same model: greedy choices mostly agree
    agree = (_logits(model, ids).argmax(-1) == _logits(original, ids).argmax(-1)).float().mean()
    assert agree > (0.9 if mode == "int8" else 0.6)


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_bf16_quantized_model_runs_the_kernels_and_stays_close(mode):
    original = tiny.native_from_hf(tiny.hf_model("llama"), dtype=torch.bfloat16)
    model = copy.deepcopy(original)
    report = quantize_model(model, mode)
    if (mode == "int4" and HAS_INT4_CPU) or (mode == "int8" and HAS_INT8):
        assert report.fallback == {}  # every tiny llama shape fits the kernels
    ids = torch.randint(0, tiny.VOCAB, (1, 24), generator=torch.Generator().manual_seed(0))
    ref = _logits(tiny.dequantized_copy(original, model), ids)
    got = _logits(model, ids)
    # bf16 through 2 layers: a few bf16 steps of the largest logit.
    assert (got - ref).abs().max() <= 4 * 2**-7 * ref.abs().max()


def test_quantize_model_frees_weights_keeps_attributes_and_the_tied_embedding():
    model = tiny.native_from_hf(tiny.hf_model("llama3"))  # tied embeddings
    embed = model.model.embed_tokens.weight
    assert model.lm_head.weight is embed
    gone = weakref.ref(model.model.layers[0].mlp.down_proj.weight)
    shards = list(model.model.layers[0].self_attn.qkv_proj.shard_sizes)
    quantize_model(model, "int8")
    assert gone() is None  # the full-precision weight is freed
    assert isinstance(model.lm_head, Int8Linear)
    assert model.model.embed_tokens.weight is embed and embed.dtype == torch.float32
    qkv = model.model.layers[0].self_attn.qkv_proj
    assert isinstance(qkv, Int8Linear) and qkv.shard_sizes == shards
    assert (qkv.in_features, qkv.out_features) == (64, 128)
    # every remaining parameter is an embedding or a norm
    assert all(p.dim() == 1 or "embed" in n for n, p in model.named_parameters())


def test_quantize_model_none_changes_nothing():
    model = tiny.native_from_hf(tiny.hf_model("llama"))
    before = model.lm_head
    assert quantize_model(model, None) is None and quantize_model(model, "none") is None
    assert model.lm_head is before


def test_unknown_mode_and_group_size_name_the_valid_ones():
    model = tiny.native_from_hf(tiny.hf_model("llama"))
    with pytest.raises(
        ValueError,
        match=r"quantization must be one of 'int8', 'int4', 'w4a8', 'w8a8', 'gguf' or None \('none'\), got 'int3'",
    ):
        quantize_model(model, "int3")
    with pytest.raises(
        ValueError,
        match=r"quantization must be one of 'int8', 'int4', 'w4a8', 'w8a8', 'gguf' or None \('none'\), got 8",
    ):
        check_quantization(8)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"int4 group_size must be one of 32, 64, 128, got 48"):
        quantize_model(model, "int4", group_size=48)
    assert isinstance(model.lm_head, nn.Linear)  # nothing was touched
    assert check_quantization("INT4") == "int4"


def test_prequantized_codes_are_used_only_when_they_match_the_weight(caplog):
    """Codes from a file (GGUF Q4 blocks) replace quantization only if they dequantize to the loaded weight."""
    model = tiny.native_from_hf(tiny.hf_model("llama"))
    w = model.lm_head.weight.detach()
    exact = Int4Linear.from_float(w, None, 32, layout="plain")
    codes = exact.codes()
    scales, zeros = exact.scales_and_zeros[..., 0].t(), exact.scales_and_zeros[..., 1].t()
    # Make the float weight exactly what the codes encode, as a loader's dequantization would.
    with torch.no_grad():
        model.lm_head.weight.copy_(exact.dequantized_weight())
        model.model.layers[0].mlp.down_proj.weight.mul_(-1)
    down = Int4Linear.from_float(model.model.layers[0].mlp.down_proj.weight.neg(), None, 32, layout="plain")
    sources = {
        "lm_head": lambda: (codes, scales, zeros),
        # codes of the weight before it was negated: a layout mistake, which must not pass
        "model.layers.0.mlp.down_proj": lambda: (
            down.codes(),
            down.scales_and_zeros[..., 0].t(),
            down.scales_and_zeros[..., 1].t(),
        ),
    }
    with caplog.at_level("WARNING", logger="tokenmill.quantization"):
        report = quantize_model(model, "int4", sources=sources)
    assert report.from_source == ["lm_head"]
    assert torch.equal(model.lm_head.codes(), codes)
    assert (
        "model.layers.0.mlp.down_proj: its prequantized int4 blocks do not match the loaded weight"
        in caplog.text
    )
