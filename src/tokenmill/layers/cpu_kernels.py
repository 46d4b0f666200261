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
import time
from pathlib import Path

import torch

log = logging.getLogger("tokenmill.kernels")

# Longest compile first (measured at -O3 on this project's machine: 1.36, 0.47, 0.40,
# 0.34, 0.29, 0.28, 0.26 and 0.21 s), so that the parallel build ends with short jobs.
_SOURCES = [
    Path(__file__).parent / "kernels" / name
    for name in (
        "paged_decode.c",
        "int4a8_gemm.c",
        "decode_stack.c",
        "bf16_gemv.c",
        "int4_gemv.c",
        "fused_ops.c",
        "int8_gemm.c",
        "half_linear.c",
    )
]
_HEADERS = sorted((Path(__file__).parent / "kernels").glob("*.h"))
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


def _cores() -> int:
    """The cores this process may run on (a container may allow fewer than the machine has)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


def _build(cc: str, tmp: Path, out: Path) -> None:
    """Compile the sources in parallel, one per core, then link: the first start on a
    machine waits for this (about 2 s over this project's two cores, 3.6 s of compiler
    time in all). The sources are in ``_SOURCES`` longest first."""
    pending = [(src, tmp / f"{src.stem}.o", tmp / f"{src.stem}.err") for src in _SOURCES]
    objects = [obj for _, obj, _ in pending]
    flags = [f for f in _FLAGS if f != "-shared"]
    running: list[tuple[subprocess.Popen, Path]] = []
    deadline = time.monotonic() + 120
    try:
        while pending or running:
            while pending and len(running) < _cores():
                src, obj, err = pending.pop(0)
                with open(err, "wb") as ferr:  # a file, not a pipe: a chatty compiler cannot block
                    cmd = [cc, *flags, "-c", "-o", str(obj), str(src)]
                    running.append((subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=ferr), err))
            for proc, err in [r for r in running if r[0].poll() is not None]:
                running.remove((proc, err))
                if proc.returncode:
                    raise subprocess.CalledProcessError(proc.returncode, proc.args, stderr=err.read_bytes())
            if time.monotonic() > deadline:
                raise subprocess.TimeoutExpired(cc, 120)
            time.sleep(0.005)
    finally:
        for proc, _ in running:
            proc.kill()
            proc.wait()
    subprocess.run(
        [cc, *_FLAGS, "-o", str(out), *map(str, objects), "-lm"], check=True, capture_output=True, timeout=120
    )


@functools.cache
def _library() -> ctypes.CDLL | None:
    if os.environ.get("TOKENMILL_CPU_KERNELS", "1") == "0":
        return None
    cc = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
    if cc is None or not _HEADERS or not all(src.exists() for src in _SOURCES):
        return None
    # the headers too: a change to one must rebuild the library
    source = b"".join(src.read_bytes() for src in [*_SOURCES, *_HEADERS])
    key = hashlib.sha256(source + " ".join(_FLAGS).encode() + _cpu_signature().encode()).hexdigest()[:16]
    path = _cache_dir() / f"tokenmill_kernels-{key}.so"
    try:
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            # Build beside the target and rename, so concurrent processes never load half a file.
            with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
                out = Path(tmp) / path.name
                _build(cc, Path(tmp), out)
                os.replace(out, path)
        lib = ctypes.CDLL(str(path))
    except (OSError, subprocess.SubprocessError) as e:
        why = str(e)
        if isinstance(e, subprocess.CalledProcessError) and e.stderr:
            why += ": " + e.stderr.decode(errors="replace").strip()[-2000:]
        log.warning("CPU kernels unavailable (%s); using the PyTorch paths", why)
        return None
    args = [ctypes.c_void_p] * 4 + [ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p]
    args += [ctypes.c_int] * 6 + [ctypes.c_float, ctypes.c_int, ctypes.c_int]
    for name in ("paged_decode_bf16", "paged_decode_f32"):
        getattr(lib, name).argtypes = args
        getattr(lib, name).restype = ctypes.c_int
    ptr, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    lib.prefill_attention_bf16.argtypes = [ptr, i64] * 3 + [ptr, i64, i64] + [i32] * 4
    lib.prefill_attention_bf16.argtypes += [ctypes.c_float, i64, i32]
    lib.prefill_attention_bf16.restype = i32
    lib.rope_bf16.argtypes = [ptr] * 3 + [i64, i32, i32, i64, i32]
    lib.argmax_bf16.argtypes = [ptr, ptr, i64, i64, i32]
    lib.argmax_bf16.restype = None
    lib.silu_mul_bf16.argtypes = [ptr, ptr, i64, i32, i32]
    lib.gelu_tanh_mul_bf16.argtypes = [ptr, ptr, i64, i32, i32]
    lib.kv_write.argtypes = [ptr, ptr, i64, i64, ptr, i64, ptr, ptr, i64, i64]
    for name in ("rope_bf16", "silu_mul_bf16", "gelu_tanh_mul_bf16", "kv_write"):
        getattr(lib, name).restype = None
    lib.bf16_gemv.argtypes = [ptr] * 4 + [i64] * 3 + [i32]
    lib.int4_gemm_bf16.argtypes = [ptr] * 4 + [i64] * 4 + [i32]
    lib.int4a8_gemm_bf16.argtypes = [ptr] * 4 + [i64] * 4 + [i32]
    lib.int8_gemm_bf16.argtypes = [ptr] * 5 + [i64] * 3 + [i32]
    lib.int8a8_gemm_bf16.argtypes = [ptr] * 5 + [i64] * 4 + [i32]
    # The decode stack (layers/decode_stack.py): its structures travel by pointer.
    lib.decode_stack_bf16.argtypes = [ptr, ptr, ptr, i64] + [ptr] * 4 + [i64] + [ptr] * 5
    lib.decode_stack_norm.argtypes = [ptr] * 4 + [i64, i64, ctypes.c_double, i64, i64]
    lib.decode_stack_sum.argtypes = [ptr, ptr, i64, i64, i64]
    for name in (
        "bf16_gemv",
        "int4_gemm_bf16",
        "int4a8_gemm_bf16",
        "int8_gemm_bf16",
        "int8a8_gemm_bf16",
        "decode_stack_bf16",
        "decode_stack_norm",
        "decode_stack_sum",
    ):
        getattr(lib, name).restype = ctypes.c_int
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
    if check_bounds and R:
        l_lo, l_hi = map(int, torch.aminmax(lens))
        t_lo, t_hi = map(int, torch.aminmax(tables)) if tables.numel() else (0, -1)
        if not (0 <= l_lo and l_hi <= tables.shape[1] * bs and 0 <= t_lo and t_hi < k_cache.shape[0]):
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


def prefill_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, window: int | None
) -> torch.Tensor | None:
    """Causal attention of T bf16 queries, the last T of S positions: q (T, H, D), k (S,
    H_kv, D), v (S, H_kv, Dv), each with its heads and dimensions contiguous (rows may be
    strided). Returns (T, H * Dv), or None where the kernel does not take these shapes
    (the caller keeps the PyTorch path)."""
    lib = _library()
    if lib is None or not (q.dtype == k.dtype == v.dtype == torch.bfloat16 and q.device.type == "cpu"):
        return None
    T, H, D = q.shape
    S, Hkv, Dv = k.shape[0], k.shape[1], v.shape[-1]
    for t in (q, k, v):
        if t.stride(-1) != 1 or t.stride(-2) != t.shape[-1]:
            return None
    if not (k.shape[-1] == D and v.shape[:2] == (S, Hkv) and S >= T >= 1 and Hkv and H % Hkv == 0):
        raise ValueError("prefill_attention: q, k and v do not agree")
    out = torch.empty(T, H * Dv, dtype=q.dtype)
    rc = lib.prefill_attention_bf16(
        q.data_ptr(), q.stride(0), k.data_ptr(), k.stride(0), v.data_ptr(), v.stride(0),
        out.data_ptr(), T, S, H, Hkv, D, Dv, scale, window or 0, torch.get_num_threads(),
    )  # fmt: skip
    if rc == 2:
        log.warning("CPU prefill attention could not allocate its scratch; using the PyTorch path")
    return out if rc == 0 else None


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


def _gated(kernel: str, gate_up: torch.Tensor) -> torch.Tensor:
    lib = _library()
    assert lib is not None
    two_i = gate_up.shape[-1]
    if two_i % 2:
        raise ValueError(f"{kernel}: the last dim must hold gate and up halves of equal size")
    out = gate_up.new_empty((*gate_up.shape[:-1], two_i // 2))
    getattr(lib, f"{kernel}_bf16")(
        gate_up.data_ptr(), out.data_ptr(), gate_up.numel() // two_i, two_i // 2, torch.get_num_threads()
    )
    return out


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for a contiguous bf16 ``gate_up`` = [gate | up] on the last dim."""
    return _gated("silu_mul", gate_up)


