"""CTranslate2 (faster-whisper) model directories: ``model.bin``, ``config.json``, tokenizer.

``model.bin`` (binary format version 5 or 6, little-endian) is a header and a flat list of
named variables::

    u32 version | str spec name | u32 spec revision | u32 count
    count x (str name | u8 rank | rank x u32 dim | u8 dtype | u32 nbytes | nbytes of data)
    u32 count | count x (str alias | str target)        # a variable stored once, named twice

where ``str`` is a u16 length (terminating NUL included) then the UTF-8 bytes and a NUL.
Variable names are slash-separated scopes (``decoder/layer_0/self_attention/linear_0/weight``);
rank-0 variables are architecture settings (``encoder/num_heads``), not weights.

CTranslate2 fuses projections that the Hugging Face checkpoint keeps apart. The name table
below says how each CTranslate2 variable becomes Hugging Face tensors: one name, or a
tuple that splits the variable into equal parts along its first dimension (None drops a
part). Everything else (a config.json for transformers' layout, generation defaults) is
derived from the variables' shapes, CTranslate2's config.json and the tokenizer.
"""

from __future__ import annotations

import json
import mmap
import os
import re
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from tokenmill.weights.errors import ModelLoadError

MODEL_FILE = "model.bin"
SUPPORTED_VERSIONS = (5, 6)  # 6 added bfloat16; the layout is the same

# The DataType enum of CTranslate2 (include/ctranslate2/types.h), in order.
_DTYPES: dict[int, tuple[str, torch.dtype, np.dtype]] = {
    0: ("float32", torch.float32, np.dtype("<f4")),
    1: ("int8", torch.int8, np.dtype("i1")),
    2: ("int16", torch.int16, np.dtype("<i2")),
    3: ("int32", torch.int32, np.dtype("<i4")),
    4: ("float16", torch.float16, np.dtype("<f2")),
    5: ("bfloat16", torch.bfloat16, np.dtype("<i2")),  # numpy has no bfloat16: read as raw 16-bit
}

# CTranslate2's ops::ActivationType enum, as stored in "decoder/activation".
_ACTIVATIONS = {0: "relu", 1: "gelu_pytorch_tanh", 2: "silu", 3: "gelu", 4: "gelu_sigmoid", 5: "tanh"}


