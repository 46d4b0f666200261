"""The few-row C linear kernels (bf16 GEMV, int4 weight-only) against PyTorch references."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tokenmill.layers import cpu_kernels
from tokenmill.layers.linear import OneDNNPackedLinear, pack_linears_for_onednn
from tokenmill.layers.quantized import Int4Linear

HAS_BF16 = cpu_kernels.bf16_gemv_available()
HAS_INT4 = cpu_kernels.int4_available()
needs_bf16 = pytest.mark.skipif(not HAS_BF16, reason="no C compiler or AVX-512 for the bf16 GEMV kernel")
needs_int4 = pytest.mark.skipif(not HAS_INT4, reason="no C compiler or AVX512-BF16 for the int4 kernel")


def _assert_bf16_close(
    got: torch.Tensor, ref: torch.Tensor, magnitude: torch.Tensor, rounded: torch.Tensor | None = None
) -> None:
    """``got`` (bf16) is the float32 ``ref`` rounded to bf16, up to one bf16 step and the
    float32 summation order (bounded by eps times the sum of |products|, ``magnitude``).
    ``rounded``: a value also rounded to bf16 on the way (the product before the bias)."""
    assert got.dtype == torch.bfloat16 and got.shape == ref.shape
    err = (got.float() - ref).abs()
    bound = (ref.abs() + (0 if rounded is None else rounded.abs())) * 2.0**-8 + magnitude * 1e-5 + 1e-6
    assert (err <= bound).all(), float((err - bound).max())


# -- bf16 GEMV ---------------------------------------------------------------------------------------------
BF16_SHAPES = [
    (1, 1, 1),
    (1, 200, 96),
    (2, 37, 1000),
    (3, 5, 33),
    (4, 576, 576),
    (1, 13, 31),
    (4, 7, 65),
    # the tiled product: row counts past each tile of 4, weight rows past each tile and block
    (5, 37, 1000),
    (6, 3, 31),
    (13, 17, 65),
    (16, 576, 576),
    (33, 70, 96),
    (64, 100, 2048),
]


@needs_bf16
@pytest.mark.parametrize("M,N,K", BF16_SHAPES, ids=str)
@pytest.mark.parametrize("bias", [False, True])
def test_bf16_gemv_equals_the_float32_product(M, N, K, bias):
    g = torch.Generator().manual_seed(M * 1000 + N + K)
    x = torch.randn(M, K, generator=g).to(torch.bfloat16)
    w = torch.randn(N, K, generator=g).to(torch.bfloat16)
    b = torch.randn(N, generator=g).to(torch.bfloat16) if bias else None
    ref = x.float() @ w.float().t() + (0 if b is None else b.float())
    got = cpu_kernels.bf16_gemv(x, w, b)
    _assert_bf16_close(got, ref, x.float().abs() @ w.float().abs().t())


@needs_bf16
def test_bf16_tiled_rows_do_not_depend_on_the_other_rows():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(64, 300, generator=g).to(torch.bfloat16)
    w = torch.randn(45, 300, generator=g).to(torch.bfloat16)
    first = cpu_kernels.bf16_gemv(x[:5], w)
    for M in (6, 8, 17, 64):
        got = cpu_kernels.bf16_gemv(x[:M], w)
        assert torch.equal(got[:5], first), M
        # and rows in a different place of their tile give the same result
        assert torch.equal(cpu_kernels.bf16_gemv(x[M - 5 : M].contiguous(), w), got[M - 5 : M]), M


@needs_bf16
def test_bf16_gemv_rejects_what_does_not_fit():
    x = torch.randn(65, 16, dtype=torch.bfloat16)
    w = torch.randn(8, 16, dtype=torch.bfloat16)
    with pytest.raises(
        ValueError, match=r"bf16_gemv: x \(65, 16\) torch.bfloat16.*1 to 4 rows, or up to 64 rows"
    ):
        cpu_kernels.bf16_gemv(x, w)
    wide = torch.randn(5, 2049, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match=r"x \(5, 2049\).*of at most 2048 inputs"):
        cpu_kernels.bf16_gemv(wide, torch.randn(3, 2049, dtype=torch.bfloat16))
    assert cpu_kernels.bf16_gemv(wide[:4], torch.randn(3, 2049, dtype=torch.bfloat16)).shape == (4, 3)
    with pytest.raises(ValueError, match=r"weight \(8, 16\) torch.float32 do not fit"):
        cpu_kernels.bf16_gemv(x[:1], w.float())


@needs_bf16
@pytest.mark.parametrize("rows", [1, 2, 4, 5, 64, 65])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("shape", [(100, 70), (2100, 8), (576, 14600)], ids=["small", "wide", "big"])
def test_packed_linear_takes_the_kernel_for_few_rows(rows, bias, shape, monkeypatch):
    torch.manual_seed(0)
    plain = nn.Linear(*shape, bias=bias).to(torch.bfloat16)
    model = nn.Sequential(plain)
    x = torch.randn(1, rows, shape[0], dtype=torch.bfloat16)
    w, b = plain.weight.detach().float(), None if plain.bias is None else plain.bias.detach().float()
    ref = F.linear(x.float(), w, b)
    if not pack_linears_for_onednn(model):
        pytest.skip("this PyTorch build has no oneDNN weight packing")
    assert isinstance(model[0], OneDNNPackedLinear)
    calls = []
    real = cpu_kernels.bf16_gemv
    monkeypatch.setattr(cpu_kernels, "bf16_gemv", lambda *a: calls.append(1) or real(*a))
    with torch.no_grad():
        got = model[0](x)
    # past 4 rows the tiled product takes layers of at most 2048 inputs and 8M weights
    assert model[0].kernel_rows() == (64 if shape == (100, 70) else 4)
    assert bool(calls) == (rows <= model[0].kernel_rows())
    assert got.shape == (1, rows, shape[1])
    _assert_bf16_close(got, ref, x.float().abs() @ w.abs().t() + (0 if b is None else b.abs()))


# -- int4 ----------------------------------------------------------------------------------------------------
def _int4_case(N, K, G, seed):
    g = torch.Generator().manual_seed(seed)
    groups = -(-K // G)
    codes = torch.randint(0, 16, (N, K), dtype=torch.uint8, generator=g)
    sz = torch.stack(
        [torch.rand(groups, N, generator=g) / 8 + 0.01, torch.randn(groups, N, generator=g) / 4], -1
    )
    sz = sz.to(torch.bfloat16)
    s = sz[..., 0].float().t().repeat_interleave(G, 1)[:, :K]
    z = sz[..., 1].float().t().repeat_interleave(G, 1)[:, :K]
    return codes, sz, (codes.float() - 8) * s + z  # the dequantized (N, K) float32 weight


INT4_SHAPES = [  # (M, N, K, G): K not a multiple of the group, N not a multiple of the 16-row block
    (1, 64, 128, 32),
    (1, 576, 576, 32),
    (2, 49, 130, 64),
    (3, 5, 33, 32),
    (4, 17, 100, 128),
    (1, 1, 4, 32),
    (9, 40, 96, 32),
    (20, 33, 70, 64),
]


@pytest.mark.parametrize("N,K,G", [(64, 128, 32), (49, 130, 64), (5, 33, 32), (1, 7, 128)], ids=str)
def test_int4_pack_round_trips(N, K, G):
    codes, _, _ = _int4_case(N, K, G, 0)
    packed = cpu_kernels.int4_pack(codes, G)
    assert packed.numel() == -(-N // 16) * 16 * (-(-K // G) * G) // 2
    assert torch.equal(cpu_kernels.int4_unpack(packed, N, K, G), codes)


@needs_int4
@pytest.mark.parametrize("M,N,K,G", INT4_SHAPES, ids=str)
def test_int4_mm_equals_the_dequantized_product(M, N, K, G):
    codes, sz, w = _int4_case(N, K, G, M * 1000 + N + K)
    x = torch.randn(M, K, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    got = cpu_kernels.int4_mm(x, cpu_kernels.int4_pack(codes, G), sz, N, G)
    _assert_bf16_close(got, x.float() @ w.t(), x.float().abs() @ w.abs().t())


@needs_int4
def test_int4_mm_rejects_what_does_not_fit():
    codes, sz, _ = _int4_case(32, 64, 32, 0)
    packed = cpu_kernels.int4_pack(codes, 32)
    with pytest.raises(
        ValueError, match=r"int4_mm: x \(1, 64\) torch.float32.*an \(32, 64\) weight in groups of 32"
    ):
        cpu_kernels.int4_mm(torch.randn(1, 64), packed, sz, 32, 32)
    with pytest.raises(ValueError, match=r"1024 packed bytes and scales \(2, 32, 2\) .* \(48, 64\) weight"):
        cpu_kernels.int4_mm(torch.randn(1, 64, dtype=torch.bfloat16), packed, sz, 48, 32)


@needs_int4
@pytest.mark.parametrize("rows", [1, 3, 8, 33])
def test_int4_linear_runs_the_kernel_and_keeps_its_codes(rows, monkeypatch):
    g = torch.Generator().manual_seed(rows)
    w = torch.randn(192, 576, generator=g).to(torch.bfloat16)
    b = torch.randn(192, generator=g).to(torch.bfloat16)
    layer = Int4Linear.from_float(w, b, 32)
    assert layer.own_kernel and layer.layout == "cpu" and layer.kernel == "tokenmill.int4_mm"
    assert layer.qweight.numel() == 192 * 576 // 2  # still two codes per byte
    plain = Int4Linear.from_float(w, b, 32, layout="plain")
    assert torch.equal(layer.codes(), plain.codes())
    x = torch.randn(rows, 576, generator=g).to(torch.bfloat16)
    ref = layer(x, use_kernel=False)  # the dequantized weight through F.linear
    got = layer(x)
    wd = layer.dequantized_weight()
    prod = x.float() @ wd.t()  # rounded to bf16 before the bias is added
    mag = x.float().abs() @ wd.abs().t() + b.float().abs()
    _assert_bf16_close(got, prod + b.float(), mag, prod)
    # the plain path rounds its weight to bf16 first: within a few bf16 steps of each other
    torch.testing.assert_close(got.float(), ref.float(), atol=0.1, rtol=0.02)
    # without the kernel (no compiler, no AVX512-BF16) the layer keeps PyTorch's layout
    monkeypatch.setattr(cpu_kernels, "int4_available", lambda: False)
    aten = Int4Linear.from_float(w, b, 32)
    assert not aten.own_kernel and aten.kernel in ("_weight_int4pack_mm_for_cpu", None)
    assert torch.equal(aten.codes(), layer.codes())
    _assert_bf16_close(aten(x), prod + b.float(), mag, prod)


@needs_int4
def test_int4_linear_with_float32_input_dequantizes():
    w = torch.randn(32, 64).to(torch.bfloat16)
    layer = Int4Linear.from_float(w, None, 32)
    x = torch.randn(2, 64)
    torch.testing.assert_close(layer(x), x @ layer.dequantized_weight().t(), atol=1e-4, rtol=1e-4)


def test_kernels_switched_off_leave_the_pytorch_paths():
    code = (
        "import torch\n"
        "from torch import nn\n"
        "from tokenmill.layers import cpu_kernels\n"
        "from tokenmill.layers.linear import pack_linears_for_onednn\n"
        "from tokenmill.layers.quantized import Int4Linear\n"
        "assert not cpu_kernels.bf16_gemv_available() and not cpu_kernels.int4_available()\n"
        "w = torch.randn(32, 64).to(torch.bfloat16)\n"
        "q = Int4Linear.from_float(w, None, 32)\n"
        "assert not q.own_kernel\n"
        "x = torch.randn(1, 64).to(torch.bfloat16)\n"
        "torch.testing.assert_close(q(x).float(), x.float() @ q.dequantized_weight().t(), atol=0.05, rtol=0.02)\n"
        "m = nn.Sequential(nn.Linear(64, 32).to(torch.bfloat16))\n"
        "want = m(x)\n"
        "pack_linears_for_onednn(m)\n"
        "torch.testing.assert_close(m[0](x), want)\n"
        "print('ok')\n"
    )
    env = {**os.environ, "TOKENMILL_CPU_KERNELS": "0"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


# -- building the library ----------------------------------------------------------------------------------
def test_a_compiler_that_fails_leaves_the_pytorch_paths_and_says_why(tmp_path, monkeypatch, caplog):
    fake = tmp_path / "cc"
    fake.write_text("#!/bin/sh\necho 'fatal: no room on the device' >&2\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.setenv("CC", str(fake))
    monkeypatch.setenv("TOKENMILL_CACHE", str(tmp_path / "cache"))
    cpu_kernels._library.cache_clear()
    try:
        with caplog.at_level("WARNING", logger="tokenmill.kernels"):
            assert cpu_kernels._library() is None
        assert "CPU kernels unavailable" in caplog.text and "using the PyTorch paths" in caplog.text
        assert "fatal: no room on the device" in caplog.text  # the compiler's own words
        assert not list((tmp_path / "cache").rglob("*.so"))  # nothing half-built is left to load
    finally:
        cpu_kernels._library.cache_clear()  # the next call loads the real library again


def test_the_library_builds_from_scratch(tmp_path, monkeypatch):
    monkeypatch.setenv("TOKENMILL_CACHE", str(tmp_path))
    cpu_kernels._library.cache_clear()
    try:
        lib = cpu_kernels._library()
        if lib is None:
            pytest.skip("no C compiler here")
        (built,) = (tmp_path / "kernels").glob("tokenmill_kernels-*.so")
        assert [p.name for p in (tmp_path / "kernels").iterdir()] == [built.name]  # no objects left over
        x = torch.ones(1, 40, dtype=torch.bfloat16)
        y = torch.empty(1, 3, dtype=torch.bfloat16)
        w = torch.ones(3, 40, dtype=torch.bfloat16)
        rc = lib.bf16_gemv(x.data_ptr(), w.data_ptr(), None, y.data_ptr(), 1, 3, 40, 1)
        assert rc == 1 or (rc == 0 and bool((y == 40).all()))  # 1: this CPU has no AVX-512
    finally:
        cpu_kernels._library.cache_clear()
