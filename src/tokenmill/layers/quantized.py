"""Int8 and int4 linear layers whose weights stay quantized in memory.

In int8 and int4 the activations stay in the model's dtype (w4a8 and w8a8 round them to
int8 too, below); only the weights shrink. Each layer runs one of
PyTorch's packed kernels where this build has one for the device, dtype and shape, and
otherwise dequantizes its weight and calls an ordinary matmul, which is never silently
wrong, only slower:

- int8: on CPU with bf16 activations this package's C kernel (``cpu_kernels.int8_mm``,
  kernels/int8_gemm.c: the codes widened to bf16 in registers, float32 sums; 30 SmolLM2
  layers 1.3x PyTorch's int8 kernel for one row, 1.5x at 16 rows, 0.85x at 512) at every
  batch size where the machine has AVX512-BF16 and a C compiler. Elsewhere
  ``aten._weight_int8pack_mm`` for decode-sized batches: on CPU up to 8 rows in bf16
  (only when in_features is a multiple of 16, see ``Int8Linear._kernel_fits``) and 1 row
  in fp16/fp32 (those CPU kernels are scalar); on CUDA, where the build registers it, up
  to 16 rows in bf16/fp16. More rows take oneDNN/cuBLAS on the weight converted to the
  activation dtype.
- int4: on CPU with bf16 activations this package's C kernel (``cpu_kernels.int4_mm``,
  kernels/int4_gemv.c: 1.0-1.8x PyTorch's for a decode row on one core of the project's
  AVX-512 machine, the LM head most, and no slower for prefill) where
  the machine has AVX512-BF16 and a C compiler, else ``aten._weight_int4pack_mm_for_cpu``;
  ``aten._weight_int4pack_mm`` on CUDA (bf16); at every batch size. fp16/fp32 activations and shapes the kernels reject
  (in_features not a multiple of the group size, out_features not a multiple of 16 on
  CPU or 8 on CUDA) keep the codes in a plain layout and dequantize on each call.

- w4a8: int4 weights as above, and the activations rounded to int8 per row and group of
  ``group_size`` inputs as each layer runs (``quantize_activations``), so that the CPU
  kernel (``cpu_kernels.int4a8_mm``, kernels/int4a8_gemm.c, AVX512-VNNI and -BF16) does twice the
  multiply-adds per instruction of the bf16 one; the extra rounding is the cost, measured
  in perplexity. Without the kernel (another device or dtype, no VNNI) the layer computes
  the same thing in float32 (``Int4Linear.reference_a8``).

- w8a8: int8 weights, the activations rounded the same way in groups of 32
  (``cpu_kernels.W8A8_GROUP``), 8-bit integer dot products in the CPU kernel
  (``cpu_kernels.int8a8_mm``, kernels/int4a8_gemm.c); without it the layer computes the
  same thing in float32 (``Int8Linear.reference_a8``).

Int8 is symmetric per output channel: ``w = q * scale``, q in [-127, 127]. Int4 is
asymmetric per group of ``group_size`` input features: ``w = (q - 8) * scale + zero``,
q in [0, 15], which is exactly what the int4 kernels compute from ``scales_and_zeros``
of shape (K / group_size, N, 2) (checked in tests/unit/test_quantized.py).

Scales and zero points are stored in the activation dtype, as the kernels need them,
and codes are chosen against the rounded scales, so the dequantized weight that the
reference path uses is exactly what the kernel computes with.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from tokenmill.layers import cpu_kernels

log = logging.getLogger("tokenmill.quantization")

QUANTIZATION_MODES = ("int8", "int4", "w4a8", "w8a8", "gguf")
#: what one layer can be made of: a mode above, or "none" to keep it in floating point
LAYER_MODES = ("int8", "int4", "w4a8", "w8a8", "none")
INT4_GROUP_SIZES = (32, 64, 128)

# Rows up to which the int8 kernel beats dequantize-then-matmul on CPU (torch 2.13): the
# bf16 kernel is up to 2x faster than a bf16 GEMV for one row, even at four, and about as
# fast as converting the weight and calling oneDNN at eight (the LM head gains, small
# layers lose a little); the fp16 and fp32 kernels are scalar, so only one row gains.
# On CUDA (not run here: no GPU) bf16/fp16 decode batches take the kernel.
_INT8_KERNEL_MAX_ROWS = {torch.bfloat16: 8, torch.float16: 1, torch.float32: 1}
_INT8_KERNEL_MAX_ROWS_CUDA = 16
# Rows of a prequantized weight checked against the loaded one.
_CHECK_ROWS = 256
# Identity rows per kernel call when reading int4 codes back from a packed layout.
_UNPACK_CHUNK = 1024

#: (codes (N, K) uint8 in [0, 15], scales (N, K / 32), zeros (N, K / 32)) of a prequantized weight
Int4Source = Callable[[], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


def check_quantization(mode: str | None) -> str | None:
    """The canonical mode name ("int8", "int4", "w4a8", "w8a8", "gguf") or None for no quantization."""
    if mode is None or (isinstance(mode, str) and mode.lower() == "none"):
        return None
    if isinstance(mode, str) and mode.lower() in QUANTIZATION_MODES:
        return mode.lower()
    raise ValueError(
        f"quantization must be one of 'int8', 'int4', 'w4a8', 'w8a8', 'gguf' or None ('none'), got {mode!r}"
    )


def check_group_size(group_size: int) -> int:
    if isinstance(group_size, bool) or group_size not in INT4_GROUP_SIZES:
        raise ValueError(f"int4 group_size must be one of 32, 64, 128, got {group_size!r}")
    return group_size


@functools.cache
def _has_kernel(op: str, device_type: str) -> bool:
    """Whether this PyTorch build registers ``aten::op`` for the device (CPU-only builds have no CUDA ones)."""
    key = {"cpu": "CPU", "cuda": "CUDA"}.get(device_type)
    if key is None or not hasattr(torch.ops.aten, op):
        return False
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"aten::{op}", key)


def _rows(x: torch.Tensor, in_features: int) -> torch.Tensor:
    return x.reshape(-1, in_features).contiguous()  # (M, K); the kernels need a contiguous last dim


class Int8Linear(nn.Module):
    """``nn.Linear`` with an int8 weight (N, K) and one scale per output channel.

    Buffers: ``qweight`` int8 codes, ``scales`` (N,) and ``bias`` (N,) or None in the
    activation dtype. On CPU with bf16 scales and this package's int8 kernel
    (``cpu_kernels.int8_mm``, AVX512-BF16) the codes are kept in that kernel's layout
    (``own_kernel``); otherwise as the (N, K) matrix PyTorch's kernel takes. ``codes()``
    gives the (N, K) matrix either way.

    With ``act8`` (the "w8a8" layers) the activations are rounded to int8 per row and
    group of ``cpu_kernels.W8A8_GROUP`` inputs as the layer runs, as in w4a8, and the
    products are 8-bit integer dot products (``cpu_kernels.int8a8_mm``, AVX512-VNNI and
    -BF16, codes as q + 128 in its own layout); without that kernel the layer computes
    the same thing in float32 (``reference_a8``).
    """

    def __init__(
        self,
        qweight: torch.Tensor,
        scales: torch.Tensor,
        bias: torch.Tensor | None = None,
        act8: bool = False,
    ) -> None:
        super().__init__()
        self.out_features, self.in_features = qweight.shape
        self.act8 = act8
        if act8:
            available, pack = cpu_kernels.int8a8_available, cpu_kernels.int8a8_pack
        else:
            available, pack = cpu_kernels.int8_available, cpu_kernels.int8_pack
        self.own_kernel = qweight.device.type == "cpu" and scales.dtype == torch.bfloat16 and available()
        self.register_buffer("qweight", pack(qweight) if self.own_kernel else qweight)
        self.register_buffer("scales", scales)
        self.register_buffer("bias", bias)
        if self.own_kernel:
            self.kernel: str | None = "tokenmill.int8a8_mm" if act8 else "tokenmill.int8_mm"
        elif act8:
            self.kernel = None
        else:
            self.kernel = (
                "_weight_int8pack_mm" if _has_kernel("_weight_int8pack_mm", qweight.device.type) else None
            )

    @classmethod
    def from_float(
        cls,
        weight: torch.Tensor,
        bias: torch.Tensor | None = None,
        *,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        act8: bool = False,
    ) -> Int8Linear:
        """Quantize ``weight`` (N, K) on ``device`` (default: where it is); scales in ``dtype``."""
        dtype = dtype or weight.dtype
        w = weight.detach().to(device=device, dtype=torch.float32)  # (N, K)
        scales = (w.abs().amax(dim=1) / 127).clamp(min=1e-8).to(dtype)  # (N,)
        q = torch.round(w / scales.float().unsqueeze(1)).clamp_(-127, 127).to(torch.int8)
        del w
        b = None if bias is None else bias.detach().to(device=q.device, dtype=dtype)
        return cls(q, scales, b, act8=act8)

    def codes(self) -> torch.Tensor:
        """The (N, K) int8 codes."""
        if self.own_kernel:
            unpack = cpu_kernels.int8a8_unpack if self.act8 else cpu_kernels.int8_unpack
            return unpack(self.qweight, self.out_features, self.in_features)
        return self.qweight

    def dequantized_weight(self) -> torch.Tensor:
        """The weight the layer computes with, (N, K) float32: the reference."""
        return self.codes().float() * self.scales.float().unsqueeze(1)

    @property
    def fallback(self) -> str | None:
        """Why this layer never runs the kernel, or None."""
        mode = "w8a8" if self.act8 else "int8"
        if self.own_kernel:
            # moved or cast after it was built: codes() unpacks on each call
            if not self.qweight.is_cpu:
                return f"packed for the CPU {mode} kernel, running on {self.qweight.device.type}"
            if self.scales.dtype != torch.bfloat16:
                return f"packed for the CPU {mode} kernel, which takes bfloat16, not {self.scales.dtype}"
            return None
        if self.act8:
            return _a8_fallback(self.scales.dtype, self.qweight.device, "w8a8") or (
                "quantized where the w8a8 kernel could not run (another device or dtype), "
                "so its codes are not in the kernel's layout"
            )
        if self.kernel is None:
            return f"this PyTorch build has no int8 kernel for {self.qweight.device.type}"
        if self.scales.dtype == torch.bfloat16 and self.in_features % 16 and self.qweight.is_cpu:
            return f"in_features {self.in_features} is not a multiple of 16, which the bf16 kernel needs"
        return None

    def _kernel_fits(self, x2: torch.Tensor) -> bool:
        if x2.device.type == "cuda":  # bf16/fp16 only: what gpt-fast-style int8 decode uses there
            return x2.dtype != torch.float32 and x2.shape[0] <= _INT8_KERNEL_MAX_ROWS_CUDA
        # The bf16 CPU kernel (torch 2.13) returns garbage, or crashes, unless K is a multiple
        # of 16: found by sweeping K, N and M against the reference (fp16 and fp32 were right).
        if x2.dtype == torch.bfloat16 and self.in_features % 16:
            return False
        return x2.shape[0] <= _INT8_KERNEL_MAX_ROWS.get(x2.dtype, 0)

    def forward(self, x: torch.Tensor, use_kernel: bool = True) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = _rows(x, self.in_features)  # (M, K)
        own = self.own_kernel and x2.dtype == torch.bfloat16 and x2.is_cpu and self.qweight.is_cpu
        if self.act8:
            if use_kernel and own:
                out = cpu_kernels.int8a8_mm(
                    x2.contiguous(), self.qweight, self.scales, self.bias, self.out_features, self.in_features
                )
            else:
                out = self.reference_a8(x2)
        elif not use_kernel:
            out = F.linear(x2, self.dequantized_weight().to(x.dtype), self.bias)
        elif own:
            out = cpu_kernels.int8_mm(
                x2.contiguous(), self.qweight, self.scales, self.bias, self.out_features, self.in_features
            )
        elif not self.own_kernel and self.kernel is not None and self._kernel_fits(x2):
            out = torch.ops.aten._weight_int8pack_mm(x2, self.qweight, self.scales.to(x.dtype))
            if self.bias is not None:
                out = out + self.bias
        else:
            # int8 values are exact in every float dtype, so scaling after the matmul is the
            # same product, and N multiplies instead of N * K. (Packed codes, with other
            # activations or off the CPU, come back in PyTorch's layout first.)
            out = F.linear(x2, self.codes().to(x.dtype)) * self.scales.to(x.dtype)
            if self.bias is not None:
                out = out + self.bias
        return out.view(*lead, self.out_features)

    def reference_a8(self, x2: torch.Tensor) -> torch.Tensor:
        """What the w8a8 kernel computes, in float32: the codes times the activations
        rounded per group of W8A8_GROUP, scaled per output, plus the bias; in x2's dtype."""
        xq, a = quantize_activations(x2, cpu_kernels.W8A8_GROUP)
        out = F.linear(xq * a, self.codes().float()) * self.scales.float()
        if self.bias is not None:
            out = out + self.bias.float()
        return out.to(x2.dtype)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, act8={self.act8}, kernel={self.kernel}"
        )


