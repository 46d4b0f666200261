"""The float16-weight linear kernel equals float32 ``F.linear`` on the same values."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tokenmill.layers.half_linear import MAX_ROWS, HalfWeight, half_linear, half_linear_available

pytestmark = pytest.mark.skipif(
    not half_linear_available(), reason="no float16-weight kernel here (needs a C compiler and AVX-512)"
)


def _weight(n: int, k: int) -> torch.Tensor:
    return torch.randn(n, k).half().float()


@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 8, MAX_ROWS])
@pytest.mark.parametrize(("n", "k"), [(1, 16), (2, 32), (5, 48), (33, 48), (64, 512)])
@pytest.mark.parametrize("bias", [True, False])
def test_equals_float32_linear(rows, n, k, bias):
    torch.manual_seed(rows * 1000 + n + k)
    w = _weight(n, k)
    b = torch.randn(n) if bias else None
    x = torch.randn(rows, k)
    hw = HalfWeight.of(w)
    assert hw is not None and torch.equal(hw.unpack(), w)
    got = half_linear(x, hw, b)
    # float64 reference: the kernel's products are exact in float32; only its sums round
    want = F.linear(x.double(), w.double(), None if b is None else b.double())
    assert got.dtype == torch.float32 and got.shape == (rows, n)
    scale = F.linear(x.abs().double(), w.abs().double()).amax().item() + 1.0
    assert (got.double() - want).abs().max().item() <= 2e-6 * scale


def test_leading_dims_and_strided_input():
    torch.manual_seed(0)
    w = _weight(24, 32)
    x = torch.randn(2, 3, 64)[..., ::2]  # (2, 3, 32), not contiguous
    got = half_linear(x, HalfWeight.of(w))
    assert got.shape == (2, 3, 24)
    torch.testing.assert_close(got, F.linear(x, w), atol=1e-5, rtol=1e-5)


def test_copies_only_of_exact_float16_values():
    w = torch.randn(8, 48)
    assert HalfWeight.of(w) is None  # float32 values a float16 copy would round
    exact = w.half().float()
    exact[3, 45] = 65504.0  # float16's largest
    exact[5, 47] = 2.0**-24  # its smallest subnormal
    copy = HalfWeight.of(exact)
    assert copy is not None and torch.equal(copy.unpack(), exact)
    for bad in (2.0**-26, 70000.0, float("nan")):  # rounds to zero, overflows, NaN
        exact[5, 47] = bad
        assert HalfWeight.of(exact) is None
    assert HalfWeight.of(w.half()) is None  # only float32 weights are copied
    assert HalfWeight.of(w.half().float()[:, :32]) is not None  # any layout
    with pytest.raises(ValueError, match=r"multiple of 16 columns, got \(8, 12\)"):
        HalfWeight.of(torch.zeros(8, 12))


def test_misfits_are_refused_with_the_shapes():
    hw = HalfWeight.of(torch.zeros(4, 32))
    with pytest.raises(ValueError, match=r"x \(17, 32\) torch.float32 does not fit.*\(4, 32\).*rows <= 16"):
        half_linear(torch.zeros(17, 32), hw)
    with pytest.raises(ValueError, match="torch.bfloat16 does not fit the kernel"):
        half_linear(torch.zeros(1, 32, dtype=torch.bfloat16), hw)
    with pytest.raises(ValueError, match="last dim 32"):
        half_linear(torch.zeros(1, 16), hw)
    with pytest.raises(ValueError, match=r"float32 bias of shape \(4,\)"):
        half_linear(torch.zeros(1, 32), hw, torch.zeros(5))
