"""Paged attention equals dense attention on the same keys, and the CPU kernel equals the
PyTorch reference path."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tokenmill.layers import cpu_kernels
from tokenmill.layers.paged_attention import PagedAttention, PagedKVCache, PrefillChunk


def _reference(q, k, v, scale, window):
    """Attention of the last T positions of one sequence, with an explicit mask. q (T,H,D); k,v (S,Hkv,D)."""
    T, H, _ = q.shape
    S, Hkv = k.shape[0], k.shape[1]
    q_pos = torch.arange(S - T, S).unsqueeze(1)
    k_pos = torch.arange(S).unsqueeze(0)
    mask = k_pos <= q_pos
    if window is not None:
        mask &= q_pos - k_pos < window
    kk = k.float().repeat_interleave(H // Hkv, dim=1).transpose(0, 1)
    vv = v.float().repeat_interleave(H // Hkv, dim=1).transpose(0, 1)
    out = F.scaled_dot_product_attention(q.float().transpose(0, 1), kk, vv, attn_mask=mask, scale=scale)
    return out.transpose(0, 1).reshape(T, -1)


def _scattered_cache(seqs_k, seqs_v, bs, dtype, seed=0):
    """Write each sequence's keys into randomly placed blocks; returns cache and block tables."""
    L, Hkv, D = 1, seqs_k[0].shape[1], seqs_k[0].shape[2]
    need = sum(-(-k.shape[0] // bs) for k in seqs_k)
    cache = PagedKVCache(L, need + 5, bs, Hkv, D, dtype, torch.device("cpu"))
    g = torch.Generator().manual_seed(seed)
    free = torch.randperm(need + 5, generator=g).tolist()
    tables = []
    for k, v in zip(seqs_k, seqs_v):
        nb = -(-k.shape[0] // bs)
        table = [free.pop() for _ in range(nb)]
        tables.append(table)
        for p in range(k.shape[0]):
            cache.k[0][table[p // bs], p % bs] = k[p]
            cache.v[0][table[p // bs], p % bs] = v[p]
    return cache, tables


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("use_kernels", [False, True])
@pytest.mark.parametrize("window", [None, 7])
@pytest.mark.parametrize("H,Hkv", [(4, 4), (4, 2), (9, 3)])
def test_mixed_batch_of_decodes_and_chunks_matches_dense(dtype, use_kernels, window, H, Hkv):
    """Three decode rows and two prefill chunks (one with earlier context) in one flat batch."""
    torch.manual_seed(0)
    D, bs, scale = 16, 4, 0.3
    lens = [9, 1, 22, 13, 6]  # total keys per sequence
    new = [1, 1, 1, 5, 6]  # tokens computed this pass (the last ``new`` of each sequence)
    ks = [torch.randn(n, Hkv, D).to(dtype) for n in lens]
    vs = [torch.randn(n, Hkv, D).to(dtype) for n in lens]
    qs = [torch.randn(t, H, D).to(dtype) for t in new]
    # The cache holds only the earlier context; the pass writes the new keys itself.
    cache, tables = _scattered_cache(ks, vs, bs, dtype)
    for i, (n, t) in enumerate(zip(lens, new)):
        for p in range(n - t, n):
            cache.k[0][tables[i][p // bs], p % bs] = 0
            cache.v[0][tables[i][p // bs], p % bs] = 0
    slots, chunks, start = [], [], 0
    for i, (n, t) in enumerate(zip(lens, new)):
        slots += [tables[i][p // bs] * bs + p % bs for p in range(n - t, n)]
        if t > 1:
            blocks = None if n == t else torch.tensor(tables[i][: -(-n // bs)])
            chunks.append(PrefillChunk(start, t, n, blocks))
        start += t
    width = max(len(t) for t in tables[:3])
    ctx = PagedAttention(
        cache,
        torch.tensor(slots),
        max(lens),
        num_decode=3,
        decode_tables=torch.tensor([t + [0] * (width - len(t)) for t in tables[:3]]),
        decode_lens=torch.tensor(lens[:3]),
        chunks=chunks,
        use_kernels=use_kernels,
    )
    q = torch.cat(qs)[None]
    k_new = torch.cat([k[n - t :] for k, n, t in zip(ks, lens, new)])[None]
    v_new = torch.cat([v[n - t :] for v, n, t in zip(vs, lens, new)])[None]
    out = ctx.attend(0, q, k_new, v_new, scale, window)[0]
    expected = torch.cat([_reference(qq, k, v, scale, window) for qq, k, v in zip(qs, ks, vs)])
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out.float(), expected, atol=tol, rtol=tol)


@pytest.mark.skipif(not cpu_kernels.paged_decode_available(torch.float32), reason="no C compiler here")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "R,H,Hkv,D,bs",
    [
        (6, 8, 2, 64, 16),  # whole-row tasks
        (1, 8, 2, 64, 16),  # fewer rows than threads: (row, KV head) tasks
        (5, 16, 2, 128, 8),  # 8 query heads per KV head: two register tiles of the wide head
        (4, 9, 3, 64, 32),  # 3 per KV head, a tile of 3
        (3, 4, 4, 32, 5),  # block size that 16 keys straddle
        (6, 4, 1, 256, 16),  # Gemma 3's heads: values in two column chunks of 128
        (1, 4, 1, 256, 16),
        (4, 6, 2, 192, 8),  # a chunk of 128 columns and one of 64
    ],
)
def test_cpu_kernel_equals_reference_on_long_contexts(dtype, R, H, Hkv, D, bs):
    torch.manual_seed(1)
    NB = 200 * 16 // bs
    kc = torch.randn(NB, bs, Hkv, D).to(dtype)
    vc = torch.randn(NB, bs, Hkv, D).to(dtype)
    lens = torch.tensor([1, 17, 300, 511, 64, 129])[:R]
    width = int(-(-lens.max() // bs))
    tables = torch.randperm(NB)[: R * width].view(R, width)
    q = torch.randn(R, H, D).to(dtype)
    cache = PagedKVCache(1, 1, bs, Hkv, D, dtype, torch.device("cpu"))
    for window in (None, 100):
        ref = PagedAttention(cache, torch.zeros(0), 0, R, tables, lens, use_kernels=False)._decode(
            q, kc, vc, 0.125, window
        )
        out = cpu_kernels.paged_decode(q, kc, vc, tables, lens, 0.125, window)
        tol = 1e-5 if dtype == torch.float32 else 1e-2
        torch.testing.assert_close(out.float(), ref.float(), atol=tol, rtol=tol)


@pytest.mark.skipif(not cpu_kernels.paged_decode_available(torch.bfloat16), reason="no C compiler here")
@pytest.mark.parametrize(
    "H,Hkv,D,bs",
    [(9, 3, 64, 16), (16, 2, 128, 8), (4, 4, 32, 5), (8, 1, 64, 32), (4, 1, 256, 16), (6, 2, 192, 8)],
)
def test_cpu_kernel_whole_row_tasks_equal_one_head_tasks_bit_for_bit(H, Hkv, D, bs):
    """A batch of rows runs whole-row tasks (each block read once for every KV head, the
    next row's keys requested during this one's values); one row alone runs one task per
    KV head. Both must give the same bits, row for row, windows and scattered blocks too."""
    torch.manual_seed(3)
    lens = torch.tensor([1, 17, 300, 64, 129, 5, 250, 33])
    R, width = len(lens), int(-(-lens.max() // bs))
    NB = R * width + 7
    kc = torch.randn(NB, bs, Hkv, D).bfloat16()
    vc = torch.randn(NB, bs, Hkv, D).bfloat16()
    tables = torch.randperm(NB)[: R * width].view(R, width)
    q = torch.randn(R, H, D).bfloat16()
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)  # 8 rows: whole-row tasks; 1 row: (row, KV head) tasks
        for window in (None, 40):
            batch = cpu_kernels.paged_decode(q, kc, vc, tables, lens, 0.125, window)
            for r in range(R):
                alone = cpu_kernels.paged_decode(
                    q[r : r + 1], kc, vc, tables[r : r + 1], lens[r : r + 1], 0.125, window
                )
                assert torch.equal(batch[r].view(torch.int16), alone[0].view(torch.int16)), (r, window)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.skipif(not cpu_kernels.paged_decode_available(torch.bfloat16), reason="no C compiler here")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_kernel_propagates_nan_to_its_own_row_only(dtype):
    torch.manual_seed(2)
    R, H, Hkv, D, bs = 4, 4, 2, 64, 16
    kc, vc = torch.randn(20, bs, Hkv, D).to(dtype), torch.randn(20, bs, Hkv, D).to(dtype)
    tables = torch.arange(20).view(4, 5)
    lens = torch.tensor([70, 33, 5, 80])
    q = torch.randn(R, H, D).to(dtype)
    q[1, 0, 3] = float("nan")
    out = cpu_kernels.paged_decode(q, kc, vc, tables, lens, 0.125, None).view(R, H, D)
    assert out[1, 0].isnan().all()  # the query head with the NaN, and no other
    assert not out[1, 1:].isnan().any()
    assert not out[[0, 2, 3]].isnan().any()


@pytest.mark.skipif(not cpu_kernels.paged_decode_available(torch.bfloat16), reason="no C compiler here")
@pytest.mark.parametrize(
    "what", ["block past the end", "negative block", "length past the table", "negative length"]
)
def test_cpu_kernel_refuses_a_block_or_length_outside_the_cache(what):
    kc = vc = torch.randn(6, 4, 2, 32).bfloat16()
    tables, lens = torch.tensor([[0, 1], [2, 3]]), torch.tensor([5, 8])
    if what == "block past the end":
        tables[1, 1] = 6
    elif what == "negative block":
        tables[0, 1] = -1
    elif what == "length past the table":
        lens[0] = 9
    else:
        lens[1] = -1
    q = torch.randn(2, 4, 32).bfloat16()
    with pytest.raises(ValueError, match="a length or block id is outside the cache"):
        cpu_kernels.paged_decode(q, kc, vc, tables, lens, 0.125, None)


def test_new_keys_land_in_their_slots_and_a_slot_outside_the_cache_is_refused():
    cache = PagedKVCache(1, 4, 4, 2, 8, torch.bfloat16, torch.device("cpu"))
    qkv = torch.randn(3, 6, 8).to(torch.bfloat16)  # a fused projection: k and v are strided views
    k, v = qkv[:, 2:4], qkv[:, 4:6]
    slots = torch.tensor([5, 0, 15])
    ctx = PagedAttention(cache, slots, 0)
    ctx._write(k, v, cache.k[0], cache.v[0])
    assert torch.equal(cache.k[0].view(-1, 2, 8)[slots], k)
    assert torch.equal(cache.v[0].view(-1, 2, 8)[slots], v)
    with pytest.raises(ValueError, match="slot mapping points outside the KV cache"):
        PagedAttention(cache, torch.tensor([16]), 0)._write(k[:1], v[:1], cache.k[0], cache.v[0])


PREFILL_SHAPES = [  # T, S, H, Hkv, D, Dv, window
    (512, 512, 9, 3, 64, 64, None),  # a SmolLM2 prompt
    (7, 30, 4, 2, 64, 64, None),  # a chunk after earlier context
    (33, 33, 8, 8, 128, 128, None),  # wide heads: two rows per value tile
    (70, 70, 4, 1, 256, 256, None),  # Gemma 3's heads: values in two column chunks of 128
    (9, 40, 2, 1, 256, 256, 16),
    (21, 21, 3, 3, 192, 192, None),  # a chunk of 128 columns and one of 64
    (20, 50, 4, 1, 32, 32, 16),  # a sliding window shorter than the chunk
    (100, 260, 6, 2, 80, 80, 40),  # head size 80 (not a multiple of 32)
    (1, 1, 2, 1, 64, 64, None),
    (17, 17, 2, 2, 2, 16, None),  # the smallest head sizes the kernel takes
]


@pytest.mark.skipif(not cpu_kernels.paged_decode_available(torch.bfloat16), reason="no C compiler here")
@pytest.mark.parametrize("T,S,H,Hkv,D,Dv,window", PREFILL_SHAPES, ids=str)
def test_prefill_kernel_matches_the_reference(T, S, H, Hkv, D, Dv, window):
    from tokenmill.layers.paged_attention import _chunk_attention

    g = torch.Generator().manual_seed(T * 7 + S)
    # q as the attention layer has it: a view into the fused q/k/v projection's rows
    qkv = torch.randn(T, H * D + 5, generator=g).to(torch.bfloat16)
    q = qkv[:, : H * D].view(T, H, D)
    k = torch.randn(S, Hkv, D, generator=g).to(torch.bfloat16)
    v = torch.randn(S, Hkv, Dv, generator=g).to(torch.bfloat16)
    scale = D**-0.5
    got = cpu_kernels.prefill_attention(q, k, v, scale, window)
    if not cpu_kernels.bf16_gemv_available():
        assert got is None  # no AVX512-BF16: the PyTorch path runs
        return
    assert got is not None and got.shape == (T, H * Dv)
    ref = _reference(q, k, v, scale, window)
    torch_path = _chunk_attention(q, k, v, scale, window, use_kernel=False).float()
    # within the error the PyTorch bf16 path itself has against the float32 reference
    err, err_torch = (got.float() - ref).abs().max(), (torch_path - ref).abs().max()
    assert err <= max(2 * err_torch, 1e-2), (err, err_torch)
    assert torch.equal(_chunk_attention(q, k, v, scale, window), got)


@pytest.mark.skipif(not cpu_kernels.paged_decode_available(torch.bfloat16), reason="no C compiler here")
def test_prefill_kernel_declines_what_it_does_not_take():
    q = torch.randn(4, 2, 64).to(torch.bfloat16)
    k = torch.randn(6, 1, 64).to(torch.bfloat16)
    assert cpu_kernels.prefill_attention(q, k, torch.randn(6, 1, 72).to(torch.bfloat16), 0.1, None) is None
    assert cpu_kernels.prefill_attention(q.float(), k.float(), k.float(), 0.1, None) is None
    assert (
        cpu_kernels.prefill_attention(q.transpose(1, 2).contiguous().transpose(1, 2), k, k, 0.1, None) is None
    )
    with pytest.raises(ValueError, match="prefill_attention: q, k and v do not agree"):
        cpu_kernels.prefill_attention(q, k[:3], k[:3], 0.1, None)  # fewer keys than queries