def gelu_tanh_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """gelu(gate, approximate="tanh") * up for a contiguous bf16 ``gate_up`` = [gate | up]."""
    return _gated("gelu_tanh_mul", gate_up)


def argmax_rows(x: torch.Tensor) -> torch.Tensor | None:
    """``x.argmax(-1)`` of a contiguous 2-D bf16 CPU tensor without a float32 copy (the
    same index: the first maximum, or the first NaN), or None where the kernel cannot run."""
    lib = _library()
    if lib is None or not (x.dtype == torch.bfloat16 and x.device.type == "cpu" and x.dim() == 2):
        return None
    if not x.is_contiguous() or x.shape[1] == 0:
        return None
    out = torch.empty(x.shape[0], dtype=torch.long)
    lib.argmax_bf16(x.data_ptr(), out.data_ptr(), x.shape[0], x.shape[1], torch.get_num_threads())
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


# -- few-row linear layers (bf16 activations, CPU) -----------------------------------------

#: Most rows the bf16 kernel streams (BF16_MAX_M in kernels/bf16_gemv.c)...
BF16_GEMV_MAX_ROWS = 4
#: ...and most rows and inputs of its tiled product (BF16_TILE_MAX_M, BF16_TILE_MAX_K).
BF16_TILE_MAX_ROWS = 64
BF16_TILE_MAX_K = 2048


