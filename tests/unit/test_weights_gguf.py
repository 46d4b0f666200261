"""GGUF reading: our header parser and dequantization against the ``gguf`` package (exact), tiny
models exported the way llama.cpp's converter does against transformers (fp32 ``atol=1e-4``),
and every error a broken file can cause, checked by its message."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

import tiny

gguf = pytest.importorskip("gguf", reason="the gguf package is the reference for GGUF")

from tokenmill.layers.attention import DenseAttention  # noqa: E402
from tokenmill.weights.errors import ModelLoadError  # noqa: E402
from tokenmill.weights.gguf_file import GGUFFile  # noqa: E402
from tokenmill.weights.model_loader import load_model  # noqa: E402

Q = gguf.GGMLQuantizationType


# -- real files ------------------------------------------------------------------------------------------
def _real_path(name: str) -> str:
    from tokenmill.weights.packaged import PACKAGED, packaged_path

    if not PACKAGED[name].is_installed():
        pytest.skip(f"{name} is not installed: {PACKAGED[name].install}")
    return packaged_path(name)


@pytest.fixture(scope="module", params=["smollm2-135m-instruct", "gemma3-270m"])
def real(request):
    """(our GGUFFile, the gguf package's GGUFReader) on one packaged file; the reader takes seconds."""
    path = _real_path(request.param)
    return GGUFFile(path), gguf.GGUFReader(path)


def _plain(value):
    return value.tolist() if isinstance(value, np.ndarray) else value


@pytest.mark.real
def test_real_metadata_equals_gguf_reader(real):
    ours, reader = real
    ref = {name: f.contents() for name, f in reader.fields.items() if not name.startswith("GGUF.")}
    assert set(ours.metadata) == set(ref)
    for key, value in ref.items():
        assert _plain(ours.metadata[key]) == value, key
    assert ours.metadata["general.architecture"] in ("llama", "gemma3")


@pytest.mark.real
def test_real_tensor_directory_equals_gguf_reader(real):
    ours, reader = real
    assert set(ours.tensor_info) == {t.name for t in reader.tensors}
    for t in reader.tensors:
        info = ours.tensor_info[t.name]
        assert info.shape == tuple(int(d) for d in reversed(t.shape)), t.name  # (out, in)
        assert info.qtype == int(t.tensor_type), t.name
        assert info.offset == t.data_offset and info.nbytes == t.n_bytes, t.name


def _samples(reader, per_type: int = 3):
    """A few tensors of every type: the two smallest and one from the last block."""
    by_type: dict[int, list] = {}
    for t in reader.tensors:
        by_type.setdefault(int(t.tensor_type), []).append(t)
    picked = []
    for ts in by_type.values():
        small = sorted(ts, key=lambda t: t.n_elements)[: per_type - 1]
        taken = {t.name for t in small}
        last = [t for t in ts if t.n_elements <= 4_000_000 and t.name not in taken][-1:]
        picked += small + last
    return picked


@pytest.mark.real
def test_real_tensors_equal_gguf_dequantize_exactly(real):
    ours, reader = real
    expected = {"llama": {"F32", "Q4_1", "Q8_0"}, "gemma3": {"F32", "Q4_K", "Q5_0", "Q6_K", "Q8_0"}}
    seen = set()
    for t in _samples(reader):
        ref = gguf.quants.dequantize(t.data, t.tensor_type).reshape(tuple(int(d) for d in reversed(t.shape)))
        got = ours.tensor(t.name)
        assert got.dtype == torch.float32, t.name
        assert tuple(got.shape) == ref.shape, t.name
        np.testing.assert_array_equal(got.numpy(), ref, err_msg=f"{t.name} ({t.tensor_type.name})")
        seen.add(t.tensor_type.name)
    assert seen == expected[ours.metadata["general.architecture"]]


# -- small files written with gguf.GGUFWriter --------------------------------------------------------------
# Byte offsets of the float16 scales in each K-quant block: random bytes there could be inf/NaN.
_K_QUANT_F16 = {Q.Q2_K: (80, 82), Q.Q3_K: (108,), Q.Q4_K: (0, 2), Q.Q5_K: (0, 2), Q.Q6_K: (208,)}
# What the gguf package quantizes in numpy (0.19); the K-quants it only dequantizes.
_QUANTIZABLE = [Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1]


def _random_blocks(qtype, rows: int, cols: int, rng: np.random.Generator) -> np.ndarray:
    """Random K-quant blocks with finite float16 scales: (rows, bytes per row) uint8."""
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, size=(rows * cols // block, size), dtype=np.uint8)
    for off in _K_QUANT_F16[qtype]:
        raw[:, off : off + 2] = (rng.standard_normal((len(raw), 1)) * 0.01).astype(np.float16).view(np.uint8)
    return raw.reshape(rows, -1)


def _write(path, arch: str, tensors: dict[str, tuple[np.ndarray, object]], meta: dict | None = None) -> str:
    """Write a GGUF file; tensors maps name -> (array, raw ggml type or None for a float array)."""
    w = gguf.GGUFWriter(os.fspath(path), arch)
    for key, value in (meta or {}).items():
        _add_kv(w, key, value)
    for name, (arr, qtype) in tensors.items():
        w.add_tensor(name, arr, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return os.fspath(path)


def _add_kv(w, key: str, value) -> None:
    if isinstance(value, bool):
        w.add_bool(key, value)
    elif isinstance(value, int):
        w.add_uint32(key, value)
    elif isinstance(value, float):
        w.add_float32(key, value)
    elif isinstance(value, str):
        w.add_string(key, value)
    elif value and isinstance(value[0], str):
        w.add_array(key, value)
    else:
        w.add_key_value(key, list(value), gguf.GGUFValueType.ARRAY, sub_type=gguf.GGUFValueType.INT32)


@pytest.fixture(scope="module")
def quant_file(tmp_path_factory):
    """One file holding every type the gguf package can write: name -> (file, reference, shape)."""
    rng = np.random.default_rng(0)
    path = tmp_path_factory.mktemp("quants") / "quants.gguf"
    tensors, refs = {}, {}
    shape = (3, 256)  # (out, in): not square, so a swapped order shows
    for qtype in _QUANTIZABLE:
        x = rng.standard_normal(shape).astype(np.float32)
        data = gguf.quants.quantize(x, qtype)
        raw = qtype if qtype not in (Q.F32, Q.F16) else None
        tensors[f"w.{qtype.name}"] = (data, raw)
        refs[f"w.{qtype.name}"] = gguf.quants.dequantize(data, qtype).reshape(shape)
    for qtype in _K_QUANT_F16:
        data = _random_blocks(qtype, *shape, rng)
        tensors[f"w.{qtype.name}"] = (data, qtype)
        refs[f"w.{qtype.name}"] = gguf.quants.dequantize(data, qtype).reshape(shape)
    cube = rng.standard_normal((2, 3, 32)).astype(np.float32)
    tensors["cube"], refs["cube"] = (cube, None), cube
    vec = rng.standard_normal(64).astype(np.float32)
    tensors["vec"], refs["vec"] = (vec, None), vec
    meta = {
        "test.answer": 42,
        "test.name": "quants",
        "test.words": ["a", "b c", "ü"],
        "test.ints": [1, -2, 3],
    }
    _write(path, "llama", tensors, meta)
    return GGUFFile(path), refs


@pytest.mark.parametrize(
    "name",
    [f"w.{q.name}" for q in _QUANTIZABLE] + [f"w.{q.name}" for q in _K_QUANT_F16] + ["cube", "vec"],
)
def test_written_tensor_equals_gguf_dequantize_exactly(quant_file, name):
    f, refs = quant_file
    got = f.tensor(name)
    assert got.dtype == torch.float32
    assert tuple(got.shape) == refs[name].shape == f.tensor_info[name].shape
    np.testing.assert_array_equal(got.numpy(), refs[name])


def test_written_metadata_and_directory(quant_file):
    f, refs = quant_file
    m = f.metadata
    assert m["general.architecture"] == "llama"
    assert m["test.answer"] == 42 and m["test.name"] == "quants"
    assert m["test.words"] == ["a", "b c", "ü"] and m["test.ints"] == [1, -2, 3]
    assert f.tensor_names == set(refs)
    assert dict(f.tensors(skip=frozenset({"cube"}))).keys() == set(refs) - {"cube"}


def test_unsupported_quantization_names_type_and_tensor(tmp_path):
    """A type the gguf package cannot dequantize (I32 here) is a clear error, not a stack trace."""
    path = _write(tmp_path / "i32.gguf", "llama", {"ids": (np.arange(32, dtype=np.int32), None)})
    with pytest.raises(ModelLoadError, match=r"tensor 'ids' uses quantization I32.*cannot dequantize"):
        GGUFFile(path).tensor("ids")


# -- tiny models exported the llama.cpp way ---------------------------------------------------------------
_TO_GGUF = {
    "model.embed_tokens": "token_embd",
    "model.norm": "output_norm",
    "lm_head": "output",
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm",
    "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
# diff vs Llama: Gemma 3 has four norms per layer; its "post_attention_layernorm" follows attention.
_TO_GGUF_GEMMA3 = {
    **_TO_GGUF,
    "post_attention_layernorm": "post_attention_norm",
    "pre_feedforward_layernorm": "ffn_norm",
    "post_feedforward_layernorm": "post_ffw_norm",
}


def _gguf_name(hf_name: str, arch: str) -> str:
    names = _TO_GGUF_GEMMA3 if arch == "gemma3" else _TO_GGUF
    stem, kind = hf_name.rsplit(".", 1)
    if stem.startswith("model.layers."):
        _, _, i, piece = stem.split(".", 3)
        return f"blk.{i}.{names[piece]}.{kind}"
    return f"{names[stem]}.{kind}"


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf permute of q/k rows (interleaved rope pairs)."""
    rows = w.shape[0]
    return w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


@pytest.fixture(scope="module")
def vocab(tmp_path_factory) -> dict:
    """tokenizer.ggml.* keys for tiny's byte-level BPE, padded to the model's vocabulary as llama.cpp does."""
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    tiny.train_tokenizer(str(path))
    model = json.loads(path.read_text())["model"]
    tokens = sorted(model["vocab"], key=model["vocab"].get)
    types = [3 if t in ("<s>", "</s>", "<pad>") else 1 for t in tokens]
    tokens += [f"[PAD{i}]" for i in range(len(tokens), tiny.VOCAB)]
    types += [5] * (tiny.VOCAB - len(types))  # gguf.TokenType.UNUSED
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    return {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "gpt-2",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": types,
        "tokenizer.ggml.merges": merges,
        "tokenizer.ggml.bos_token_id": 0,
        "tokenizer.ggml.eos_token_id": 1,
    }


def _arch_meta(hf, arch: str) -> dict:
    from tokenmill.models.config import hf_rope

    c = hf.config
    theta, _ = hf_rope(c.to_dict(), "full_attention")
    meta = {
        f"{arch}.block_count": c.num_hidden_layers,
        f"{arch}.context_length": c.max_position_embeddings,
        f"{arch}.embedding_length": c.hidden_size,
        f"{arch}.feed_forward_length": c.intermediate_size,
        f"{arch}.attention.head_count": c.num_attention_heads,
        f"{arch}.attention.head_count_kv": c.num_key_value_heads,
        f"{arch}.attention.layer_norm_rms_epsilon": float(c.rms_norm_eps),
        f"{arch}.rope.freq_base": float(theta),
    }
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    if arch == "gemma3":
        meta[f"{arch}.attention.key_length"] = head_dim
        meta[f"{arch}.attention.value_length"] = head_dim
        meta[f"{arch}.attention.sliding_window"] = c.sliding_window
    else:
        meta[f"{arch}.rope.dimension_count"] = head_dim
    return meta


def export_gguf(hf, arch: str, path, vocab: dict, *, f16: bool = False, edit=None) -> str:
    """Write ``hf`` as llama.cpp's converter would; ``edit(tensors)`` may change the tensor dict first.

    Args:
        f16: store matrices as F16 (norms and biases stay F32, as llama.cpp keeps 1-D tensors).
    """
    c = hf.config
    tensors: dict[str, tuple[np.ndarray, object]] = {}
    for name, t in hf.state_dict().items():
        if name == "lm_head.weight" and c.tie_word_embeddings:
            continue
        w = t.detach().float().numpy().copy()
        if arch == "llama" and ".q_proj." in name:
            w = _permute(w, c.num_attention_heads)
        elif arch == "llama" and ".k_proj." in name:
            w = _permute(w, c.num_key_value_heads)
        if arch == "gemma3" and name.endswith("norm.weight"):
            w = w + np.float32(1.0)  # llama.cpp stores Gemma norms as (1 + weight)
        if f16 and w.ndim == 2:
            w = w.astype(np.float16)
        tensors[_gguf_name(name, arch)] = (w, None)
    if edit is not None:
        edit(tensors)
    return _write(path, arch, tensors, {**_arch_meta(hf, arch), **vocab})


def _gemma3_hf():
    """A tiny Gemma 3 that GGUF can describe: llama.cpp fixes the layer pattern at five sliding layers
    then one full, and query_pre_attn_scalar at head_dim (tiny.hf_model("gemma3") uses neither)."""
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.Gemma3TextConfig(
        **{**tiny.COMMON, "num_hidden_layers": 6, "tie_word_embeddings": True},
        head_dim=32,
        sliding_window=12,
        query_pre_attn_scalar=32,
    )
    model = tf.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return model


@pytest.fixture(scope="module")
def hf_models():
    return {"llama": tiny.hf_model("llama"), "qwen2": tiny.hf_model("qwen2"), "gemma3": _gemma3_hf()}


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    B, T = ids.shape
    pos = torch.arange(T).expand(B, T)
    with torch.no_grad():
        return model(ids, pos, DenseAttention(None, 0, T, T - 1), None)  # (B, T, V)


# 20 tokens: longer than the tiny Gemma 3 sliding window.
IDS = torch.randint(0, tiny.VOCAB, (2, 20), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3"])
def test_tiny_model_from_gguf_matches_transformers(hf_models, vocab, tmp_path, arch):
    hf = hf_models[arch]
    path = export_gguf(hf, arch, tmp_path / f"{arch}.gguf", vocab)
    loaded = load_model(path, dtype="float32", device="cpu")
    assert loaded.source == path
    assert loaded.config.architecture == arch
    assert loaded.config.tie_word_embeddings == hf.config.tie_word_embeddings
    assert loaded.config.attention_bias == (arch == "qwen2")
    assert loaded.tokenizer.encode("The capital of France", add_special_tokens=False)
    with torch.no_grad():
        ref = hf(IDS).logits
    torch.testing.assert_close(_logits(loaded.model, IDS), ref, atol=1e-4, rtol=0)


def test_tiny_llama_f16_gguf(hf_models, vocab, tmp_path):
    """F16 matrices: exact reading shows as parity with the same weights rounded to float16."""
    hf = hf_models["llama"]
    path = export_gguf(hf, "llama", tmp_path / "llama-f16.gguf", vocab, f16=True)
    f = GGUFFile(path)
    assert f.tensor_info["blk.0.attn_q.weight"].qtype == Q.F16
    assert f.tensor_info["blk.0.attn_norm.weight"].qtype == Q.F32
    ours = _logits(load_model(path, dtype="float32", device="cpu").model, IDS)
    with torch.no_grad():
        ref = hf(IDS).logits
    torch.testing.assert_close(ours, ref, atol=2e-3, rtol=0)
    rounded = tiny.hf_model("llama")
    with torch.no_grad():
        for p in rounded.parameters():
            if p.dim() == 2:
                p.copy_(p.half().float())
        ref16 = rounded(IDS).logits
    torch.testing.assert_close(ours, ref16, atol=1e-4, rtol=0)


# -- errors ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def llama_gguf(hf_models, vocab, tmp_path_factory) -> str:
    return export_gguf(hf_models["llama"], "llama", tmp_path_factory.mktemp("llama") / "llama.gguf", vocab)


def _cut(src: str, dst, size: int) -> str:
    with open(src, "rb") as f:
        data = f.read(size)
    with open(dst, "wb") as f:
        f.write(data)
    return os.fspath(dst)


def test_truncated_in_tensor_data_names_file_and_tensor(llama_gguf, tmp_path):
    path = _cut(llama_gguf, tmp_path / "half.gguf", os.path.getsize(llama_gguf) // 2)
    with pytest.raises(ModelLoadError, match="is truncated: tensor 'blk.") as e:
        load_model(path, dtype="float32", device="cpu")
    assert path in str(e.value)


def test_truncated_in_header_names_file(llama_gguf, tmp_path):
    path = _cut(llama_gguf, tmp_path / "head.gguf", 200)
    with pytest.raises(ModelLoadError, match="is truncated: the header needs") as e:
        load_model(path, dtype="float32", device="cpu")
    assert path in str(e.value)


@pytest.mark.real
def test_real_file_cut_in_half_is_truncated(tmp_path):
    src = _real_path("smollm2-135m-instruct")
    path = _cut(src, tmp_path / "smollm2-half.gguf", os.path.getsize(src) // 2)
    with pytest.raises(ModelLoadError, match="is truncated") as e:
        GGUFFile(path)
    assert path in str(e.value)


def test_random_bytes_are_not_gguf(tmp_path):
    path = tmp_path / "noise.gguf"
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    with pytest.raises(
        ModelLoadError, match=r"noise\.gguf is not a GGUF file \(it does not start with 'GGUF'\)"
    ):
        load_model(str(path), dtype="float32", device="cpu")


def test_random_bytes_without_suffix_are_neither_dir_nor_gguf(tmp_path):
    path = tmp_path / "noise.bin"
    path.write_bytes(b"\x00" * 64)
    with pytest.raises(ModelLoadError, match=r"noise\.bin is neither a model directory nor a GGUF file"):
        load_model(str(path), dtype="float32", device="cpu")


def test_empty_file(tmp_path):
    path = tmp_path / "empty.gguf"
    path.write_bytes(b"")
    with pytest.raises(ModelLoadError, match=r"empty\.gguf is empty, not a GGUF file"):
        load_model(str(path), dtype="float32", device="cpu")


def test_unsupported_version(tmp_path):
    path = tmp_path / "v9.gguf"
    path.write_bytes(b"GGUF" + (9).to_bytes(4, "little") + bytes(16))
    with pytest.raises(ModelLoadError, match="GGUF version 9 is not supported"):
        GGUFFile(path)


def test_unknown_architecture_is_named(tmp_path, vocab):
    path = _write(
        tmp_path / "bert.gguf", "bert", {"token_embd.weight": (np.zeros((4, 8), np.float32), None)}, vocab
    )
    with pytest.raises(
        ValueError, match=r"bert\.gguf: architecture 'bert' is not supported; tokenmill runs .*llama"
    ):
        load_model(path, dtype="float32", device="cpu")


def _export_edited(hf_models, vocab, tmp_path, edit) -> str:
    return export_gguf(hf_models["llama"], "llama", tmp_path / "edited.gguf", vocab, edit=edit)


def test_missing_tensor_is_named(hf_models, vocab, tmp_path):
    path = _export_edited(hf_models, vocab, tmp_path, lambda t: t.pop("blk.1.ffn_down.weight"))
    with pytest.raises(
        ModelLoadError, match=r"missing tensor\(s\) for model\.layers\.1\.mlp\.down_proj\.weight"
    ):
        load_model(path, dtype="float32", device="cpu")


def test_missing_qkv_shard_is_named(hf_models, vocab, tmp_path):
    path = _export_edited(hf_models, vocab, tmp_path, lambda t: t.pop("blk.0.attn_v.weight"))
    with pytest.raises(
        ModelLoadError, match=r"missing tensor\(s\) for model\.layers\.0\.self_attn\.qkv_proj"
    ):
        load_model(path, dtype="float32", device="cpu")


@pytest.mark.parametrize(
    "name,shape,hf_name,expected",
    [
        ("blk.0.attn_v.weight", (32, 48), "v_proj.weight", (32, 64)),
        # q/k are un-permuted before they are copied; a wrong shape must still be a named error.
        ("blk.0.attn_q.weight", (60, 64), "q_proj.weight", (64, 64)),
    ],
)
def test_wrong_shape_names_tensor_and_both_shapes(hf_models, vocab, tmp_path, name, shape, hf_name, expected):
    def edit(t):
        t[name] = (np.zeros(shape, np.float32), None)

    path = _export_edited(hf_models, vocab, tmp_path, edit)
    with pytest.raises(ModelLoadError) as e:
        load_model(path, dtype="float32", device="cpu")
    msg = str(e.value)
    assert hf_name in msg and str(shape) in msg and str(expected) in msg, msg


def test_unexpected_tensor_is_named(hf_models, vocab, tmp_path):
    def edit(t):
        t["blk.0.attn_extra.weight"] = (np.zeros((4, 4), np.float32), None)

    path = _export_edited(hf_models, vocab, tmp_path, edit)
    with pytest.raises(ModelLoadError, match=r"unexpected tensor 'blk\.0\.attn_extra\.weight' has no place"):
        load_model(path, dtype="float32", device="cpu")


def test_missing_required_metadata_is_named(tmp_path, vocab):
    path = _write(
        tmp_path / "nometa.gguf", "llama", {"token_embd.weight": (np.zeros((4, 8), np.float32), None)}, vocab
    )
    with pytest.raises(ValueError, match=r"GGUF metadata has no 'llama\.attention\.head_count'"):
        load_model(path, dtype="float32", device="cpu")


def test_missing_gguf_file(tmp_path):
    with pytest.raises(ModelLoadError, match="GGUF file not found"):
        GGUFFile(tmp_path / "nope.gguf")


# -- int4 layers straight from Q4_0 / Q4_1 blocks ---------------------------------------------------------
def _quantize_matrices(qtype_of):
    """An export edit that stores each matrix as ``qtype_of(gguf_name)`` (None keeps it float)."""

    def edit(tensors):
        for name, (arr, _) in list(tensors.items()):
            qtype = qtype_of(name) if arr.ndim == 2 else None
            if qtype is not None:
                tensors[name] = (gguf.quants.quantize(arr.astype(np.float32), qtype), qtype)

    return edit


@pytest.fixture(scope="module")
def q4_gguf(hf_models, vocab, tmp_path_factory) -> str:
    """The tiny llama with its matrices in Q4_1, the MLP's down_proj in Q4_0, the embedding in Q8_0."""

    def qtype_of(name: str):
        return Q.Q8_0 if name.startswith("token_embd") else Q.Q4_0 if "ffn_down" in name else Q.Q4_1

    path = tmp_path_factory.mktemp("q4") / "llama-q4.gguf"
    return export_gguf(hf_models["llama"], "llama", path, vocab, edit=_quantize_matrices(qtype_of))


def test_int4_blocks_read_as_the_gguf_package_dequantizes(q4_gguf):
    f = GGUFFile(q4_gguf)
    for name in ("blk.0.attn_q.weight", "blk.1.ffn_down.weight", "output.weight"):
        codes, scales, zeros = f.int4_blocks(name)
        assert codes.dtype == torch.uint8 and int(codes.max()) <= 15
        w = (codes.float() - 8) * scales.repeat_interleave(32, 1) + zeros.repeat_interleave(32, 1)
        torch.testing.assert_close(w, f.tensor(name), atol=1e-6, rtol=0)
    assert f.int4_blocks("token_embd.weight") is None  # Q8_0 is not a 4-bit type


@pytest.mark.parametrize("qtype", [Q.Q4_0, Q.Q4_1, Q.Q4_K])
def test_int4_codes_of_random_blocks_are_the_gguf_dequantization(qtype):
    """Random bytes for every field (all 6-bit scales and mins, both nibbles), finite fp16
    scales: (q - 8) * scale + zero equals what the gguf package dequantizes."""
    from tokenmill.weights.gguf_file import int4_from_blocks

    block, size = gguf.GGML_QUANT_SIZES[qtype]
    rng = np.random.default_rng(int(qtype))
    blocks = rng.integers(0, 256, (64, size), dtype=np.uint8)
    halves = 2 if qtype == Q.Q4_K else (1 if qtype == Q.Q4_0 else 2)  # d (and m / dmin)
    for h in range(halves):
        blocks[:, 2 * h : 2 * h + 2] = (rng.standard_normal((64, 1)) * 0.01).astype(np.float16).view(np.uint8)
    codes, scales, zeros = int4_from_blocks(blocks, qtype.name)
    assert codes.shape == (64, block) and codes.dtype == np.uint8 and codes.max() <= 15
    assert scales.shape == zeros.shape == (64, block // 32)
    w = (codes.astype(np.float32) - 8) * scales.repeat(32, 1) + zeros.repeat(32, 1)
    ref = gguf.quants.dequantize(blocks.reshape(-1), qtype).reshape(64, block)
    np.testing.assert_allclose(w, ref, rtol=0, atol=1e-6 * float(np.abs(ref).max()))


def test_int4_codes_refuse_other_block_types():
    from tokenmill.weights.gguf_file import int4_from_blocks

    with pytest.raises(ValueError, match="Q5_0 is not a 4-bit block type"):
        int4_from_blocks(np.zeros((1, 22), np.uint8), "Q5_0")


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_int4_from_q4_blocks_is_the_gguf_dequantization(q4_gguf, dtype):
    """Built from the blocks, not re-quantized: fp32 is exact, bf16 within the rounding of the
    scales and zero points to bf16 (half a bf16 step of 8 |scale| + |zero|)."""
    from tokenmill.layers.quantized import Int4Linear
    from tokenmill.models.llama import _unpermute_qk

    loaded = load_model(q4_gguf, dtype=dtype, device="cpu", quantization="int4")
    report = loaded.quantization
    assert len(report.from_source) == len(report.layers) == 2 * 4 + 1  # every linear, the LM head too
    f, cfg = GGUFFile(q4_gguf), loaded.config
    layer = loaded.model.model.layers[1]
    refs = {
        layer.self_attn.qkv_proj: torch.cat(
            [
                _unpermute_qk(f.tensor("blk.1.attn_q.weight"), cfg.num_heads),
                _unpermute_qk(f.tensor("blk.1.attn_k.weight"), cfg.num_kv_heads),
                f.tensor("blk.1.attn_v.weight"),
            ]
        ),
        layer.mlp.down_proj: f.tensor("blk.1.ffn_down.weight"),  # Q4_0: zero point 0
        loaded.model.lm_head: f.tensor("output.weight"),
    }
    for module, ref in refs.items():
        assert isinstance(module, Int4Linear) and module.group_size == 32
        got = module.dequantized_weight()
        if dtype == "float32":
            torch.testing.assert_close(got, ref, atol=1e-6, rtol=0)
        else:
            sz = module.scales_and_zeros.float()
            s = sz[..., 0].t().repeat_interleave(32, 1)
            z = sz[..., 1].t().repeat_interleave(32, 1)
            assert ((got - ref).abs() <= (8 * s.abs() + z.abs()) * 2**-8 + 1e-7).all()


def test_int4_from_q4_blocks_gives_the_float_models_logits(q4_gguf):
    ref = _logits(load_model(q4_gguf, dtype="float32", device="cpu").model, IDS)
    got = _logits(load_model(q4_gguf, dtype="float32", device="cpu", quantization="int4").model, IDS)
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=0)


def test_other_gguf_types_are_quantized_again(q4_gguf, llama_gguf):
    # F32 matrices have no blocks to reuse; int8 cannot hold Q4 blocks (one scale per channel).
    assert (
        load_model(llama_gguf, dtype="float32", device="cpu", quantization="int4").quantization.from_source
        == []
    )
    int8 = load_model(q4_gguf, dtype="float32", device="cpu", quantization="int8").quantization
    assert int8.from_source == [] and len(int8.layers) == 9


# -- quantization "gguf": each matrix at the precision its file stores it in ----------------------------
def _mixed_types(name: str):
    """Every kind of choice at once: 4-bit types (int4 from their blocks), 5- and 8-bit types
    (int8), a float matrix fused with a 4-bit one (stays float), and a fused qkv whose v is
    more precise than q and k (int8)."""
    if name.startswith("token_embd"):
        return Q.Q8_0
    if "attn_q" in name or "attn_k" in name:
        return Q.Q4_0
    if "attn_v" in name:
        return Q.Q5_0
    if "attn_output" in name:
        return Q.Q4_1
    if "ffn_gate" in name:
        return None  # F32
    if "ffn_up" in name:
        return Q.Q4_1
    if "ffn_down" in name:
        return Q.Q8_0 if name.startswith("blk.0.") else Q.Q5_1
    return Q.Q4_0  # output.weight


@pytest.fixture(scope="module")
def mixed_gguf(hf_models, vocab, tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("mixed") / "llama-mixed.gguf"
    return export_gguf(hf_models["llama"], "llama", path, vocab, edit=_quantize_matrices(_mixed_types))


def _expected_modes(layers: int, four: str, eight: str) -> dict[str, str]:
    per_layer = {"self_attn.qkv_proj": eight, "self_attn.o_proj": four, "mlp.down_proj": eight}
    modes = {f"model.layers.{i}.{k}": v for i in range(layers) for k, v in per_layer.items()}
    return {**modes, "lm_head": four}


def test_gguf_mode_keeps_each_matrix_at_its_files_precision(mixed_gguf, hf_models):
    from tokenmill.layers.linear import SplitLinear
    from tokenmill.layers.quantized import Int4Linear, Int8Linear
    from tokenmill.models.llama import _unpermute_qk

    loaded = load_model(mixed_gguf, dtype="float32", device="cpu", quantization="gguf")
    report, cfg, f = loaded.quantization, loaded.config, GGUFFile(mixed_gguf)
    n = cfg.num_layers
    assert report.mode == "gguf" and report.group_size == 32
    # float32 activations: no w4a8 or w8a8 kernel, so weight-only int4 and int8
    assert report.modes == _expected_modes(n, "int4", "int8")
    assert report.kept == [f"model.layers.{i}.mlp.gate_up_proj" for i in range(n)]
    assert sorted(report.from_source) == sorted(
        [f"model.layers.{i}.self_attn.o_proj" for i in range(n)] + ["lm_head"]
    )
    for i in range(n):
        layer = loaded.model.model.layers[i]
        # kept as a float layer (split over the cores, as a float32 model's are)
        assert isinstance(layer.mlp.gate_up_proj, SplitLinear | torch.nn.Linear)
        # The 4-bit blocks exactly; the int8 layers within half a step of what the file holds.
        o = layer.self_attn.o_proj
        assert isinstance(o, Int4Linear)
        torch.testing.assert_close(
            o.dequantized_weight(), f.tensor(f"blk.{i}.attn_output.weight"), atol=1e-6, rtol=0
        )
        qkv_ref = torch.cat(
            [
                _unpermute_qk(f.tensor(f"blk.{i}.attn_q.weight"), cfg.num_heads),
                _unpermute_qk(f.tensor(f"blk.{i}.attn_k.weight"), cfg.num_kv_heads),
                f.tensor(f"blk.{i}.attn_v.weight"),
            ]
        )
        for module, ref in (
            (layer.self_attn.qkv_proj, qkv_ref),
            (layer.mlp.down_proj, f.tensor(f"blk.{i}.ffn_down.weight")),
        ):
            assert isinstance(module, Int8Linear)
            half_step = module.scales.float().unsqueeze(1) / 2
            assert ((module.dequantized_weight() - ref).abs() <= half_step * (1 + 1e-5)).all()
    # Only the int8 layers round again: the logits stay next to the float model's.
    ref = _logits(load_model(mixed_gguf, dtype="float32", device="cpu").model, IDS)
    got = _logits(loaded.model, IDS)
    assert (got - ref).abs().max() < 0.02 * ref.abs().max()
    assert (got.argmax(-1) == ref.argmax(-1)).float().mean() > 0.9


def test_gguf_mode_in_bf16_runs_w4a8_and_w8a8_where_it_can_and_generates(mixed_gguf, monkeypatch):
    from tokenmill import LLM, SamplingParams
    from tokenmill.layers.decode_stack import DecodeStack
    from tokenmill.layers.linear import OneDNNPackedLinear
    from tokenmill.layers.quantized import a8_runs

    llm = LLM(mixed_gguf, dtype="bfloat16", quantization="gguf")
    model = llm.engine.runner.model
    report = llm.loaded.quantization
    four = "w4a8" if a8_runs("w4a8", torch.bfloat16, "cpu") else "int4"
    eight = "w8a8" if a8_runs("w8a8", torch.bfloat16, "cpu") else "int8"
    assert report.modes == _expected_modes(llm.loaded.config.num_layers, four, eight)
    if torch.backends.mkldnn.is_available():  # the kept float layers are packed like a bf16 model's
        assert all(isinstance(model.get_submodule(n), OneDNNPackedLinear) for n in report.kept)
    # Batched greedy requests: the same tokens and logprobs with the C decode stack and without.
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True, logprobs=2)
    prompts = ["The capital of France", "Hello", "def f(x):"]
    ran = []
    real_run = DecodeStack.run
    monkeypatch.setattr(DecodeStack, "run", lambda self, *a: ran.append(real_run(self, *a)) or ran[-1])
    with_stack = llm.generate(prompts, params)
    stack_ran = bool(ran) and all(out is not None for out in ran)
    model._decode_stack = False
    without = llm.generate(prompts, params)
    for a, b in zip(with_stack, without):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        assert a.outputs[0].logprobs == b.outputs[0].logprobs
    from tokenmill.layers import cpu_kernels

    if cpu_kernels.int4_available() and cpu_kernels.bf16_gemv_available():
        assert stack_ran, "the stack should take the decode steps of mixed layers"


def test_gguf_mode_gives_a_tied_head_the_embeddings_precision(hf_models, vocab, tmp_path):
    """Tiny Gemma 3, its head tied to a Q8_0 embedding: int8 head, every Q4_0 matrix int4."""
    path = export_gguf(
        hf_models["gemma3"],
        "gemma3",
        tmp_path / "gemma3-q4.gguf",
        vocab,
        edit=_quantize_matrices(lambda n: Q.Q8_0 if n.startswith("token_embd") else Q.Q4_0),
    )
    report = load_model(path, dtype="float32", device="cpu", quantization="gguf").quantization
    assert report.modes["lm_head"] == "int8"
    assert {m for n, m in report.modes.items() if n != "lm_head"} == {"int4"}
    assert set(report.from_source) == set(report.modes) - {"lm_head"}
    assert report.kept == []


def test_gguf_mode_of_a_float_file_changes_nothing(llama_gguf):
    plain = load_model(llama_gguf, dtype="float32", device="cpu")
    loaded = load_model(llama_gguf, dtype="float32", device="cpu", quantization="gguf")
    assert loaded.quantization.layers == [] and len(loaded.quantization.kept) == 9
    torch.testing.assert_close(_logits(loaded.model, IDS), _logits(plain.model, IDS), atol=0, rtol=0)


@pytest.mark.parametrize(
    "qtype,fmt",
    [("F32", "float"), ("F16", "float"), ("BF16", "float"), ("Q4_0", "int4"), ("Q4_1", "int4"),
     ("Q4_K", "int4"), ("Q2_K", "int4"), ("Q3_K", "int4"), ("IQ4_XS", "int4"), ("TQ2_0", "int4"),
     ("MXFP4", "int4"), ("Q5_0", "int8"), ("Q5_1", "int8"), ("Q5_K", "int8"), ("Q6_K", "int8"),
     ("Q8_0", "int8"), ("Q8_1", "int8")],
)  # fmt: skip
def test_weight_format_of_each_type(qtype, fmt):
    from tokenmill.weights.gguf_file import weight_format

    assert weight_format(qtype) == fmt


def test_gguf_mode_needs_a_gguf_file(tmp_path):
    from tokenmill.layers.quantized import quantize_model

    model_dir = tiny.save_tiny_dir("llama", tmp_path)
    with pytest.raises(
        ModelLoadError, match="holds safetensors weights, and quantization 'gguf' keeps the precision"
    ):
        load_model(model_dir, dtype="float32", device="cpu", quantization="gguf")
    model = tiny.native_from_hf(tiny.hf_model("llama"), torch.float32)
    with pytest.raises(
        ValueError, match=r"which needs layer_modes: load the model from a \.gguf file, or pick"
    ):
        quantize_model(model, "gguf")
    with pytest.raises(
        ValueError, match=r"'gguf' needs a mode for every linear layer; layer_modes has none for "
    ):
        quantize_model(model, "gguf", layer_modes={"lm_head": "int8"})
    with pytest.raises(
        ValueError, match=r"layer_modes names lm_hed, which is not a linear layer of this model"
    ):
        quantize_model(model, "int8", layer_modes={"lm_hed": "none"})
    with pytest.raises(ValueError, match="layer_modes must be among int8, int4, w4a8, w8a8, none, got int2"):
        quantize_model(model, "int8", layer_modes={"lm_head": "int2"})
