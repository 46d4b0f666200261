"""The C decode stack equals the layer-by-layer path bit for bit, and steps aside when it must.

Each case builds a tiny Llama-family model in bf16 (plain or int4 weights), a paged
cache holding random history for each row, and one decode step; the step runs once
through ``kernels/decode_stack.c`` and once layer by layer on a copy of the cache. The
hidden states and every key and value written must be identical.
"""

from __future__ import annotations

import pytest
import torch

import tiny
from tokenmill import LLM, SamplingParams
from tokenmill.layers import cpu_kernels
from tokenmill.layers.decode_stack import DecodeStack, rmsnorm_lanes
from tokenmill.layers.linear import pack_linears_for_onednn
from tokenmill.layers.norms import RMSNorm
from tokenmill.layers.paged_attention import PagedAttention, PagedKVCache, PrefillChunk
from tokenmill.layers.quantized import quantize_model

pytestmark = pytest.mark.skipif(
    not (cpu_kernels.int4_available() and cpu_kernels.bf16_gemv_available()),
    reason="the decode stack needs the C kernels with AVX512-BF16",
)

BS = 4


def _model(arch: str, quant: str | None, wide: str | None = None):
    """A tiny model of ``arch`` in bf16, its linear layers as the loader leaves them on CPU:
    quantized, or plain bf16 packed for oneDNN. ``wide``: one of the real widths in
    ``_WIDE`` (2 layers), where summation orders that agree at width 64 can part."""
    hf = tiny.hf_model(arch, seed=3) if wide is None else _wide_hf(wide)
    model = tiny.native_from_hf(hf, torch.bfloat16)
    if quant:
        quantize_model(model, quant, 32, dtype=torch.bfloat16)
    else:
        assert pack_linears_for_onednn(model)
    return model


_WIDE = {
    # SmolLM2: 576 / 1536, 9 query and 3 KV heads of 64
    "smollm2": ("LlamaConfig", dict(hidden_size=576, intermediate_size=1536, num_attention_heads=9,
                                    num_key_value_heads=3, rms_norm_eps=1e-5)),
    # Gemma 3 270M: 640 / 2048, 4 query heads and 1 KV head of 256 (the generic attention
    # kernel), one sliding layer and one full
    "gemma3": ("Gemma3TextConfig", dict(hidden_size=640, intermediate_size=2048, num_attention_heads=4,
                                        num_key_value_heads=1, head_dim=256, sliding_window=16,
                                        layer_types=["sliding_attention", "full_attention"],
                                        query_pre_attn_scalar=256)),
    # Qwen3's per-head q/k norms over 128 dims, the AVX-512 attention path's widest head
    "qwen3": ("Qwen3Config", dict(hidden_size=512, intermediate_size=1024, num_attention_heads=8,
                                  num_key_value_heads=2, head_dim=128)),
}  # fmt: skip


def _wide_hf(name: str):
    import transformers

    config_class, widths = _WIDE[name]
    cfg = getattr(transformers, config_class)(
        vocab_size=tiny.VOCAB, num_hidden_layers=2, max_position_embeddings=256, **widths
    )
    torch.manual_seed(3)
    hf = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():  # norms away from their init, so that a weight of 1 (or 1 + 0) hides nothing
        for pname, p in hf.named_parameters():
            if "norm" in pname:
                p.add_(torch.randn_like(p) * 0.1)
    return hf