def _int4_layout(
    out_features: int, in_features: int, group_size: int, dtype: torch.dtype, device: torch.device
) -> tuple[str, str | None]:
    """("cpu" | "cuda" | "plain", why the plain fallback was chosen or None)."""
    N, K, G = out_features, in_features, group_size
    if device.type == "cpu":
        if dtype != torch.bfloat16:
            return "plain", f"{dtype} activations (the CPU int4 kernel is fast only for bfloat16)"
        if not _has_kernel("_weight_int4pack_mm_for_cpu", "cpu"):
            return "plain", "this PyTorch build has no CPU int4 kernel"
        if K % G:
            return "plain", f"in_features {K} is not a multiple of the group size {G}"
        if N % 16:
            return "plain", f"out_features {N} is not a multiple of 16"
        return "cpu", None
    if device.type == "cuda":
        if not _has_kernel("_weight_int4pack_mm", "cuda"):
            return "plain", "this PyTorch build has no CUDA int4 kernel"
        if dtype != torch.bfloat16:
            return "plain", f"the CUDA int4 kernel takes bfloat16 activations, not {dtype}"
        if torch.cuda.get_device_capability(device) < (8, 0):
            return "plain", "the CUDA int4 kernel needs compute capability 8.0 or newer"
        if K % G:  # G is a multiple of 32, so K also fits the kernel's 16 * inner_k_tiles tiles
            return "plain", f"in_features {K} is not a multiple of the group size {G}"
        if N % 8:
            return "plain", f"out_features {N} is not a multiple of 8"
        return "cuda", None
    return "plain", f"no int4 kernel for device {device.type}"