def bf16_gemv_fits(rows: int, in_features: int) -> bool:
    """Whether ``bf16_gemv`` takes ``rows`` activation rows of ``in_features`` inputs."""
    return 1 <= rows <= BF16_GEMV_MAX_ROWS or (rows <= BF16_TILE_MAX_ROWS and in_features <= BF16_TILE_MAX_K)


#: Output rows per block of the int4 layout (I4_ROWS in kernels/int4_gemv.c).
INT4_BLOCK_ROWS = 16
#: inputs per activation scale of the w8a8 kernel (llama.cpp's Q8_0 blocks hold 32 too)
W8A8_GROUP = 32


def _probe(run) -> bool:
    """Whether a kernel has a vector path on this machine: a tiny product it must get right."""
    lib = _library()
    if lib is None:
        return False
    try:
        return run(lib)
    except (OSError, ValueError, RuntimeError):  # RuntimeError: the kernel said it cannot run here
        return False


@functools.cache
def bf16_gemv_available() -> bool:
    """Whether this machine runs the bf16 GEMV kernel (a C compiler and AVX-512)."""

    def run(lib: ctypes.CDLL) -> bool:
        x = torch.ones(1, 40, dtype=torch.bfloat16)
        w = torch.ones(3, 40, dtype=torch.bfloat16)
        y = torch.empty(1, 3, dtype=torch.bfloat16)
        ok = lib.bf16_gemv(x.data_ptr(), w.data_ptr(), None, y.data_ptr(), 1, 3, 40, 1) == 0
        return ok and bool((y == 40).all())

    return _probe(run)


