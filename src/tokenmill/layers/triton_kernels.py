"""Triton kernels for CUDA: decode attention that reads the paged KV cache in place.

Imported only on CUDA devices with Triton installed; everything else takes the
PyTorch reference path in ``paged_attention``.
"""

from __future__ import annotations

import functools
import logging

import torch

log = logging.getLogger(__name__)


@functools.cache
def available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available()


@functools.cache
def _kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def paged_decode_kernel(
        Q,
        K,
        V,
        Tables,
        Lens,
        Out,
        scale,
        window,
        table_stride,
        NUM_KV_HEADS: tl.constexpr,
        G: tl.constexpr,
        G_PAD: tl.constexpr,
        D: tl.constexpr,
        BS: tl.constexpr,
        IEEE: tl.constexpr,
    ):
        # One program per (row, KV head): the group's query heads share every key load.
        r = tl.program_id(0)
        hk = tl.program_id(1)
        H = NUM_KV_HEADS * G
        length = tl.load(Lens + r)
        first = tl.maximum(length - window, 0)
        offs_g = tl.arange(0, G_PAD)
        offs_d = tl.arange(0, D)
        offs_t = tl.arange(0, BS)
        q_ptrs = Q + (r * H + hk * G + offs_g[:, None]) * D + offs_d[None, :]
        q = tl.load(q_ptrs, mask=offs_g[:, None] < G, other=0.0)
        m = tl.full([G_PAD], float("-inf"), tl.float32)
        denom = tl.zeros([G_PAD], tl.float32)
        acc = tl.zeros([G_PAD, D], tl.float32)
        for b in range(first // BS, tl.cdiv(length, BS)):
            block = tl.load(Tables + r * table_stride + b).to(tl.int64)
            pos = b * BS + offs_t
            # Slots outside [first, length) are not loaded: a reused block may hold anything
            # there (0 * NaN would spoil the row even at zero weight).
            valid = (pos < length) & (pos >= first)
            kv_off = ((block * BS + offs_t)[:, None] * NUM_KV_HEADS + hk) * D + offs_d[None, :]
            k = tl.load(K + kv_off, mask=valid[:, None], other=0.0)
            if IEEE:
                s = tl.dot(q, tl.trans(k), input_precision="ieee")
            else:
                s = tl.dot(q, tl.trans(k))
            s = s * scale
            s = tl.where(valid[None, :], s, float("-inf"))
            m_new = tl.maximum(m, tl.max(s, 1))
            p = tl.exp(s - m_new[:, None])
            alpha = tl.exp(m - m_new)
            denom = denom * alpha + tl.sum(p, 1)
            v = tl.load(V + kv_off, mask=valid[:, None], other=0.0)
            if IEEE:
                acc = acc * alpha[:, None] + tl.dot(p, v.to(tl.float32), input_precision="ieee")
            else:
                acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            m = m_new
        out = acc / denom[:, None]
        o_ptrs = Out + (r * H + hk * G + offs_g[:, None]) * D + offs_d[None, :]
        tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=offs_g[:, None] < G)

    return paged_decode_kernel


@functools.cache
def _triton_error() -> type[Exception]:
    """What Triton raises when it cannot build or launch a kernel (looked up once: this
    runs for every layer of every eager decode step)."""
    from triton.runtime.errors import TritonError

    return TritonError


def supports(head_dim: int, v_head_dim: int, block_size: int) -> bool:
    pow2 = lambda x: x >= 16 and x & (x - 1) == 0  # noqa: E731
    return available() and head_dim == v_head_dim and pow2(head_dim) and pow2(block_size)


#: shapes whose kernel failed to compile or launch (e.g. too much shared memory on a
#: smaller GPU): they take the PyTorch path from then on, without trying again.
_failed: set[tuple] = set()


def paged_decode(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    tables: torch.Tensor,
    lens: torch.Tensor,
    scale: float,
    window: int | None,
) -> torch.Tensor | None:
    """q: (R, H, D); caches (blocks, bs, H_kv, D). Returns (R, H * D), or None where
    Triton could not build or launch the kernel for these shapes (logged once)."""
    R, H, D = q.shape
    _, bs, Hkv, _ = k_cache.shape
    G = H // Hkv
    key = (H, Hkv, D, bs, q.dtype, q.device.index)
    if key in _failed:
        return None
    q = q.contiguous()
    out = torch.empty_like(q)
    tables = tables.contiguous()
    try:
        _kernel()[(R, Hkv)](
            q,
            k_cache,
            v_cache,
            tables,
            lens.contiguous(),
            out,
            scale,
            window or (1 << 30),
            tables.stride(0),
            NUM_KV_HEADS=Hkv,
            G=G,
            G_PAD=max(16, 1 << (G - 1).bit_length()),
            D=D,
            BS=bs,
            IEEE=q.dtype == torch.float32,
        )
    except _triton_error() as e:
        _failed.add(key)
        log.warning(
            "Triton decode attention failed for %d heads / %d KV heads of %d, blocks of %d, %s (%s); "
            "using PyTorch attention",
            H, Hkv, D, bs, q.dtype, e,
        )  # fmt: skip
        return None
    return out.view(R, H * D)