def a8_runs(mode: str, dtype: torch.dtype, device: torch.device | str) -> bool:
    """Whether layers of ``mode`` ("w4a8" or "w8a8") with ``dtype`` activations run their
    kernel on ``device``."""
    return _a8_fallback(dtype, torch.device(device), mode) is None


def _a8_fallback(dtype: torch.dtype, device: torch.device, mode: str) -> str | None:
    """Why the w4a8 or w8a8 kernel cannot run layers with ``dtype`` activations on
    ``device`` (they compute the float32 reference instead), or None."""
    if device.type != "cpu":
        return f"the {mode} kernel runs on CPU, not {device.type}"
    if dtype != torch.bfloat16:
        return f"{dtype} activations (the {mode} kernel takes bfloat16)"
    available = cpu_kernels.int4a8_available if mode == "w4a8" else cpu_kernels.int8a8_available
    if not available():
        return f"no {mode} kernel on this machine (it needs a C compiler, AVX512-VNNI and AVX512-BF16)"
    return None


def _int4a8_layout(dtype: torch.dtype, device: torch.device) -> tuple[str, str | None]:
    """Where the w4a8 kernel runs ("cpu"), else ("plain", why)."""
    why = _a8_fallback(dtype, device, "w4a8")
    return ("plain", why) if why else ("cpu", None)