def bf16_gemv(x2: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x2, weight, bias)`` for a contiguous bf16 CPU ``x2`` (M, K) and a
    contiguous (N, K) bf16 weight, summed in float32, where ``bf16_gemv_fits(M, K)``."""
    lib = _library()
    M, K = x2.shape
    N = weight.shape[0]
    if not (
        lib is not None
        and bf16_gemv_fits(M, K)
        and x2.dtype == weight.dtype == torch.bfloat16
        and x2.is_contiguous()
        and weight.is_contiguous()
        and weight.shape == (N, K)
        and (bias is None or (bias.dtype == torch.bfloat16 and bias.shape == (N,) and bias.is_contiguous()))
    ):
        raise ValueError(
            f"bf16_gemv: x {tuple(x2.shape)} {x2.dtype}, weight {tuple(weight.shape)} {weight.dtype} "
            f"do not fit the kernel (contiguous bfloat16, 1 to {BF16_GEMV_MAX_ROWS} rows, or up to "
            f"{BF16_TILE_MAX_ROWS} rows of at most {BF16_TILE_MAX_K} inputs)"
        )
    y = torch.empty(M, N, dtype=torch.bfloat16)
    lib.bf16_gemv(
        x2.data_ptr(),
        weight.data_ptr(),
        None if bias is None else bias.data_ptr(),
        y.data_ptr(),
        M,
        N,
        K,
        torch.get_num_threads(),
    )
    return y


def _probe_int4(kernel: str, pack) -> bool:
    """Whether an int4 kernel gets a tiny product right: codes 9 with scale 1 and zero 0
    are weights of 1 ((9 - 8) * 1 + 0), and ones are exact in int8 too, so 40 per output."""

    def run(lib: ctypes.CDLL) -> bool:
        packed = pack(torch.full((3, 40), 9, dtype=torch.uint8), 32)
        sz = torch.tensor([1.0, 0.0], dtype=torch.bfloat16).expand(2, 3, 2).contiguous()
        x = torch.ones(1, 40, dtype=torch.bfloat16)
        y = torch.empty(1, 3, dtype=torch.bfloat16)
        rc = getattr(lib, kernel)(
            x.data_ptr(), packed.data_ptr(), sz.data_ptr(), y.data_ptr(), 1, 3, 40, 32, 1
        )
        return rc == 0 and bool((y == 40).all())

    return _probe(run)


@functools.cache
def int4_available() -> bool:
    """Whether this machine runs the int4 kernel (a C compiler and AVX512-BF16)."""
    return _probe_int4("int4_gemm_bf16", int4_pack)


def _pack_codes(codes: torch.Tensor, group_size: int, step: int) -> torch.Tensor:
    """(N, K) codes -> blocks of 16 rows, each [Kp / step][16][step / 2] bytes, byte
    (step / 2) r + j of column step k holding q[r, k + j] in its low nibble and
    q[r, k + step / 2 + j] in its high one (padding codes 0)."""
    N, K = codes.shape
    R, half = INT4_BLOCK_ROWS, step // 2
    Np, Kp = -(-N // R) * R, -(-K // group_size) * group_size
    c = torch.zeros(Np, Kp, dtype=torch.uint8)
    c[:N, :K] = codes
    c = c.view(Np // R, R, Kp // step, 2, half).permute(0, 2, 1, 3, 4)  # (blocks, Kp / step, R, lo|hi, j)
    return (c[..., 0, :] | (c[..., 1, :] << 4)).contiguous().view(-1)


def _unpack_codes(packed: torch.Tensor, out_features: int, in_features: int, group_size: int, step: int):
    R = INT4_BLOCK_ROWS
    Np, Kp = -(-out_features // R) * R, -(-in_features // group_size) * group_size
    b = packed.view(Np // R, Kp // step, R, step // 2)
    c = torch.stack([b & 15, b >> 4], dim=3)  # (blocks, Kp / step, R, lo|hi, j)
    return c.permute(0, 2, 1, 3, 4).reshape(Np, Kp)[:out_features, :in_features]


def int4_pack(codes: torch.Tensor, group_size: int) -> torch.Tensor:
    """(N, K) uint8 codes in [0, 15] -> the int4 kernel's layout, 1-D uint8 of
    ceil(N / 16) * 16 * Kp / 2 bytes with Kp = ceil(K / group_size) * group_size: blocks of
    16 rows, each stored as [Kp / 4][16][2] bytes, byte 2r + j of column step k holding
    q[r, k + j] in its low nibble and q[r, k + 2 + j] in its high one (padding codes 0)."""
    return _pack_codes(codes, group_size, 4)


def int4_unpack(packed: torch.Tensor, out_features: int, in_features: int, group_size: int) -> torch.Tensor:
    """The (N, K) uint8 codes of ``int4_pack``'s layout."""
    return _unpack_codes(packed, out_features, in_features, group_size, 4)