def _step(model, lens: list[int], seed: int = 0, chunk: bool = False):
    """x, positions, a context and its cache for one decode token per row (``lens``: the
    context length of each row, the new token included), history random."""
    cfg = model.config
    g = torch.Generator().manual_seed(seed)
    width = max(-(-n // BS) for n in lens)
    nb = len(lens) * width + 3
    cache = PagedKVCache(
        cfg.num_layers, nb, BS, cfg.num_kv_heads, cfg.head_dim, torch.bfloat16, torch.device("cpu")
    )
    for t in cache.k + cache.v:
        t.copy_(torch.randn(t.shape, generator=g))
    perm = torch.randperm(nb, generator=g)
    tables = [perm[i * width : (i + 1) * width].tolist() for i in range(len(lens))]
    slots = [tables[i][(n - 1) // BS] * BS + (n - 1) % BS for i, n in enumerate(lens)]
    ctx = PagedAttention(
        cache,
        torch.tensor(slots),
        max(lens) - 1,
        len(lens),
        decode_tables=torch.tensor(tables),
        decode_lens=torch.tensor(lens),
        chunks=[PrefillChunk(len(lens), 1, 1, None)] if chunk else [],
    )
    x = model.embed(torch.randint(0, cfg.vocab_size, (1, len(lens)), generator=g))
    positions = torch.tensor([[n - 1 for n in lens]])
    return x, positions, ctx


def _clone_ctx(ctx: PagedAttention) -> PagedAttention:
    cache = ctx.cache
    copy = PagedKVCache.__new__(PagedKVCache)
    copy.k, copy.v = [t.clone() for t in cache.k], [t.clone() for t in cache.v]
    copy.num_blocks, copy.block_size = cache.num_blocks, cache.block_size
    return PagedAttention(
        copy,
        ctx.slot_mapping,
        ctx.max_position,
        ctx.num_decode,
        ctx.decode_tables,
        ctx.decode_lens,
        list(ctx.chunks),
        ctx.use_kernels,
    )


def _assert_stack_equals_layers(model, lens, monkeypatch) -> None:
    """One decode step of ``lens`` through the stack and layer by layer: the same hidden
    states and the same keys and values written, and the stack did run."""
    x, positions, ctx = _step(model, lens)
    out, ref, ctx, ref_ctx, calls = _both(model, x, positions, ctx, monkeypatch)
    assert calls == 1, model._decode_stack
    assert torch.equal(out, ref)
    for a, b in zip(ctx.cache.k + ctx.cache.v, ref_ctx.cache.k + ref_ctx.cache.v):
        assert torch.equal(a, b)


def _both(model, x, positions, ctx, monkeypatch):
    """(stack output, reference output, stack context, reference context, stack calls)."""
    calls = []

    def spy(self, *a):
        out = real_run(self, *a)
        calls.append(out is not None)  # a run that declined (None) is not a stack step
        return out

    real_run = DecodeStack.run
    monkeypatch.setattr(DecodeStack, "run", spy)
    ref_ctx = _clone_ctx(ctx)
    with torch.inference_mode():
        model._decode_stack = None
        out = model.run_layers(x, positions, ctx)
        stack = model._decode_stack
        model._decode_stack = False  # the layer-by-layer path
        ref = model.run_layers(x, positions, ref_ctx)
        model._decode_stack = stack
    return out, ref, ctx, ref_ctx, sum(calls)


@pytest.mark.parametrize("arch", ["llama", "llama3", "mistral", "qwen2", "qwen3", "gemma3"])
@pytest.mark.parametrize(
    "quant,lens",
    [
        (None, [5]),
        (None, [9, 1, 30, 17]),
        (None, [9, 1, 30, 17, 3, 22, 8, 5, 12]),  # bf16 past 4 rows: the tiled product
        ("int4", [5]),
        ("int4", [3, 40, 1, 8, 19, 2, 11]),
        ("w4a8", [3, 40, 1, 8, 19, 2, 11, 6, 5, 4]),
        ("int8", [5]),
        ("int8", [3, 40, 1, 8, 19, 2, 11, 6, 5, 4, 9, 17, 12, 30, 7, 2, 1]),  # 17 rows: widened blocks
        ("w8a8", [5]),
        ("w8a8", [3, 40, 1, 8, 19, 2, 11, 6, 5, 4, 9, 17, 12, 30, 7, 2, 1]),
    ],
)
def test_stack_equals_layer_by_layer(arch, quant, lens, monkeypatch):
    _assert_stack_equals_layers(_model(arch, quant), lens, monkeypatch)


@pytest.mark.parametrize(
    "quant,lens",
    [
        (None, [7]),
        (None, [9, 30, 17, 5]),
        (None, [9, 30, 17, 5, 1, 2, 33, 8, 4, 6, 12, 20, 3, 7, 11, 25]),
        (None, [(7 * i) % 41 + 1 for i in range(64)]),
        ("w4a8", [9, 30, 17, 5, 40, 2]),
        ("int8", [9, 30, 17, 5, 40, 2]),
        ("int8", [(7 * i) % 41 + 1 for i in range(64)]),
        ("w8a8", [(7 * i) % 41 + 1 for i in range(64)]),
    ],
)
def test_stack_equals_layer_by_layer_at_smollm2_widths(quant, lens, monkeypatch):
    _assert_stack_equals_layers(_model("llama", quant, wide="smollm2"), lens, monkeypatch)


@pytest.mark.parametrize(
    "arch,quant,lens",
    [
        ("gemma3", None, [7]),
        ("gemma3", None, [9, 30, 17, 5, 1, 40, 2]),
        ("gemma3", "w4a8", [9, 30, 17, 5, 40, 2]),
        ("qwen3", None, [9, 30, 17, 5, 40, 2]),
        ("qwen3", "w4a8", [9, 30, 17, 5, 40, 2]),
    ],
)
def test_gemma3_and_qwen3_stacks_equal_layer_by_layer_at_real_widths(arch, quant, lens, monkeypatch):
    _assert_stack_equals_layers(_model(arch, quant, wide=arch), lens, monkeypatch)


def _mixed(arch: str, wide: str | None = None):
    """A tiny model whose linear layers are of every kind at once, as a GGUF file with
    mixed tensor types loads in "gguf" mode: int8, w8a8, w4a8, int4 and bf16
    left packed for oneDNN."""
    hf = tiny.hf_model(arch, seed=5) if wide is None else _wide_hf(wide)
    model = tiny.native_from_hf(hf, torch.bfloat16)
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    kinds = ("int8", "w4a8", "none", "int4", "w8a8")
    modes = {n: kinds[i % len(kinds)] for i, n in enumerate(names)}
    report = quantize_model(model, "gguf", 32, dtype=torch.bfloat16, layer_modes=modes)
    assert set(report.modes.values()) == {"int8", "w8a8", "w4a8", "int4"} and report.kept
    assert pack_linears_for_onednn(model)
    return model


@pytest.mark.parametrize(
    "arch,wide,lens",
    [
        ("llama", None, [5]),
        ("llama", None, [3, 40, 1, 8, 19, 2, 11, 6, 5, 4, 9, 17, 12, 30, 7, 2, 1]),
        ("gemma3", None, [9, 30, 17, 5]),
        ("llama", "smollm2", [9, 30, 17, 5, 40, 2]),
    ],
)
def test_stack_of_mixed_layer_kinds_equals_layer_by_layer(arch, wide, lens, monkeypatch):
    _assert_stack_equals_layers(_mixed(arch, wide), lens, monkeypatch)


def test_gemma3_stack_refuses_a_step_without_the_local_rope():
    model = _model("gemma3", "int4")
    x, positions, ctx = _step(model, [5, 9])
    stack, why = DecodeStack.build(model)
    assert stack is not None, why
    cos, sin, *_ = model.rope_tables(positions, x.dtype, ctx)
    with pytest.raises(ValueError, match="local rope"):
        stack.run(x, cos, sin, ctx)


def test_bf16_stack_takes_the_rows_its_layers_send_to_the_kernel():
    stack, _ = DecodeStack.build(_model("llama", None))
    assert stack.max_rows == cpu_kernels.BF16_TILE_MAX_ROWS == 64
    stack, _ = DecodeStack.build(_model("llama", "int4"))
    assert stack.max_rows == 256


def test_unpacked_bf16_layers_run_layer_by_layer():
    """A plain nn.Linear sums its few-row products in F.linear's order, not the GEMV
    kernel's, so a model the loader left unpacked (too big to pack) keeps the layer path."""
    model = tiny.native_from_hf(tiny.hf_model("llama", seed=3), torch.bfloat16)
    assert DecodeStack.build(model) == (None, "layer 0 has a norm or linear layer the C stack does not take")


def test_mistral_window_is_applied():
    """Context longer than the sliding window: the stack's output must differ from a
    model without the window (so the window test above is not vacuous)."""
    model = _model("mistral", None)
    assert model.model.layers[0].self_attn.window == 16
    x, positions, ctx = _step(model, [30, 25])
    with torch.inference_mode():
        windowed = model.run_layers(x, positions, _clone_ctx(ctx))
        for layer in model.model.layers:
            layer.self_attn.window = None
        model._decode_stack = None
        full = model.run_layers(x, positions, ctx)
    assert not torch.equal(windowed, full)


@pytest.mark.parametrize(
    "case,why",
    [
        ("bf16 rows", None),  # 65 rows of bf16 weights: more than the bf16 kernel takes
        ("chunk", None),  # a prefill chunk in the step
        ("no kernels", None),  # the reference path was asked for
        ("gelu llama", "layer 0 is not a SiLU-gated layer of its family"),
    ],
)
def test_steps_the_stack_does_not_take_run_layer_by_layer(case, why, monkeypatch):
    model = _model("llama", None)
    if case == "gelu llama":  # an activation the stack was not built for
        model.model.layers[0].mlp.act = torch.nn.functional.gelu
    lens = [(5 * i) % 13 + 1 for i in range(65)] if case == "bf16 rows" else [4, 6]
    x, positions, ctx = _step(model, lens, chunk=case == "chunk")
    if case == "chunk":  # the chunk's token rides along as a sixth row
        x = torch.cat([x, x[:, :1]], dim=1)
        positions = torch.cat([positions, torch.zeros(1, 1, dtype=torch.long)], dim=1)
        ctx.slot_mapping = torch.cat([ctx.slot_mapping, torch.tensor([0])])
    ctx.use_kernels = case != "no kernels"
    out, ref, _, _, calls = _both(model, x, positions, ctx, monkeypatch)
    assert calls == 0
    assert torch.equal(out, ref)
    if why:
        assert model._decode_stack is False
        assert DecodeStack.build(model) == (None, why)


def test_indices_outside_the_cache_are_refused():
    model = _model("llama", "int4")
    x, positions, ctx = _step(model, [5, 6])
    ctx.decode_tables[1, 0] = ctx.cache.num_blocks  # one past the last block
    with torch.inference_mode(), pytest.raises(ValueError, match="outside the KV cache"):
        model.run_layers(x, positions, ctx)


@pytest.mark.parametrize("hidden", [64, 100, 576, 2048, 20000])
def test_rmsnorm_matches_pytorch_bit_for_bit(hidden):
    """The C norm reproduces PyTorch's float32 sum order; the probe finds the width, and the
    width matters (another one gives a different sum for most rows)."""
    lanes = rmsnorm_lanes(hidden, 1e-5)
    assert lanes is not None
    lib = cpu_kernels._library()
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(64, hidden, generator=g) * 30).bfloat16()
    add = torch.randn(64, hidden, generator=g).bfloat16()
    norm = RMSNorm(hidden, 1e-5).bfloat16()
    with torch.no_grad():
        norm.weight.uniform_(0, 2, generator=g)
        want, want_res = norm(x, add)
    res, out = x.clone(), torch.empty_like(x)
    lib.decode_stack_norm(
        res.data_ptr(), add.data_ptr(), norm.weight.data_ptr(), out.data_ptr(), 64, hidden, 1e-5, lanes, 0
    )
    assert torch.equal(out, want) and torch.equal(res, want_res)
    sq = torch.randn(64, hidden, generator=g).pow(2)
    sums = {}
    for width in (lanes, 1 if lanes != 1 else 4):
        sums[width] = torch.empty(64)
        lib.decode_stack_sum(sq.data_ptr(), sums[width].data_ptr(), 64, hidden, width)
    assert torch.equal(sums[lanes], sq.sum(-1))
    if hidden >= 576:
        assert not torch.equal(sums[1 if lanes != 1 else 4], sq.sum(-1))


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
@pytest.mark.parametrize("quant", [None, "int8", "int4", "w4a8", "w8a8"])
def test_engine_greedy_outputs_unchanged_by_the_stack(tiny_root, arch, quant, monkeypatch):
    """Whole requests through the engine, batched: tokens and logprobs equal with and without the stack."""
    llm = LLM(tiny.save_tiny_dir(arch, tiny_root), dtype="bfloat16", quantization=quant)
    model = llm.engine.runner.model
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logprobs=3)
    prompts = ["The capital of France", "Hello", "def f(x):", "Rome"]
    ran = []
    real_run = DecodeStack.run
    monkeypatch.setattr(DecodeStack, "run", lambda self, *a: ran.append(real_run(self, *a)) or ran[-1])
    with_stack = llm.generate(prompts, params)
    assert ran and all(out is not None for out in ran), "the stack should run these steps"
    model._decode_stack = False
    without = llm.generate(prompts, params)
    for a, b in zip(with_stack, without):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        assert a.outputs[0].logprobs == b.outputs[0].logprobs


def test_stack_is_rebuilt_when_the_weights_are_replaced():
    """Weights moved into new tensors (here float32 and back): the old stack would read the
    old ones, so a new one is built, and it computes with the new weights."""
    model = _model("llama", None)
    x, positions, ctx = _step(model, [5, 9])
    with torch.inference_mode():
        model.run_layers(x, positions, _clone_ctx(ctx))
    old = model._decode_stack
    assert old
    model.float().bfloat16()
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight.mul_(2)  # so stale weights would show
    ref_ctx = _clone_ctx(ctx)
    with torch.inference_mode():
        out = model.run_layers(x, positions, ctx)  # the stale stack is still set here
        new = model._decode_stack
        model._decode_stack = False
        ref = model.run_layers(x, positions, ref_ctx)
    assert new and new is not old
    assert torch.equal(out, ref)


def test_copies_and_pickles_build_their_own_stack():
    import copy
    import io

    model = _model("llama", "int4")
    x, positions, ctx = _step(model, [5, 9])
    with torch.inference_mode():
        model.run_layers(x, positions, _clone_ctx(ctx))
    assert model._decode_stack
    twin = copy.deepcopy(model)
    assert twin._decode_stack is None  # not the original's pointers
    buf = io.BytesIO()
    torch.save(model, buf)  # the stack's ctypes structures are not in the pickle
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    for other in (twin, loaded):
        ref_ctx = _clone_ctx(ctx)
        with torch.inference_mode():
            out = other.run_layers(x, positions, _clone_ctx(ctx))
            assert other._decode_stack and other._decode_stack is not model._decode_stack
            ref = model.run_layers(x, positions, ref_ctx)
        assert torch.equal(out, ref)
