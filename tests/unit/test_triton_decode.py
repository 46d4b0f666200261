"""The CUDA decode-attention kernel (layers/triton_kernels.py) run by Triton's interpreter
on the CPU, against the PyTorch reference path of PagedAttention.

The interpreter executes the kernel's program (block loop, masks, online softmax, GQA
groups padded to 16 rows) with NumPy, so a logic error shows here without a GPU. It
cannot check what only a GPU compiles: layouts, and bf16 products, which the interpreter
multiplies as raw bit patterns (triton-lang/triton#11584). fp16 takes the same branch of
the kernel as bf16 (low-precision inputs, float32 accumulation), so it stands in for it.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from tokenmill.layers import triton_kernels
from tokenmill.layers.paged_attention import PagedAttention, PagedKVCache

pytest.importorskip("triton", reason="Triton is not installed (the test extra installs it on Linux x86-64)")

DTYPES = [torch.float32, torch.float16]
SHAPES = [
    (4, 4, 32, 16),  # one query head per KV head, padded to 16 rows
    (9, 3, 64, 16),  # groups of 3
    (16, 2, 128, 32),  # groups of 8, wide heads, wide blocks
    (4, 1, 256, 16),  # Gemma 3's heads
    (32, 1, 64, 16),  # a group of 32 query heads
]
WINDOWS = [None, 100, 7]

# Triton picks the interpreter when it is imported, so the kernel runs in a process of its
# own: this one may already hold Triton in compiled mode.
_RUNNER = textwrap.dedent(
    """
    import sys
    import torch
    from tokenmill.layers import triton_kernels
    cases = torch.load(sys.argv[1])
    torch.save({key: triton_kernels.paged_decode(*args) for key, args in cases.items()}, sys.argv[2])
    """
)


def _case(dtype, H, Hkv, D, bs, window):
    """Inputs of paged_decode, as the engine passes them (int64 tables and lengths): rows
    of one key, a partial block, many blocks and an exact multiple of the block size, over
    scattered blocks. Returns the clean caches too: the kernel gets a copy with NaN in
    every slot no row may read (block 0, where the tables' padding points; the tail of a
    row's last block; the keys before its window), and must give what the reference gives
    on the clean one."""
    g = torch.Generator().manual_seed(H * D + bs)
    NB = 64
    kc = torch.randn(NB, bs, Hkv, D, generator=g).to(dtype)
    vc = torch.randn(NB, bs, Hkv, D, generator=g).to(dtype)
    lens = torch.tensor([1, 17, 300, 4 * bs])
    tables = torch.zeros(lens.numel(), -(-300 // bs), dtype=torch.int64)
    perm, used = torch.randperm(NB - 1, generator=g) + 1, 0
    kp, vp = kc.clone(), vc.clone()
    kp[0], vp[0] = float("nan"), float("nan")
    for r, n in enumerate(lens.tolist()):
        nb = -(-n // bs)
        tables[r, :nb] = perm[used : used + nb]
        used += nb
        first = max(n - window, 0) if window else 0
        for p in [*range(first), *range(n, nb * bs)]:
            kp[tables[r, p // bs], p % bs] = float("nan")
            vp[tables[r, p // bs], p % bs] = float("nan")
    q = torch.randn(lens.numel(), H, D, generator=g).to(dtype)
    return (q, kp, vp, tables, lens, D**-0.5, window), (kc, vc)


@pytest.fixture(scope="module")
def interpreted(tmp_path_factory):
    """Every case's kernel output, from one interpreted run."""
    cases = {
        (dtype, shape, window): _case(dtype, *shape, window)
        for dtype in DTYPES
        for shape in SHAPES
        for window in WINDOWS
    }
    tmp = tmp_path_factory.mktemp("triton")
    torch.save({key: args for key, (args, _) in cases.items()}, tmp / "in.pt")
    src = str(Path(triton_kernels.__file__).parents[2])
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [src, env.get("PYTHONPATH")]))
    run = subprocess.run(
        [sys.executable, "-c", _RUNNER, str(tmp / "in.pt"), str(tmp / "out.pt")],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    return cases, torch.load(tmp / "out.pt")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "H{}-Hkv{}-D{}-bs{}".format(*s))
@pytest.mark.parametrize("window", WINDOWS)
def test_interpreted_kernel_equals_the_reference(interpreted, dtype, shape, window):
    cases, outs = interpreted
    (q, _, _, tables, lens, scale, _), (kc, vc) = cases[(dtype, shape, window)]
    out = outs[(dtype, shape, window)]
    R, H, D = q.shape
    cache = PagedKVCache(1, 1, kc.shape[1], kc.shape[2], D, torch.float32, torch.device("cpu"))
    ref = PagedAttention(cache, torch.zeros(0), 0, R, tables, lens, use_kernels=False)
    expected = ref._decode(q.float(), kc.float(), vc.float(), scale, window)
    assert out.shape == (R, H * D) and out.dtype == dtype
    # fp16: the softmax weights are rounded to fp16 before the value product.
    tol = 1e-5 if dtype == torch.float32 else 4e-3
    torch.testing.assert_close(out.float(), expected, atol=tol, rtol=tol)


def test_supports_only_what_the_kernel_tiles(monkeypatch):
    """Power-of-two head and block sizes of at least 16 (tl.dot's smallest tile) and equal
    K and V heads; and nothing where Triton or CUDA is missing."""
    assert triton_kernels.available() == torch.cuda.is_available()
    monkeypatch.setattr(triton_kernels, "available", lambda: True)
    assert triton_kernels.supports(64, 64, 16) and triton_kernels.supports(128, 128, 32)
    for shape in [(64, 64, 8), (96, 96, 16), (64, 32, 16), (8, 8, 16), (64, 64, 24)]:
        assert not triton_kernels.supports(*shape), shape
    monkeypatch.setattr(triton_kernels, "available", lambda: False)
    assert not triton_kernels.supports(64, 64, 16)


def test_a_kernel_that_fails_to_build_falls_back_once(monkeypatch, caplog):
    """A shape Triton cannot build (e.g. too much shared memory for this GPU) returns None,
    so that the caller takes the PyTorch path, with one warning; it is not tried again."""
    from triton.runtime.errors import OutOfResources

    calls = []

    class Launcher:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                calls.append(grid)
                raise OutOfResources(232448, 166912, "shared memory")

            return launch

    monkeypatch.setattr(triton_kernels, "_kernel", lambda: Launcher())
    monkeypatch.setattr(triton_kernels, "_failed", set())
    (q, kc, vc, tables, lens, scale, window), _ = _case(torch.float16, 4, 1, 256, 16, None)
    with caplog.at_level("WARNING", logger="tokenmill.layers.triton_kernels"):
        assert triton_kernels.paged_decode(q, kc, vc, tables, lens, scale, window) is None
        assert triton_kernels.paged_decode(q, kc, vc, tables, lens, scale, window) is None
    assert len(calls) == 1
    (message,) = [r.getMessage() for r in caplog.records]
    assert message.startswith("Triton decode attention failed for 4 heads / 1 KV heads of 256, blocks of 16")
    assert "shared memory" in message and message.endswith("; using PyTorch attention")
