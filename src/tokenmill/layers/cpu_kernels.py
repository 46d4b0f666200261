"""Small C kernels for CPU paths that PyTorch has no fast operator for.

The source ships with the package and is compiled once per machine with the system C
compiler into a cache directory; a machine without a compiler, or with
``TOKENMILL_CPU_KERNELS=0``, uses the PyTorch reference path instead. The kernels are
called through ctypes, which releases the GIL while they run.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

log = logging.getLogger("tokenmill.kernels")

_SOURCES = [
    Path(__file__).parent / "kernels" / name for name in ("paged_decode.c", "fused_ops.c", "half_linear.c")
]
_FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC"]


def _cache_dir() -> Path:
    base = os.environ.get("TOKENMILL_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "tokenmill")
    return Path(base) / "kernels"


def _cpu_signature() -> str:
    """Built with -march=native, a library is only valid on the CPU that built it."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "")
    except OSError:
        flags = ""
    return platform.machine() + platform.processor() + flags


@functools.cache
def _library() -> ctypes.CDLL | None:
    if os.environ.get("TOKENMILL_CPU_KERNELS", "1") == "0":
        return None
    cc = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
    if cc is None or not all(src.exists() for src in _SOURCES):
        return None
    source = b"".join(src.read_bytes() for src in _SOURCES)
    key = hashlib.sha256(source + " ".join(_FLAGS).encode() + _cpu_signature().encode()).hexdigest()[:16]
    path = _cache_dir() / f"tokenmill_kernels-{key}.so"
    try:
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            # Build beside the target and rename, so concurrent processes never load half a file.
            with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
                out = Path(tmp) / path.name
                subprocess.run(
                    [cc, *_FLAGS, "-o", str(out), *map(str, _SOURCES), "-lm"],
                    check=True,
                    capture_output=True,
                    timeout=120,
                )
                os.replace(out, path)
        lib = ctypes.CDLL(str(path))
    except (OSError, subprocess.SubprocessError) as e:
        log.warning("CPU kernels unavailable (%s); using the PyTorch paths", e)
        return None
    args = [ctypes.c_void_p] * 4 + [ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p]
    args += [ctypes.c_int] * 6 + [ctypes.c_float, ctypes.c_int, ctypes.c_int]
    for name in ("paged_decode_bf16", "paged_decode_f32"):
        getattr(lib, name).argtypes = args
        getattr(lib, name).restype = ctypes.c_int
    ptr, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    lib.rope_bf16.argtypes = [ptr] * 3 + [i64, i32, i32, i64, i32]
    lib.silu_mul_bf16.argtypes = [ptr, ptr, i64, i32, i32]
    lib.kv_write.argtypes = [ptr, ptr, i64, i64, ptr, i64, ptr, ptr, i64, i64]
    for name in ("rope_bf16", "silu_mul_bf16", "kv_write"):
        getattr(lib, name).restype = None
    return lib


_KERNELS = {torch.bfloat16: "paged_decode_bf16", torch.float32: "paged_decode_f32"}


def paged_decode_available(dtype: torch.dtype) -> bool:
    return dtype in _KERNELS and _library() is not None


def paged_decode(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    tables: torch.Tensor,
    lens: torch.Tensor,
    scale: float,
    window: int | None,
    check_bounds: bool = True,
) -> torch.Tensor | None:
    """Decode attention straight from the blocks. q: (R, H, D); caches (blocks, bs, H_kv, D).
    Returns (R, H * Dv), or None when the kernel could not run (the caller falls back).
    ``check_bounds=False`` skips the length and block-id range check (two host syncs) for
    tables already checked against a cache of the same shape."""
    lib = _library()
    assert lib is not None
    R, H, D = q.shape
    _, bs, Hkv, _ = k_cache.shape
    Dv = v_cache.shape[-1]
    # The kernel trusts its pointers: everything it reads is checked here.
    if not (
        k_cache.dtype == v_cache.dtype == q.dtype
        and k_cache.is_contiguous()
        and v_cache.is_contiguous()
        and k_cache.shape[:3] == v_cache.shape[:3]
        and k_cache.shape[-1] == D
        and tables.dtype == lens.dtype == torch.int64
        and tables.shape[0] == lens.shape[0] == R
        and H % Hkv == 0
    ):
        raise ValueError("paged_decode: q, caches, tables and lengths do not agree")
    if (
        check_bounds
        and R
        and (int(lens.max()) > tables.shape[1] * bs or int(tables.max()) >= k_cache.shape[0])
    ):
        raise ValueError("paged_decode: a length or block id is outside the cache")
    q = q.contiguous()
    tables = tables.contiguous()
    lens = lens.contiguous()
    out = torch.empty(R, H, Dv, dtype=q.dtype)
    failed = getattr(lib, _KERNELS[q.dtype])(
        q.data_ptr(),
        k_cache.data_ptr(),
        v_cache.data_ptr(),
        tables.data_ptr(),
        tables.shape[1],
        lens.data_ptr(),
        out.data_ptr(),
        R,
        H,
        Hkv,
        D,
        Dv,
        bs,
        scale,
        window or 0,
        torch.get_num_threads(),
    )
    if failed:
        log.warning("CPU attention kernel could not allocate its scratch; using the PyTorch path")
        return None
    return out.view(R, H * Dv)