def quantize_activations(x2: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The w4a8 kernel's activation rounding, in PyTorch: per row and group of
    ``group_size`` inputs, xq = round(x * 127 / max|x|) in [-127, 127] and a = max|x| / 127,
    all in float32. Returns (xq, a repeated over each group's inputs), both (M, K) float32."""
    M, K = x2.shape
    G = group_size
    xf = x2.float()
    pad = -K % G
    g = F.pad(xf, (0, pad)).view(M, -1, G)  # (M, K / G, G)
    amax = g.abs().amax(dim=2, keepdim=True)
    # Tensor by tensor: a Python number over a tensor is computed as a reciprocal times the
    # number, one rounding more than the kernel's division.
    c127 = torch.full_like(amax, 127.0)
    inv = c127 / amax
    # max|x| = 0, or so small that 127 / max|x| overflows: every code rounds to 0
    inv = torch.where((amax > 0) & torch.isfinite(inv), inv, torch.zeros_like(amax))
    xq = torch.round(g * inv).clamp_(-127, 127)
    a = (amax / c127).expand_as(g)
    return xq.reshape(M, -1)[:, :K], a.reshape(M, -1)[:, :K]


def _inner_k_tiles(in_features: int) -> int:
    # The CUDA layout tiles K by 16 * inner_k_tiles; the largest tile that divides K.
    return next(t for t in (8, 4, 2) if in_features % (16 * t) == 0)


def _pack_plain(codes: torch.Tensor) -> torch.Tensor:
    """(N, K) codes in [0, 15] -> (N, ceil(K / 2)) uint8: even k in the low nibble."""
    if codes.shape[1] % 2:
        codes = F.pad(codes, (0, 1))
    return (codes[:, 0::2] | (codes[:, 1::2] << 4)).to(torch.uint8)


def _unpack_plain(packed: torch.Tensor, in_features: int) -> torch.Tensor:
    N = packed.shape[0]
    return torch.stack([packed & 15, packed >> 4], dim=-1).view(N, -1)[:, :in_features]  # (N, K)


class Int4Linear(nn.Module):
    """``nn.Linear`` with a 4-bit weight: one scale and zero point per ``group_size`` inputs.

    Buffers: ``qweight`` in the layout of the kernel that runs it ("cpu": uint8, N * K / 2
    bytes in ``cpu_kernels.int4_pack``'s layout where that kernel runs, else (N, K / 2) from
    ``_convert_weight_to_int4pack_for_cpu``; "cuda": int32 tiles from
    ``_convert_weight_to_int4pack``; "plain": uint8 (N, ceil(K / 2)), even k in the low
    nibble), ``scales_and_zeros`` (ceil(K / G), N, 2) and ``bias`` (N,) or None in the
    activation dtype. ``fallback`` says why a layer runs the plain path, or is None.
    """

    def __init__(
        self,
        codes: torch.Tensor,
        scales: torch.Tensor,
        zeros: torch.Tensor,
        bias: torch.Tensor | None,
        group_size: int,
        layout: str | None = None,
        act8: bool = False,
    ) -> None:
        """codes: (N, K) uint8 in [0, 15]; scales, zeros: (N, ceil(K / G)) in the activation
        dtype; ``layout`` None picks the fastest for the device, dtype and shape. ``act8``:
        round the activations to int8 per row and group too (the "w4a8" mode)."""
        super().__init__()
        N, K = codes.shape
        self.out_features, self.in_features, self.group_size = N, K, group_size
        self.act8 = act8
        dtype, device = scales.dtype, codes.device
        reason = "the plain layout was asked for" if layout == "plain" else None
        if layout is None:
            layout, reason = (
                _int4a8_layout(dtype, device) if act8 else _int4_layout(N, K, group_size, dtype, device)
            )
        if act8 and layout not in ("cpu", "plain"):
            raise ValueError(f"w4a8 layout must be 'cpu' or 'plain', got {layout!r}")
        self.layout, self.fallback = layout, reason
        # Whether qweight is in the layout of this package's CPU kernel rather than PyTorch's.
        self.own_kernel = layout == "cpu" and (
            cpu_kernels.int4a8_available()
            if act8
            else dtype == torch.bfloat16 and cpu_kernels.int4_available()
        )
        if act8 and layout == "cpu" and not self.own_kernel:
            raise ValueError(
                "the w4a8 'cpu' layout needs the w4a8 kernel (a C compiler, AVX512-VNNI and AVX512-BF16)"
            )
        if act8 and self.own_kernel:
            qweight = cpu_kernels.int4a8_pack(codes, group_size)
        elif self.own_kernel:
            qweight = cpu_kernels.int4_pack(codes, group_size)
        elif layout == "cpu":
            qweight = torch.ops.aten._convert_weight_to_int4pack_for_cpu(
                codes.to(torch.int32).contiguous(), 1
            )
        elif layout == "cuda":
            packed = (codes[:, 0::2] << 4 | codes[:, 1::2]).to(torch.uint8).contiguous()  # even k high
            qweight = torch.ops.aten._convert_weight_to_int4pack(packed, _inner_k_tiles(K))
        elif layout == "plain":
            qweight = _pack_plain(codes)
        else:
            raise ValueError(f"int4 layout must be 'cpu', 'cuda' or 'plain', got {layout!r}")
        self.register_buffer("qweight", qweight)
        sz = torch.stack([scales.t(), zeros.t()], dim=-1).contiguous()  # (K / G, N, 2)
        self.register_buffer("scales_and_zeros", sz)
        self.register_buffer("bias", bias)

    @property
    def kernel(self) -> str | None:
        if self.own_kernel and self.act8:
            return "tokenmill.int4a8_mm"
        if self.own_kernel:
            return "tokenmill.int4_mm"
        return {"cpu": "_weight_int4pack_mm_for_cpu", "cuda": "_weight_int4pack_mm"}.get(self.layout)

    @classmethod
    def from_float(
        cls,
        weight: torch.Tensor,
        bias: torch.Tensor | None = None,
        group_size: int = 32,
        *,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        layout: str | None = None,
        act8: bool = False,
    ) -> Int4Linear:
        """Quantize ``weight`` (N, K) with min/max per group on ``device``; scales in ``dtype``."""
        check_group_size(group_size)
        dtype = dtype or weight.dtype
        w = weight.detach().to(device=device, dtype=torch.float32)  # (N, K)
        N, K = w.shape
        G = group_size
        pad = -K % G
        if pad:  # repeat the last column: it changes no group's min or max
            w = torch.cat([w, w[:, -1:].expand(N, pad)], dim=1)
        g = w.view(N, -1, G)  # (N, K / G, G)
        lo, hi = g.amin(dim=2), g.amax(dim=2)
        scales = ((hi - lo) / 15).clamp(min=1e-6).to(dtype)  # (N, K / G)
        zeros = (lo + 8 * scales.float()).to(dtype)
        # Codes against the rounded scales and zeros: what the kernel will dequantize with.
        lo_r = zeros.float() - 8 * scales.float()
        codes = torch.round((g - lo_r.unsqueeze(2)) / scales.float().unsqueeze(2)).clamp_(0, 15)
        codes = codes.to(torch.uint8).view(N, -1)[:, :K]
        del w, g
        b = None if bias is None else bias.detach().to(device=codes.device, dtype=dtype)
        return cls(codes, scales, zeros, b, group_size, layout, act8)

    def codes(self) -> torch.Tensor:
        """The 4-bit codes, (N, K) uint8."""
        if self.layout == "plain":
            return _unpack_plain(self.qweight, self.in_features)
        if self.own_kernel and self.act8:
            return cpu_kernels.int4a8_unpack(
                self.qweight, self.out_features, self.in_features, self.group_size
            )
        if self.own_kernel:
            return cpu_kernels.int4_unpack(self.qweight, self.out_features, self.in_features, self.group_size)
        # The packed layouts are the kernels' own; read them back through the kernel with
        # scale 1 and zero 8, where (q - 8) * 1 + 8 = q exactly.
        sz = torch.empty_like(self.scales_and_zeros)
        sz[..., 0], sz[..., 1] = 1, 8
        K = self.in_features
        eye = torch.eye(K, dtype=sz.dtype, device=sz.device)
        cols = [self._kernel_mm(eye[i : i + _UNPACK_CHUNK], sz) for i in range(0, K, _UNPACK_CHUNK)]
        return torch.cat(cols).t().round().to(torch.uint8)  # (K, N) -> (N, K)

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight the layer computes with, (N, K), computed in float32 and returned in
        ``dtype``: the reference, and the weight of the plain path."""
        N, K, G = self.out_features, self.in_features, self.group_size
        sz = self.scales_and_zeros.float().permute(1, 0, 2)  # (N, K / G, 2)
        codes = self.codes()
        if K % G:
            codes = F.pad(codes, (0, -K % G))
        w = codes.view(N, -1, G).float().sub_(8).mul_(sz[..., :1]).add_(sz[..., 1:])  # (N, K / G, G)
        return w.view(N, -1)[:, :K].to(dtype)

    def _kernel_mm(self, x2: torch.Tensor, sz: torch.Tensor) -> torch.Tensor:
        if self.own_kernel:
            return cpu_kernels.int4_mm(x2, self.qweight, sz, self.out_features, self.group_size)
        if self.layout == "cpu":
            return torch.ops.aten._weight_int4pack_mm_for_cpu(x2, self.qweight, self.group_size, sz)
        return torch.ops.aten._weight_int4pack_mm(x2, self.qweight, self.group_size, sz)

    def forward(self, x: torch.Tensor, use_kernel: bool = True) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = _rows(x, self.in_features)  # (M, K)
        if self.act8:
            if use_kernel and self.own_kernel and x.dtype == torch.bfloat16 and x.device.type == "cpu":
                out = cpu_kernels.int4a8_mm(
                    x2, self.qweight, self.scales_and_zeros, self.out_features, self.group_size
                )
                if self.bias is not None:
                    out = out + self.bias
            else:
                out = self.reference_a8(x2)
            return out.view(*lead, self.out_features)
        if use_kernel and self.layout != "plain":
            if x.device.type != self.layout:
                raise RuntimeError(
                    f"this Int4Linear was packed for {self.layout} but got input on {x.device.type}; "
                    "quantize the model on the device that runs it"
                )
            # The package's kernel takes bf16 activations only; others dequantize below.
            if (self.layout == "cpu" and not self.own_kernel) or x.dtype == torch.bfloat16:
                out = self._kernel_mm(x2, self.scales_and_zeros.to(x.dtype))
                if self.bias is not None:
                    out = out + self.bias
                return out.view(*lead, self.out_features)
        out = F.linear(x2, self.dequantized_weight(x.dtype), self.bias)
        return out.view(*lead, self.out_features)

    def reference_a8(self, x2: torch.Tensor) -> torch.Tensor:
        """What the w4a8 kernel computes, in float32: the scaled codes times the int8-rounded
        activations, plus the zero points times the exact activations, in x2's dtype."""
        N, K, G = self.out_features, self.in_features, self.group_size
        sz = self.scales_and_zeros.float().permute(1, 0, 2)  # (N, K / G, 2)
        codes = self.codes().float()
        if K % G:
            codes = F.pad(codes, (0, -K % G))
        scaled = codes.view(N, -1, G).sub_(8).mul_(sz[..., :1]).view(N, -1)[:, :K]
        zeros = sz[..., 1:].expand(N, -1, G).reshape(N, -1)[:, :K]
        xq, a = quantize_activations(x2, G)
        out = F.linear(xq * a, scaled) + F.linear(x2.float(), zeros)
        if self.bias is not None:
            out = out + self.bias.float()
        return out.to(x2.dtype)

    def extra_repr(self) -> str:
        s = (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, group_size={self.group_size}, kernel={self.kernel}"
        )
        if self.act8:
            s += ", activations=int8"
        return s + (f", fallback={self.fallback!r}" if self.fallback else "")


@dataclass
class QuantizationReport:
    """What ``quantize_model`` did, layer by layer (module names)."""

    mode: str
    group_size: int | None = None
    #: every replaced layer
    layers: list[str] = field(default_factory=list)
    #: each replaced layer's own mode ("int8", "int4", "w4a8" or "w8a8"; they differ only in "gguf" mode)
    modes: dict[str, str] = field(default_factory=dict)
    #: linear layers left in floating point ("gguf" mode: the file stores them as floats)
    kept: list[str] = field(default_factory=list)
    #: int4 layers built straight from prequantized codes (GGUF Q4_0 / Q4_1 / Q4_K blocks)
    from_source: list[str] = field(default_factory=list)
    #: layers that run the dequantize-then-matmul path, with the reason
    fallback: dict[str, str] = field(default_factory=dict)


def _linear_weight(module: nn.Module) -> torch.Tensor | None:
    """The (out, in) weight of a linear layer, or None for anything else."""
    if isinstance(module, nn.Linear):
        return module.weight
    if getattr(module, "weight_is_in_out", False):  # GPT-2's Conv1D stores (in, out)
        return module.weight.t()
    return None


def _source_matches(
    codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, weight: torch.Tensor, group_size: int
) -> bool:
    """Whether prequantized codes dequantize to the loaded weight, up to the rounding of
    the weight, scales and zeros to the activation dtype (a misplaced row is off by steps)."""
    if tuple(codes.shape) != tuple(weight.shape):
        return False
    N, K = codes.shape
    # A sample of rows spread over the matrix is enough to catch a misplaced row or nibble.
    rows = torch.linspace(0, N - 1, min(N, _CHECK_ROWS), device=codes.device).long()
    s = scales[rows].float().repeat_interleave(group_size, dim=1)[:, :K]  # (R, K)
    z = zeros[rows].float().repeat_interleave(group_size, dim=1)[:, :K]
    w = weight.detach()[rows.to(weight.device)].to(device=codes.device, dtype=torch.float32)
    codes = codes[rows]
    eps = max(torch.finfo(weight.dtype).eps, torch.finfo(scales.dtype).eps)
    tol = (8 * s.abs() + z.abs() + w.abs()) * eps + 1e-6
    return bool(((codes.float() - 8) * s + z - w).abs().le(tol).all())


def quantize_model(
    model: nn.Module,
    mode: str | None,
    group_size: int = 32,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    sources: Mapping[str, Int4Source] | None = None,
    layer_modes: Mapping[str, str] | None = None,
) -> QuantizationReport | None:
    """Replace every linear layer of ``model`` (the LM head too) by its quantized version, in place.

    Layers are quantized one at a time on ``device`` (default: where each weight is), and
    each full-precision weight is freed as soon as its layer is replaced, so the peak is
    the model plus one layer. A tied LM head is quantized from the embedding's weight,
    which itself stays in full precision. Attributes the models read off their linears
    (``shard_sizes``) carry over.

    Args:
        mode: "int8", "int4", "w4a8" (int4 weights, activations rounded to int8 per row
            and group, see kernels/int4a8_gemm.c), "w8a8" (int8 weights, the activations
            rounded the same way in groups of 32), "gguf" (each layer as ``layer_modes``
            says), or None / "none" to change nothing.
        group_size: input features per int4 scale and zero point: 32, 64 or 128.
        dtype: activation dtype for the scales (default: each weight's own dtype).
        sources: int4 only: module name -> prequantized codes to use instead of quantizing
            the weight (GGUF Q4_0 / Q4_1 / Q4_K blocks). Each is checked against the loaded weight.
        layer_modes: module name -> "int8", "int4", "w4a8", "w8a8" or "none" (left as it is), for
            the layers that differ from ``mode``; required, and complete, for "gguf".

    Returns:
        A QuantizationReport, or None when ``mode`` is None.
    """
    mode = check_quantization(mode)
    if mode is None:
        return None
    # Names only: holding the modules themselves would keep every old weight alive.
    names = [name for name, m in model.named_modules() if _linear_weight(m) is not None]
    modes = {name: (layer_modes or {}).get(name, mode) for name in names}
    unknown = sorted(set(layer_modes or {}) - set(names))
    if unknown:
        raise ValueError(
            f"layer_modes names {', '.join(unknown[:5])}, which {'is' if len(unknown) == 1 else 'are'} "
            f"not a linear layer of this model (its linear layers: {', '.join(names[:5])}"
            f"{', ...' if len(names) > 5 else ''})"
        )
    if mode == "gguf":
        if layer_modes is None:
            raise ValueError(
                "quantization 'gguf' keeps each layer at the precision its GGUF file stores it in, "
                "which needs layer_modes: load the model from a .gguf file, or pick int8, int4, w4a8 or w8a8"
            )
        missing = [name for name in names if name not in layer_modes]
        if missing:
            raise ValueError(
                f"quantization 'gguf' needs a mode for every linear layer; layer_modes has none for "
                f"{', '.join(missing[:5])}"
            )
    bad = sorted({m for m in modes.values() if m not in LAYER_MODES})
    if bad:
        raise ValueError(f"layer_modes must be among {', '.join(LAYER_MODES)}, got {', '.join(bad)}")
    four_bit = any(m in ("int4", "w4a8") for m in modes.values())
    if four_bit:
        check_group_size(group_size)
    report = QuantizationReport(mode, group_size if four_bit else None)
    # A C decode stack built before holds the old weights: drop it, so that each is freed as
    # its layer is replaced (a new stack is built for the quantized layers when next needed).
    model.__dict__.pop("_decode_stack", None)
    for name in names:
        if modes[name] == "none":
            report.kept.append(name)
            continue
        parent_name, _, child_name = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        child = getattr(parent, child_name)
        weight = _linear_weight(child)
        assert weight is not None
        dev = torch.device(device) if device is not None else weight.device
        dt = dtype or weight.dtype
        bias = child.bias
        act8 = modes[name] in ("w4a8", "w8a8")
        with torch.no_grad():
            if modes[name] in ("int8", "w8a8"):
                q: Int8Linear | Int4Linear = Int8Linear.from_float(
                    weight, bias, dtype=dt, device=dev, act8=act8
                )
            else:
                q = _int4_layer(name, weight, bias, group_size, dt, dev, sources, report, act8)
        for attr in ("shard_sizes",):
            if hasattr(child, attr):
                setattr(q, attr, getattr(child, attr))
        setattr(parent, child_name, q)
        del child, weight, bias  # the last references: the full-precision weight is freed here
        report.layers.append(name)
        report.modes[name] = modes[name]
        if q.fallback:
            report.fallback[name] = q.fallback
    if report.fallback:
        log.info(
            "%s: %d of %d layers run dequantize-then-matmul (%s)",
            mode,
            len(report.fallback),
            len(report.layers),
            "; ".join(sorted(set(report.fallback.values()))),
        )
    return report


def _int4_layer(
    name: str,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    group_size: int,
    dtype: torch.dtype,
    device: torch.device,
    sources: Mapping[str, Int4Source] | None,
    report: QuantizationReport,
    act8: bool = False,
) -> Int4Linear:
    source = sources.get(name) if sources is not None and group_size == 32 else None
    if source is not None:
        codes, scales, zeros = source()
        codes = codes.to(device)
        scales, zeros = scales.to(device=device, dtype=dtype), zeros.to(device=device, dtype=dtype)
        # Check against the weight the loader dequantized, so a layout mistake cannot pass silently.
        if _source_matches(codes, scales, zeros, weight, 32):
            b = None if bias is None else bias.detach().to(device=device, dtype=dtype)
            report.from_source.append(name)
            return Int4Linear(codes, scales, zeros, b, 32, act8=act8)
        log.warning("%s: its prequantized int4 blocks do not match the loaded weight; re-quantizing", name)
    return Int4Linear.from_float(weight, bias, group_size, dtype=dtype, device=device, act8=act8)