@dataclass
class CT2File:
    """The variables of one model.bin, memory-mapped (nothing is read until asked for)."""

    path: str
    version: int
    spec: str  # "WhisperSpec"
    revision: int
    #: name -> (dtype id, shape, byte offset, byte count)
    entries: dict[str, tuple[int, tuple[int, ...], int, int]]
    #: alias name -> the variable it names
    aliases: dict[str, str]
    _buffer: Any = field(default=None, repr=False)

    def names(self) -> list[str]:
        """Every variable name, aliases included, in file order (aliases last)."""
        return list(self.entries) + list(self.aliases)

    def resolve(self, name: str) -> str:
        return self.aliases.get(name, name)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.entries[self.resolve(name)][1]

    def is_scalar(self, name: str) -> bool:
        return len(self.shape(name)) == 0

    def raw(self, name: str) -> torch.Tensor:
        """The stored tensor (a view of the mapped file, read-only: clone before writing)."""
        key = self.resolve(name)
        if key not in self.entries:
            raise ModelLoadError(f"{self.path}: no variable {name!r}")
        type_id, shape, offset, nbytes = self.entries[key]
        _, torch_dtype, np_dtype = _DTYPES[type_id]
        array = np.frombuffer(self._buffer, dtype=np_dtype, count=nbytes // np_dtype.itemsize, offset=offset)
        t = torch.from_numpy(array.reshape(shape))
        if torch_dtype == torch.bfloat16:
            t = t.view(torch.bfloat16)
        return t

    def scalar(self, name: str) -> int | float:
        value = self.raw(name)
        if value.dim() != 0:
            raise ModelLoadError(
                f"{self.path}: variable {name!r} should be a scalar, has shape {tuple(value.shape)}"
            )
        return value.item()

    def tensor(self, name: str) -> torch.Tensor:
        """A weight in floating point: int8 / int16 weights are multiplied back by their
        ``<name>_scale`` (CTranslate2 stores ``round(w * scale)``)."""
        value = self.raw(name)
        if value.is_floating_point():
            return value
        scale_name = self.resolve(name) + "_scale"
        if scale_name not in self.entries:
            raise ModelLoadError(
                f"{self.path}: integer variable {name!r} has no {scale_name!r} to dequantize it"
            )
        scale = self.raw(scale_name).float()
        if scale.dim() == 1:  # int8: one scale per output row
            scale = scale.unsqueeze(1)
        return value.float() / scale


def read_model_bin(path: str) -> CT2File:
    """Parse the header and variable table of a CTranslate2 ``model.bin``."""
    try:
        with open(path, "rb") as f:
            buffer = mmap.mmap(
                f.fileno(), 0, access=mmap.ACCESS_COPY
            )  # copy-on-write: writable views, no copy
    except (OSError, ValueError) as e:  # ValueError: an empty file cannot be mapped
        raise ModelLoadError(f"cannot read CTranslate2 model {path}: {e}") from e
    pos = 0
    size = len(buffer)

    def take(fmt: str) -> Any:
        nonlocal pos
        n = struct.calcsize(fmt)
        if pos + n > size:
            raise ModelLoadError(f"{path} is truncated: the header ends at byte {size}")
        (value,) = struct.unpack_from(fmt, buffer, pos)
        pos += n
        return value

    def string() -> str:
        nonlocal pos
        n = take("<H")
        if pos + n > size:
            raise ModelLoadError(f"{path} is truncated: the header ends at byte {size}")
        raw = bytes(buffer[pos : pos + n])
        pos += n
        return raw.rstrip(b"\0").decode("utf-8")

    version = take("<I")
    if version not in SUPPORTED_VERSIONS:
        raise ModelLoadError(
            f"{path}: CTranslate2 binary format version {version} is not supported "
            f"(tokenmill reads versions {', '.join(map(str, SUPPORTED_VERSIONS))}; re-convert the model "
            "with a recent ctranslate2)"
        )
    spec = string()
    revision = take("<I")
    entries: dict[str, tuple[int, tuple[int, ...], int, int]] = {}
    for _ in range(take("<I")):
        name = string()
        rank = take("<B")
        shape = tuple(take("<I") for _ in range(rank))
        type_id = take("<B")
        nbytes = take("<I")
        if type_id not in _DTYPES:
            raise ModelLoadError(f"{path}: variable {name!r} has unknown data type id {type_id}")
        itemsize = _DTYPES[type_id][2].itemsize
        if nbytes != itemsize * int(np.prod(shape, dtype=np.int64)):
            raise ModelLoadError(
                f"{path}: variable {name!r} holds {nbytes} bytes, its shape {shape} needs more"
            )
        if pos + nbytes > size:
            raise ModelLoadError(f"{path} is truncated: variable {name!r} runs past the end of the file")
        entries[name] = (type_id, shape, pos, nbytes)
        pos += nbytes
    aliases: dict[str, str] = {}
    for _ in range(take("<I")):
        alias = string()
        aliases[alias] = string()
    for alias, target in aliases.items():
        if target not in entries:
            raise ModelLoadError(f"{path}: alias {alias!r} names a missing variable {target!r}")
    return CT2File(path, version, spec, revision, entries, aliases, buffer)


# --------------------------------------------------------------------------- name tables

#: CTranslate2 name -> Hugging Face name(s), per spec. "{i}" is a layer index; a tuple
#: splits the variable in equal parts along dim 0 (None: a part with no HF tensor).
_ATTENTION = {
    "layer_norm/gamma": "{attn}_layer_norm.weight",
    "layer_norm/beta": "{attn}_layer_norm.bias",
    "linear_2/weight": "{attn}.out_proj.weight",
    "linear_2/bias": "{attn}.out_proj.bias",
}
_FFN = {
    "ffn/layer_norm/gamma": "final_layer_norm.weight",
    "ffn/layer_norm/beta": "final_layer_norm.bias",
    "ffn/linear_0/weight": "fc1.weight",
    "ffn/linear_0/bias": "fc1.bias",
    "ffn/linear_1/weight": "fc2.weight",
    "ffn/linear_1/bias": "fc2.bias",
}


def _self_attention(hf_layer: str) -> dict[str, str | tuple[str | None, ...]]:
    a = f"{hf_layer}.self_attn"
    return {
        "self_attention/layer_norm/gamma": f"{a}_layer_norm.weight",
        "self_attention/layer_norm/beta": f"{a}_layer_norm.bias",
        # q, k, v fused; Whisper's key projection has no bias, CTranslate2 stores zeros there
        # (a key bias adds the same q.b to every score of a query: softmax ignores it).
        "self_attention/linear_0/weight": (f"{a}.q_proj.weight", f"{a}.k_proj.weight", f"{a}.v_proj.weight"),
        "self_attention/linear_0/bias": (f"{a}.q_proj.bias", None, f"{a}.v_proj.bias"),
        "self_attention/linear_1/weight": f"{a}.out_proj.weight",
        "self_attention/linear_1/bias": f"{a}.out_proj.bias",
    }


def _whisper_table() -> dict[str, str | tuple[str | None, ...]]:
    enc, dec = "model.encoder", "model.decoder"
    x = f"{dec}.layers.{{i}}.encoder_attn"
    table: dict[str, str | tuple[str | None, ...]] = {
        "encoder/conv1/weight": f"{enc}.conv1.weight",
        "encoder/conv1/bias": f"{enc}.conv1.bias",
        "encoder/conv2/weight": f"{enc}.conv2.weight",
        "encoder/conv2/bias": f"{enc}.conv2.bias",
        "encoder/position_encodings/encodings": f"{enc}.embed_positions.weight",
        "encoder/layer_norm/gamma": f"{enc}.layer_norm.weight",
        "encoder/layer_norm/beta": f"{enc}.layer_norm.bias",
        "decoder/embeddings/weight": f"{dec}.embed_tokens.weight",
        "decoder/position_encodings/encodings": f"{dec}.embed_positions.weight",
        "decoder/layer_norm/gamma": f"{dec}.layer_norm.weight",
        "decoder/layer_norm/beta": f"{dec}.layer_norm.bias",
        # the output projection: an alias of the embeddings in every converted Whisper
        "decoder/projection/weight": "proj_out.weight",
        # cross-attention: q alone (linear_0), k and v fused (linear_1), output (linear_2)
        "decoder/layer_{i}/attention/layer_norm/gamma": f"{x}_layer_norm.weight",
        "decoder/layer_{i}/attention/layer_norm/beta": f"{x}_layer_norm.bias",
        "decoder/layer_{i}/attention/linear_0/weight": f"{x}.q_proj.weight",
        "decoder/layer_{i}/attention/linear_0/bias": f"{x}.q_proj.bias",
        "decoder/layer_{i}/attention/linear_1/weight": (f"{x}.k_proj.weight", f"{x}.v_proj.weight"),
        "decoder/layer_{i}/attention/linear_1/bias": (None, f"{x}.v_proj.bias"),
        "decoder/layer_{i}/attention/linear_2/weight": f"{x}.out_proj.weight",
        "decoder/layer_{i}/attention/linear_2/bias": f"{x}.out_proj.bias",
    }
    for stack in ("encoder", "decoder"):
        hf_layer = f"model.{stack}.layers.{{i}}"
        for ct2, hf in _self_attention(hf_layer).items():
            table[f"{stack}/layer_{{i}}/{ct2}"] = hf
        for ct2, hf in _FFN.items():
            table[f"{stack}/layer_{{i}}/{ct2}"] = f"{hf_layer}.{hf}"
    return table


WHISPER_NAMES = _whisper_table()

#: rank-0 variables of WhisperSpec: architecture settings, read by whisper_hf_config
WHISPER_SETTINGS = {
    "encoder/num_heads",
    "decoder/num_heads",
    "decoder/activation",
    "decoder/alibi",
    "decoder/alignment_heads",
    "decoder/alignment_layer",
    "decoder/pre_norm",
    "decoder/scale_embeddings",
    "decoder/start_from_zero_embedding",
    "encoder/activation",
    "encoder/pre_norm",
    "encoder/scale_embeddings",
}


def _compile(table: dict[str, str | tuple[str | None, ...]]) -> list[tuple[re.Pattern[str], Any]]:
    return [(re.compile(re.escape(k).replace(r"\{i\}", r"(?P<i>\d+)") + "$"), v) for k, v in table.items()]


_COMPILED = {"WhisperSpec": (_compile(WHISPER_NAMES), WHISPER_SETTINGS)}


def _targets(name: str, rules: list[tuple[re.Pattern[str], Any]]) -> str | tuple[str | None, ...] | None:
    for pattern, target in rules:
        m = pattern.match(name)
        if m:
            i = m.groupdict().get("i")
            if isinstance(target, tuple):
                return tuple(None if t is None else t.format(i=i) for t in target)
            return target.format(i=i)
    return None


def _weights(ct2: CT2File) -> Iterator[tuple[str, str | tuple[str | None, ...]]]:
    """(CTranslate2 name, Hugging Face target) of every weight; settings and scales skipped.

    Strict: a non-scalar variable the spec's table does not know is an error that names it.
    """
    rules, settings = _spec_rules(ct2)
    for name in ct2.names():
        if name.endswith("_scale") and name[: -len("_scale")] in ct2.entries:
            continue  # a quantization scale, consumed by CT2File.tensor
        if name in settings and ct2.is_scalar(name):
            continue
        target = _targets(name, rules)
        if target is None:
            raise ModelLoadError(
                f"{ct2.path}: unexpected variable {name!r} has no place in a {ct2.spec} model"
            )
        yield name, target


def map_to_hf(ct2: CT2File, dtype: torch.dtype | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """(Hugging Face name, tensor) for every weight of ``ct2``, fused tensors split.

    Args:
        dtype: convert to this dtype; None keeps the stored floating type (float16 here).
    """
    for name, target in _weights(ct2):
        value = ct2.tensor(name)
        if dtype is not None:
            value = value.to(dtype)
        if isinstance(target, str):
            yield target, value
            continue
        rows = value.shape[0]
        if rows % len(target):
            raise ModelLoadError(
                f"{ct2.path}: fused variable {name!r} has {rows} rows, not divisible into {len(target)} parts"
            )
        for hf_name, part in zip(target, value.split(rows // len(target), dim=0)):
            if hf_name is not None:
                yield hf_name, part


def hf_names(ct2: CT2File) -> list[str]:
    """The Hugging Face names ``map_to_hf`` yields, without reading any tensor."""
    out: list[str] = []
    for _, target in _weights(ct2):
        out.extend([target] if isinstance(target, str) else [t for t in target if t is not None])
    return out


def _spec_rules(ct2: CT2File) -> tuple[list[tuple[re.Pattern[str], Any]], set[str]]:
    if ct2.spec not in _COMPILED:
        raise ModelLoadError(
            f"{ct2.path}: CTranslate2 model spec {ct2.spec!r} is not supported; tokenmill reads "
            f"{', '.join(_COMPILED)} (other CTranslate2 models: use their Hugging Face checkpoint)"
        )
    return _COMPILED[ct2.spec]


# --------------------------------------------------------------------------- configs


def _layers(ct2: CT2File, stack: str) -> int:
    pattern = re.compile(rf"^{stack}/layer_(\d+)/")
    found = {int(m.group(1)) for n in ct2.entries if (m := pattern.match(n))}
    if not found or found != set(range(len(found))):
        raise ModelLoadError(
            f"{ct2.path}: {stack} layers are missing or not numbered 0..n-1 ({sorted(found)})"
        )
    return len(found)


def _vocabulary(model_dir: str) -> dict[str, int]:
    """Token -> id from vocabulary.txt (one token a line, timestamps included) or, failing
    that, the added tokens of tokenizer.json (the special tokens are all we need)."""
    txt = os.path.join(model_dir, "vocabulary.txt")
    if os.path.isfile(txt):
        with open(txt, encoding="utf-8") as f:
            return {line.rstrip("\n"): i for i, line in enumerate(f)}
    vocab_json = os.path.join(model_dir, "vocabulary.json")
    if os.path.isfile(vocab_json):
        with open(vocab_json, encoding="utf-8") as f:
            return {tok: i for i, tok in enumerate(json.load(f))}
    tok_path = os.path.join(model_dir, "tokenizer.json")
    if os.path.isfile(tok_path):
        with open(tok_path, encoding="utf-8") as f:
            tok = json.load(f)
        vocab = dict(tok.get("model", {}).get("vocab", {}))
        vocab.update({t["content"]: t["id"] for t in tok.get("added_tokens", [])})
        return vocab
    raise ModelLoadError(f"{model_dir}: no vocabulary.txt, vocabulary.json or tokenizer.json")


def _read_ct2_config(model_dir: str) -> dict[str, Any]:
    path = os.path.join(model_dir, "config.json")
    if not os.path.isfile(path):
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ModelLoadError(f"{path} is not valid JSON: {e}") from e


def whisper_hf_config(ct2: CT2File, ct2_config: dict[str, Any], vocab: dict[str, int]) -> dict[str, Any]:
    """The config.json transformers would have for these weights (model_type "whisper")."""

    def need(token: str) -> int:
        if token not in vocab:
            raise ModelLoadError(f"{ct2.path}: the vocabulary has no {token} token; is this a Whisper model?")
        return vocab[token]

    for name, want in (("decoder/pre_norm", 1), ("decoder/alibi", 0), ("decoder/scale_embeddings", 0)):
        if name in ct2.entries and ct2.scalar(name) != want:
            raise ModelLoadError(f"{ct2.path}: {name} = {ct2.scalar(name)} is not Whisper's ({want})")
    act_id = int(ct2.scalar("decoder/activation")) if "decoder/activation" in ct2.entries else 3
    activation = _ACTIVATIONS.get(act_id)
    if activation != "gelu":
        raise ModelLoadError(f"{ct2.path}: activation {activation or act_id!r} is not Whisper's GELU")
    vocab_size, d_model = ct2.shape("decoder/embeddings/weight")
    conv1 = ct2.shape("encoder/conv1/weight")  # (d_model, mel bins, 3)
    proj = "decoder/projection/weight"
    if proj not in ct2.aliases and proj in ct2.entries:
        tied = torch.equal(ct2.raw(proj), ct2.raw("decoder/embeddings/weight"))
    else:
        tied = True
    eot = need("<|endoftext|>")
    dtype_id = ct2.entries[ct2.resolve("decoder/embeddings/weight")][0]
    return {
        "model_type": "whisper",
        "architectures": ["WhisperForConditionalGeneration"],
        "vocab_size": vocab_size,
        "num_mel_bins": conv1[1],
        "d_model": d_model,
        "encoder_layers": _layers(ct2, "encoder"),
        "decoder_layers": _layers(ct2, "decoder"),
        "encoder_attention_heads": int(ct2.scalar("encoder/num_heads")),
        "decoder_attention_heads": int(ct2.scalar("decoder/num_heads")),
        "encoder_ffn_dim": ct2.shape("encoder/layer_0/ffn/linear_0/weight")[0],
        "decoder_ffn_dim": ct2.shape("decoder/layer_0/ffn/linear_0/weight")[0],
        "max_source_positions": ct2.shape("encoder/position_encodings/encodings")[0],
        "max_target_positions": ct2.shape("decoder/position_encodings/encodings")[0],
        "activation_function": activation,
        "scale_embedding": False,
        "tie_word_embeddings": tied,
        "pad_token_id": eot,
        "bos_token_id": eot,
        "eos_token_id": eot,
        "decoder_start_token_id": need("<|startoftranscript|>"),
        "suppress_tokens": list(ct2_config.get("suppress_ids", [])),
        "begin_suppress_tokens": list(ct2_config.get("suppress_ids_begin", [220, eot])),
        "torch_dtype": _DTYPES[dtype_id][0],
    }


def whisper_generation_config(
    hf_config: dict[str, Any], ct2_config: dict[str, Any], vocab: dict[str, int]
) -> dict[str, Any]:
    """generation_config.json as transformers' Whisper checkpoints hold it.

    Multilingual checkpoints have 51865 tokens or more (English-only ones 51864), as
    transformers and OpenAI decide; only those get languages and tasks.
    """
    eot = hf_config["eos_token_id"]
    multilingual = hf_config["vocab_size"] >= 51865
    gen: dict[str, Any] = {
        "bos_token_id": eot,
        "eos_token_id": eot,
        "pad_token_id": eot,
        "decoder_start_token_id": hf_config["decoder_start_token_id"],
        "suppress_tokens": hf_config["suppress_tokens"],
        "begin_suppress_tokens": hf_config["begin_suppress_tokens"],
        "max_length": hf_config["max_target_positions"],
        "max_initial_timestamp_index": 50,
        "return_timestamps": False,
        "is_multilingual": multilingual,
    }
    if "<|notimestamps|>" in vocab:
        gen["no_timestamps_token_id"] = vocab["<|notimestamps|>"]
    if "<|startofprev|>" in vocab:
        gen["prev_sot_token_id"] = vocab["<|startofprev|>"]
    if ct2_config.get("alignment_heads"):
        gen["alignment_heads"] = [list(h) for h in ct2_config["alignment_heads"]]
    if multilingual:
        by_id = {i: t for t, i in vocab.items()}
        langs = ct2_config.get("lang_ids") or []
        gen["lang_to_id"] = {by_id[i]: i for i in langs if i in by_id}
        gen["task_to_id"] = {t: vocab[f"<|{t}|>"] for t in ("transcribe", "translate") if f"<|{t}|>" in vocab}
    return gen


@dataclass
class CT2Checkpoint:
    """A CTranslate2 model directory seen as a Hugging Face one: config, generation
    defaults, and tensors under Hugging Face names."""

    path: str
    file: CT2File
    hf_config: dict[str, Any]
    generation_config: dict[str, Any]

    def names(self) -> list[str]:
        return hf_names(self.file)

    def tensors(self, dtype: torch.dtype | None = None) -> Iterator[tuple[str, torch.Tensor]]:
        return map_to_hf(self.file, dtype)


def is_ct2_dir(path: str) -> bool:
    """A directory with a CTranslate2 model.bin and no safetensors checkpoint."""
    if not os.path.isdir(path) or not os.path.isfile(os.path.join(path, MODEL_FILE)):
        return False
    return not any(
        f.endswith(".safetensors") or f.endswith(".safetensors.index.json") for f in os.listdir(path)
    )


def open_ct2_dir(path: str) -> CT2Checkpoint:
    """Read a CTranslate2 model directory (only the header of model.bin is read here)."""
    ct2 = read_model_bin(os.path.join(path, MODEL_FILE))
    _spec_rules(ct2)  # refuses specs without a name table
    ct2_config = _read_ct2_config(path)
    vocab = _vocabulary(path)
    hf = whisper_hf_config(ct2, ct2_config, vocab)
    return CT2Checkpoint(path, ct2, hf, whisper_generation_config(hf, ct2_config, vocab))