def _int4_kernel_mm(
    name: str, x2: torch.Tensor, packed: torch.Tensor, sz: torch.Tensor, out_features: int, group_size: int
) -> torch.Tensor:
    """Run the int4 kernel ``name`` (int4_gemm_bf16 or int4a8_gemm_bf16) after checking
    everything it reads. Returns (M, N) bf16."""
    lib = _library()
    M, K = x2.shape
    N, G = out_features, group_size
    Np, Kp = -(-N // INT4_BLOCK_ROWS) * INT4_BLOCK_ROWS, -(-K // G) * G
    step, public = (8, "int4a8_mm") if name == "int4a8_gemm_bf16" else (4, "int4_mm")
    if not (
        lib is not None
        and K >= 1
        and x2.dtype == sz.dtype == torch.bfloat16
        and packed.dtype == torch.uint8
        and packed.numel() == Np * Kp // 2
        and sz.shape == (Kp // G, N, 2)
        and x2.is_contiguous()
        and packed.is_contiguous()
        and sz.is_contiguous()
        and G % step == 0
    ):
        raise ValueError(
            f"{public}: x {tuple(x2.shape)} {x2.dtype}, {packed.numel()} packed bytes and scales "
            f"{tuple(sz.shape)} {sz.dtype} do not fit an ({N}, {K}) weight in groups of {G} "
            "(contiguous bfloat16 activations and scales)"
        )
    y = torch.empty(M, N, dtype=torch.bfloat16)
    if M == 0:
        return y
    rc = getattr(lib, name)(
        x2.data_ptr(), packed.data_ptr(), sz.data_ptr(), y.data_ptr(), M, N, K, G, torch.get_num_threads()
    )
    if rc:
        raise MemoryError(f"{public}: the kernel could not allocate its scratch")
    return y


def int4_mm(
    x2: torch.Tensor, packed: torch.Tensor, scales_and_zeros: torch.Tensor, out_features: int, group_size: int
) -> torch.Tensor:
    """x2 (M, K) bf16 times the int4 weight of ``int4_pack``'s layout, w = (q - 8) * s + z
    with ``scales_and_zeros`` (ceil(K / G), N, 2) bf16. Returns (M, N) bf16."""
    return _int4_kernel_mm("int4_gemm_bf16", x2, packed, scales_and_zeros, out_features, group_size)


# -- int4 weights times int8 activations (w4a8, CPU) ----------------------------------------


@functools.cache
def int4a8_available() -> bool:
    """Whether this machine runs the w4a8 kernel (a C compiler, AVX512-VNNI and AVX512-BF16)."""
    return _probe_int4("int4a8_gemm_bf16", int4a8_pack)


def int4a8_pack(codes: torch.Tensor, group_size: int) -> torch.Tensor:
    """(N, K) uint8 codes in [0, 15] -> the w4a8 kernel's layout: as ``int4_pack``'s with
    steps of 8 columns, [Kp / 8][16][4] bytes per block, byte 4r + j of column step k
    holding q[r, k + j] in its low nibble and q[r, k + 4 + j] in its high one."""
    return _pack_codes(codes, group_size, 8)


def int4a8_unpack(packed: torch.Tensor, out_features: int, in_features: int, group_size: int) -> torch.Tensor:
    """The (N, K) uint8 codes of ``int4a8_pack``'s layout."""
    return _unpack_codes(packed, out_features, in_features, group_size, 8)


def int4a8_mm(
    x2: torch.Tensor, packed: torch.Tensor, scales_and_zeros: torch.Tensor, out_features: int, group_size: int
) -> torch.Tensor:
    """x2 (M, K) bf16, quantized to int8 per row and group, times the int4 weight of
    ``int4a8_pack``'s layout (see kernels/int4a8_gemm.c). Returns (M, N) bf16."""
    return _int4_kernel_mm("int4a8_gemm_bf16", x2, packed, scales_and_zeros, out_features, group_size)


# -- int8 weights, bf16 activations (kernels/int8_gemm.c) ----------------------------------


def int8_pack(q: torch.Tensor) -> torch.Tensor:
    """(N, K) int8 codes -> the kernel's layout: ceil(N / 16) blocks of 16 rows, each
    [Kp / 2][16][2] bytes (Kp = K rounded up to even; padding codes 0)."""
    N, K = q.shape
    R = INT4_BLOCK_ROWS
    Np, Kp = -(-N // R) * R, K + K % 2
    c = torch.zeros(Np, Kp, dtype=torch.int8, device=q.device)
    c[:N, :K] = q
    return c.view(Np // R, R, Kp // 2, 2).permute(0, 2, 1, 3).contiguous().view(-1)


def int8_unpack(packed: torch.Tensor, out_features: int, in_features: int) -> torch.Tensor:
    """The (N, K) int8 codes of ``int8_pack``'s layout."""
    R = INT4_BLOCK_ROWS
    Np, Kp = -(-out_features // R) * R, in_features + in_features % 2
    c = packed.view(Np // R, Kp // 2, R, 2).permute(0, 2, 1, 3).reshape(Np, Kp)
    return c[:out_features, :in_features]


def _probe_int8(act8: bool) -> bool:
    """Codes of -3 with a scale of 0.5 and a bias of 1 over 41 ones give -60.5 per output
    (with int8 activations too: ones round exactly)."""

    def run(lib: ctypes.CDLL) -> bool:
        q = torch.full((3, 41), -3, dtype=torch.int8)
        packed = int8a8_pack(q) if act8 else int8_pack(q)
        scales = torch.full((3,), 0.5, dtype=torch.bfloat16)
        bias = torch.ones(3, dtype=torch.bfloat16)
        x = torch.ones(1, 41, dtype=torch.bfloat16)
        return bool((_int8_kernel_mm(act8, x, packed, scales, bias, 3, 41) == -60.5).all())

    return _probe(run)


@functools.cache
def int8_available() -> bool:
    """Whether this machine runs the int8 kernel (a C compiler and AVX512-BF16)."""
    return _probe_int8(False)


def _int8_kernel_mm(
    act8: bool,
    x2: torch.Tensor,
    packed: torch.Tensor,
    scales: torch.Tensor,
    bias: torch.Tensor | None,
    out_features: int,
    in_features: int,
) -> torch.Tensor:
    """Run int8_gemm_bf16, or int8a8_gemm_bf16 with ``act8``, after checking everything it
    reads. Returns (M, N) bf16."""
    public = "int8a8_mm" if act8 else "int8_mm"
    lib = _library()
    M, K = x2.shape
    N, R = out_features, INT4_BLOCK_ROWS
    # the packed codes: K padded to the activation group (w8a8) or to even (int8)
    Kp = -(-K // W8A8_GROUP) * W8A8_GROUP if act8 else K + K % 2
    if lib is None:
        raise RuntimeError(
            f"{public}: the CPU kernels are not available (no C compiler, or they failed to build)"
        )
    if not (
        K == in_features >= 1
        and all(t.device.type == "cpu" for t in (x2, packed, scales, *(() if bias is None else (bias,))))
        and x2.dtype == scales.dtype == torch.bfloat16
        and packed.dtype == (torch.uint8 if act8 else torch.int8)
        and packed.numel() == -(-N // R) * R * Kp
        and scales.shape == (N,)
        and (bias is None or (bias.shape == (N,) and bias.dtype == torch.bfloat16 and bias.is_contiguous()))
        and x2.is_contiguous()
        and packed.is_contiguous()
        and scales.is_contiguous()
    ):
        raise ValueError(
            f"{public}: x {tuple(x2.shape)} {x2.dtype} on {x2.device.type}, {packed.numel()} packed bytes, "
            f"scales {tuple(scales.shape)} {scales.dtype} and bias "
            f"{None if bias is None else (tuple(bias.shape), bias.dtype)} do not fit an ({N}, {in_features}) "
            "weight (contiguous bfloat16 activations, scales and bias, all on the CPU)"
        )
    y = torch.empty(M, N, dtype=torch.bfloat16)
    if M == 0:
        return y
    ptrs = (x2.data_ptr(), packed.data_ptr(), scales.data_ptr(), None if bias is None else bias.data_ptr())
    if act8:
        rc = lib.int8a8_gemm_bf16(*ptrs, y.data_ptr(), M, N, K, W8A8_GROUP, torch.get_num_threads())
    else:
        rc = lib.int8_gemm_bf16(*ptrs, y.data_ptr(), M, N, K, torch.get_num_threads())
    if rc:
        needs = "AVX512-VNNI and AVX512-BF16" if act8 else "AVX512-BF16"
        raise RuntimeError(
            f"{public}: the kernel failed (code {rc}: {'no scratch memory' if rc == 2 else 'no ' + needs})"
        )
    return y


def int8_mm(
    x2: torch.Tensor,
    packed: torch.Tensor,
    scales: torch.Tensor,
    bias: torch.Tensor | None,
    out_features: int,
    in_features: int,
) -> torch.Tensor:
    """x2 (M, K) bf16 times the (N, K) int8 weight of ``int8_pack``'s layout, scaled per
    output and plus ``bias``, in float32 with one rounding to bf16. Returns (M, N) bf16."""
    return _int8_kernel_mm(False, x2, packed, scales, bias, out_features, in_features)


# -- int8 weights times int8 activations (w8a8, kernels/int4a8_gemm.c) ----------------------


def int8a8_pack(q: torch.Tensor) -> torch.Tensor:
    """(N, K) int8 codes -> the w8a8 kernel's layout: q + 128 as uint8, ceil(N / 16) blocks
    of 16 rows, each [Kp / 4][16][4] bytes (Kp = K rounded up to W8A8_GROUP; padding 128,
    a code of 0, which the zero-padded activations multiply anyway)."""
    N, K = q.shape
    R = INT4_BLOCK_ROWS
    Np, Kp = -(-N // R) * R, -(-K // W8A8_GROUP) * W8A8_GROUP
    c = torch.full((Np, Kp), 128, dtype=torch.uint8, device=q.device)
    c[:N, :K] = (q.to(torch.int16) + 128).to(torch.uint8)
    return c.view(Np // R, R, Kp // 4, 4).permute(0, 2, 1, 3).contiguous().view(-1)


def int8a8_unpack(packed: torch.Tensor, out_features: int, in_features: int) -> torch.Tensor:
    """The (N, K) int8 codes of ``int8a8_pack``'s layout."""
    R = INT4_BLOCK_ROWS
    Np, Kp = -(-out_features // R) * R, -(-in_features // W8A8_GROUP) * W8A8_GROUP
    c = packed.view(Np // R, Kp // 4, R, 4).permute(0, 2, 1, 3).reshape(Np, Kp)
    return (c[:out_features, :in_features].to(torch.int16) - 128).to(torch.int8)


@functools.cache
def int8a8_available() -> bool:
    """Whether this machine runs the w8a8 kernel (a C compiler, AVX512-VNNI and AVX512-BF16)."""
    return _probe_int8(True)


def int8a8_mm(
    x2: torch.Tensor,
    packed: torch.Tensor,
    scales: torch.Tensor,
    bias: torch.Tensor | None,
    out_features: int,
    in_features: int,
) -> torch.Tensor:
    """x2 (M, K) bf16, rounded to int8 per row and group of W8A8_GROUP inputs, times the (N,
    K) int8 weight of ``int8a8_pack``'s layout, scaled per output and plus ``bias``, with
    one rounding to bf16. Returns (M, N) bf16."""
    return _int8_kernel_mm(True, x2, packed, scales, bias, out_features, in_features)
