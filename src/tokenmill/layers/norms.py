"""Normalisation layers, computed in float32 as the reference implementations do."""

from __future__ import annotations

import functools
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tokenmill.layers import cpu_kernels


class RMSNorm(nn.Module):
    """Llama-style RMSNorm. ``offset=1.0`` gives Gemma's ``(1 + weight)`` scaling."""

    def __init__(self, dim: int, eps: float = 1e-6, offset: float = 0.0) -> None:
        super().__init__()
        self.eps = eps
        self.offset = offset
        self.weight = nn.Parameter(torch.ones(dim) if offset == 0.0 else torch.zeros(dim))

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> Any:
        """``norm(x)``; with ``residual``, ``(norm(x + residual), x + residual)``."""
        if residual is not None:
            x = x + residual
            return self._norm(x), x
        return self._norm(x)

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.bfloat16 and x.device.type == "cpu" and x.numel() <= _C_NORM_MAX_ELEMENTS:
            out = _c_norm(x, self.weight, self.eps, self.offset)
            if out is not None:
                return out
        return self.torch_norm(x)

    def torch_norm(self, x: torch.Tensor) -> torch.Tensor:
        """The norm in PyTorch ops: the reference the C norm is checked against."""
        dtype = x.dtype
        shape = (x.shape[-1],)
        if self.offset:
            # Gemma scales in float32 before the cast back.
            w = self.weight.float() + self.offset
            return F.rms_norm(x.float(), shape, w, self.eps).to(dtype)
        if dtype == torch.float32:
            return F.rms_norm(x, shape, self.weight, self.eps)
        # Llama normalises in float32, casts back, then scales in the model dtype.
        return self.weight * F.rms_norm(x.float(), shape, None, self.eps).to(dtype)


# Up to this many elements (a decode step's few rows), bf16 norms on CPU run in C: one
# 576-wide row 5 us against 12 us for the four PyTorch ops alone (and about 80 us for the
# final norm of a batch-1 step, the ops waking PyTorch's threads after the C stack's);
# single-threaded, the C norm stops paying past about 64K elements (32 rows of 2048).
_C_NORM_MAX_ELEMENTS = 64 * 1024


def _c_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float) -> torch.Tensor | None:
    """The C norm of the decode stack (``kernels/decode_stack.c``), which equals
    ``RMSNorm.torch_norm`` bit for bit on machines where ``rmsnorm_lanes`` finds its sum
    order; None where it does not apply."""
    C = x.shape[-1]
    if not (
        offset in (0.0, 1.0)
        and x.is_contiguous()
        and weight.dtype == torch.bfloat16
        and weight.is_contiguous()
        and weight.device.type == "cpu"
        and weight.shape == (C,)
    ):
        return None
    lanes = rmsnorm_lanes(C, eps)
    if lanes is None:
        return None
    out = torch.empty_like(x)
    rc = cpu_kernels._library().decode_stack_norm(
        x.data_ptr(), None, weight.data_ptr(), out.data_ptr(), x.numel() // C, C, eps, lanes, int(offset)
    )
    return out if rc == 0 else None


@functools.cache
def rmsnorm_lanes(hidden: int, eps: float, widths: tuple[int, ...] = (16, 8, 4, 1)) -> int | None:
    """The accumulator width (the first of ``widths`` that works) with which the C RMSNorm
    (``kernels/decode_stack.c``) equals ``RMSNorm.torch_norm`` bit for bit on this machine
    (ATen's vectorized sum order depends on the vector width it was built for and picks
    at run time), or None."""
    lib = cpu_kernels._library()
    if lib is None:
        return None
    g = torch.Generator().manual_seed(0)
    rows = 256
    # Sums of squares of like magnitude: a wrong order changes most of them in the last bit.
    sq = torch.randn(rows, hidden, generator=g).pow(2)
    want_sum = sq.sum(-1)
    # Rows of very different scales, as hidden states have, and a weight not all ones.
    x = (torch.randn(rows, hidden, generator=g) * torch.logspace(-2, 2, rows).unsqueeze(1)).bfloat16()
    add = torch.randn(rows, hidden, generator=g).bfloat16()
    norm = RMSNorm(hidden, eps)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(hidden, generator=g) * 2)
    norm = norm.bfloat16()
    with torch.no_grad():
        want_res = x + add
        want = norm.torch_norm(want_res)  # PyTorch's ops, never the C norm being probed
    for lanes in widths:
        got_sum = torch.empty(rows)
        if lib.decode_stack_sum(sq.data_ptr(), got_sum.data_ptr(), rows, hidden, lanes) or not torch.equal(
            got_sum, want_sum
        ):
            continue
        res, out = x.clone(), torch.empty_like(x)
        rc = lib.decode_stack_norm(
            res.data_ptr(),
            add.data_ptr(),
            norm.weight.data_ptr(),
            out.data_ptr(),
            rows,
            hidden,
            eps,
            lanes,
            0,
        )
        if rc == 0 and torch.equal(out, want) and torch.equal(res, want_res):
            return lanes
    return None


class LayerNorm(nn.LayerNorm):
    """Plain LayerNorm (GPT-2); kept as a name so models read uniformly."""
