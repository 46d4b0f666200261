"""Float32 linear layers computed from float16 copies of their weights (CPU).

A decode step of a few rows reads every weight once and waits on memory for it. Where
the weights are exactly float16 values (a float16 checkpoint loaded as float32, such as
Whisper's CTranslate2 files), a float16 copy halves those bytes and loses nothing: the
C kernel (kernels/half_linear.c) widens each weight exactly and multiplies and adds in
float32, so the output equals ``F.linear`` up to summation order.
"""

from __future__ import annotations

import ctypes
import functools

import torch

from tokenmill.layers import cpu_kernels

#: Rows above this go to the float32 weight: from here on the product is no longer
#: bound by reading the weights, and oneDNN's blocked GEMM is faster.
MAX_ROWS = 16
#: weight rows per block of the copy's layout (HALF_ROWS in the C source)
BLOCK_ROWS = 4


@functools.cache
def _library() -> ctypes.CDLL | None:
    lib = cpu_kernels._library()
    if lib is None:
        return None
    lib.half_linear_f32.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int64] * 3 + [ctypes.c_int]
    lib.half_linear_f32.restype = ctypes.c_int
    lib.half_from_f32.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int]
    lib.half_from_f32.restype = ctypes.c_int
    # The library has a vector path only on AVX-512 CPUs; ask it with a 1 x 16 x 1 product.
    x = torch.ones(1, 16)
    w = torch.ones(BLOCK_ROWS, 16, dtype=torch.float16)
    y = torch.empty(1, 1)
    if (
        lib.half_linear_f32(x.data_ptr(), w.data_ptr(), None, y.data_ptr(), 1, 1, 16, 1) != 0
        or float(y) != 16
    ):
        return None
    return lib


def half_linear_available() -> bool:
    """Whether this machine runs the float16-weight kernel (a C compiler and AVX-512)."""
    return _library() is not None


class HalfWeight:
    """The exact float16 copy of an (N, K) float32 weight, in the kernel's layout: blocks
    of ``BLOCK_ROWS`` rows, each stored as (K / 16, BLOCK_ROWS, 16), so that the kernel
    reads one sequential stream (about three times the bandwidth of one stream per row)."""

    def __init__(self, blocked: torch.Tensor, out_features: int, in_features: int) -> None:
        self.blocked = blocked
        self.out_features = out_features
        self.in_features = in_features

    @staticmethod
    def of(weight: torch.Tensor) -> HalfWeight | None:
        """The copy, or None when a value is not exactly a float16 one (the copy would
        change the layer), the weight is not a float32 CPU tensor, or the kernel is missing."""
        if weight.dim() != 2 or weight.shape[1] % 16:
            raise ValueError(
                f"HalfWeight needs a 2-D weight with a multiple of 16 columns, got {tuple(weight.shape)}"
            )
        lib = _library()
        if lib is None or weight.dtype != torch.float32 or weight.device.type != "cpu":
            return None
        N, K = weight.shape
        src = weight.detach().contiguous()
        rows = -(-N // BLOCK_ROWS) * BLOCK_ROWS
        plain = torch.zeros(rows, K, dtype=torch.float16)  # padding rows stay zero
        # one pass: round to float16 and report whether any value changed
        if lib.half_from_f32(src.data_ptr(), plain.data_ptr(), src.numel(), torch.get_num_threads()):
            return None
        blocked = plain.view(rows // BLOCK_ROWS, BLOCK_ROWS, K // 16, 16).transpose(1, 2).contiguous()
        return HalfWeight(blocked.view(rows, K), N, K)

    def unpack(self) -> torch.Tensor:
        """The (N, K) float32 weight again."""
        rows, K = self.blocked.shape
        plain = self.blocked.view(rows // BLOCK_ROWS, K // 16, BLOCK_ROWS, 16).transpose(1, 2)
        return plain.reshape(rows, K)[: self.out_features].float()


def half_linear(x: torch.Tensor, weight: HalfWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, weight.unpack(), bias)`` for float32 CPU ``x`` (..., K) of at most
    ``MAX_ROWS`` rows. Returns (..., N) float32."""
    lib = _library()
    N, K = weight.out_features, weight.in_features
    rows = x.numel() // K
    if (
        lib is None
        or x.dtype != torch.float32
        or x.device.type != "cpu"
        or x.shape[-1] != K
        or rows > MAX_ROWS
        or (
            bias is not None
            and (bias.dtype != torch.float32 or bias.shape != (N,) or not bias.is_contiguous())
        )
    ):
        raise ValueError(
            f"half_linear: x {tuple(x.shape)} {x.dtype} does not fit the kernel for a ({N}, {K}) "
            f"weight (float32 CPU rows <= {MAX_ROWS}, last dim {K}"
            + ("" if bias is None else f", float32 bias of shape ({N},)")
            + ")"
        )
    x2 = x.reshape(rows, K).contiguous()
    out = torch.empty(rows, N, dtype=torch.float32)
    lib.half_linear_f32(
        x2.data_ptr(),
        weight.blocked.data_ptr(),
        None if bias is None else bias.data_ptr(),
        out.data_ptr(),
        rows,
        N,
        K,
        torch.get_num_threads(),
    )
    return out.view(*x.shape[:-1], N)