# -- fused elementwise kernels (bf16, CPU) -------------------------------------------------


def fused_available(x: torch.Tensor) -> bool:
    """Whether the fused kernels below can take ``x``: a contiguous CPU bf16 tensor."""
    return (
        x.dtype == torch.bfloat16 and x.device.type == "cpu" and x.is_contiguous() and _library() is not None
    )


def rope_(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, heads: int) -> None:
    """Rotate-half rope in place on the first ``heads`` heads of a contiguous bf16
    ``x`` (..., H_total, D); ``cos``/``sin`` (..., 1, D) hold one row per token of x."""
    lib = _library()
    assert lib is not None
    D = x.shape[-1]
    rows = x.numel() // (x.shape[-2] * D)
    if not (
        heads <= x.shape[-2]
        and D % 2 == 0
        and cos.shape == sin.shape
        and cos.numel() == rows * D
        and cos.dtype == sin.dtype == x.dtype
        and cos.is_contiguous()
        and sin.is_contiguous()
    ):
        raise ValueError("rope_: x, cos and sin do not agree")
    lib.rope_bf16(
        x.data_ptr(), cos.data_ptr(), sin.data_ptr(), rows, heads, D, x.shape[-2] * D, torch.get_num_threads()
    )


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for a contiguous bf16 ``gate_up`` = [gate | up] on the last dim."""
    lib = _library()
    assert lib is not None
    two_i = gate_up.shape[-1]
    if two_i % 2:
        raise ValueError("silu_mul: the last dim must hold gate and up halves of equal size")
    out = gate_up.new_empty((*gate_up.shape[:-1], two_i // 2))
    lib.silu_mul_bf16(
        gate_up.data_ptr(), out.data_ptr(), gate_up.numel() // two_i, two_i // 2, torch.get_num_threads()
    )
    return out


def kv_write(
    k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor
) -> bool:
    """Copy rows k (N, H_kv, D) and v (N, H_kv, Dv) into the flat cache slots ``slots``
    (int64, already checked to lie in the cache). Rows may be strided views; each row
    itself must be contiguous. Returns False, doing nothing, when the layout does not fit."""
    lib = _library()
    if lib is None or k.device.type != "cpu":
        return False
    n = slots.shape[0]
    if not (
        k.dim() == v.dim() == 3
        and k.shape[0] == v.shape[0] == n
        and k.dtype == v.dtype == k_cache.dtype == v_cache.dtype
        and slots.dtype == torch.int64
        and slots.is_contiguous()
        and k_cache.is_contiguous()
        and v_cache.is_contiguous()
        and k.shape[1:] == k_cache.shape[2:]
        and v.shape[1:] == v_cache.shape[2:]
        and k.stride(2) == v.stride(2) == 1
        and k.stride(1) == k.shape[2]
        and v.stride(1) == v.shape[2]
    ):
        return False
    elt = k.element_size()
    lib.kv_write(
        k.data_ptr(),
        v.data_ptr(),
        k.stride(0) * elt,
        v.stride(0) * elt,
        slots.data_ptr(),
        n,
        k_cache.data_ptr(),
        v_cache.data_ptr(),
        k.shape[1] * k.shape[2] * elt,
        v.shape[1] * v.shape[2] * elt,
    )
    return True
