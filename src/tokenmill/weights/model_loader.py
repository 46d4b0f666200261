"""Turn a model name into a ready model: resolve the source, read the config, build, load."""

from __future__ import annotations

import contextlib
import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from tokenmill.layers.quantized import Int4Source, QuantizationReport, check_quantization, quantize_model
from tokenmill.models.config import DecoderConfig
from tokenmill.models.registry import family_for
from tokenmill.tokenization.tokenizer import Tokenizer
from tokenmill.utils.devices import resolve_device, resolve_dtype
from tokenmill.weights.errors import ModelLoadError
from tokenmill.weights.loader import LoadReport, _resolve_target, load_weights
from tokenmill.weights.packaged import DEFAULT_MODEL, PACKAGED, packaged_path

_REPO_ID = re.compile(r"^[\w.\-]+/[\w.\-]+$")


@dataclass
class LoadedModel:
    model: nn.Module
    tokenizer: Tokenizer
    config: DecoderConfig
    #: sampling defaults from generation_config.json (HF names), empty when there is none
    generation_defaults: dict[str, Any] = field(default_factory=dict)
    source: str = ""
    report: LoadReport | None = None
    #: what quantize_model did, None for full-precision weights
    quantization: QuantizationReport | None = None


def resolve_source(model: str | None, revision: str | None = None) -> str:
    """A local directory or .gguf file for ``model`` (short name, path or Hub repo id)."""
    name = model or DEFAULT_MODEL
    if name in PACKAGED:
        return packaged_path(name)
    expanded = os.path.expanduser(name)
    if os.path.isdir(expanded) or os.path.isfile(expanded):
        return expanded
    if expanded.endswith(".gguf") or os.sep in expanded.strip("/") and not _REPO_ID.match(name):
        raise ModelLoadError(f"model path {name!r} does not exist")
    if _REPO_ID.match(name):
        from tokenmill.weights.hub import snapshot

        return snapshot(name, revision)
    raise ModelLoadError(
        f"unknown model {name!r}: give a short name ({', '.join(PACKAGED)}), "
        "a model directory, a .gguf file or a Hugging Face repo id like 'org/name'"
    )


@contextlib.contextmanager
def _skip_init() -> Iterator[None]:
    """Build modules without random initialisation: every weight is overwritten by the loader."""
    saved = nn.Linear.reset_parameters, nn.Embedding.reset_parameters
    nn.Linear.reset_parameters = lambda self: None  # type: ignore[method-assign]
    nn.Embedding.reset_parameters = lambda self: None  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Linear.reset_parameters, nn.Embedding.reset_parameters = saved  # type: ignore[method-assign]


def _build(family: Any, cfg: DecoderConfig, dtype: torch.dtype) -> nn.Module:
    with _skip_init():
        model = family.build(cfg)
    return model.to(dtype)


def _quantize(
    model: nn.Module,
    device: torch.device,
    quantization: str | None,
    int4_sources: dict[str, Int4Source] | None = None,
    layer_modes: dict[str, str] | None = None,
) -> QuantizationReport | None:
    """Quantize every linear layer on ``device``, before the model moves there: one layer
    at a time, each full-precision weight freed as soon as its layer is replaced."""
    return quantize_model(
        model.eval(), quantization, device=device, sources=int4_sources, layer_modes=layer_modes
    )


def _finalize(model: nn.Module, device: torch.device) -> nn.Module:
    """Move to ``device`` and pick the fastest weight layout there for the ``nn.Linear``
    layers (quantized layers already have their kernels' layouts)."""
    model = model.to(device).eval()
    dtype = next(model.parameters()).dtype
    if device.type == "cpu" and dtype == torch.float32:
        # PyTorch's fp32 GEMV is single-threaded; split layers run on every core.
        from tokenmill.layers.linear import split_linears

        split_linears(model, torch.get_num_threads())
    elif device.type == "cpu" and dtype == torch.bfloat16:
        # oneDNN reorders a plain bf16 weight on every call; pack each one once instead.
        # The packed copy doubles the linear weights' memory, so only where that is cheap.
        from tokenmill.layers.linear import pack_linears_for_onednn
        from tokenmill.utils.devices import available_memory_bytes

        linear_bytes = sum(
            m.weight.numel() * m.weight.element_size() for m in model.modules() if isinstance(m, nn.Linear)
        )
        if linear_bytes < available_memory_bytes(device) // 4:
            pack_linears_for_onednn(model)
    return model


def _read_json(path: str) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ModelLoadError(f"{path} is not valid JSON: {e}") from e


def load_from_dir(
    model_dir: str, dtype: torch.dtype, device: torch.device, quantization: str | None = None
) -> LoadedModel:
    from tokenmill.weights.safetensors_dir import iter_safetensors

    cfg_path = os.path.join(model_dir, "config.json")
    if not os.path.isfile(cfg_path):
        ggufs = sorted(f for f in os.listdir(model_dir) if f.endswith(".gguf"))
        if len(ggufs) == 1:
            return load_from_gguf(os.path.join(model_dir, ggufs[0]), dtype, device, quantization)
        hint = f"; it holds several GGUF files, name one: {', '.join(ggufs)}" if ggufs else ""
        raise ModelLoadError(f"no config.json in {model_dir}{hint}")
    if quantization == "gguf":
        raise ModelLoadError(
            f"{model_dir} holds safetensors weights, and quantization 'gguf' keeps the precision "
            "each tensor has in a GGUF file: load a .gguf file, or pick int8, int4, w4a8 or w8a8"
        )
    hf = _read_json(cfg_path)
    model_type = hf.get("model_type")
    if model_type is None:
        raise ModelLoadError(f"{cfg_path} has no model_type")
    family = family_for(model_type, cfg_path)
    cfg = family.from_hf(hf)
    tokenizer = Tokenizer.from_dir(model_dir)
    gen_defaults: dict[str, Any] = {}
    gen_path = os.path.join(model_dir, "generation_config.json")
    if os.path.isfile(gen_path):
        gen_defaults = _read_json(gen_path)
    _merge_eos(cfg, tokenizer, gen_defaults)
    model = _build(family, cfg, dtype)
    report = load_weights(
        model,
        iter_safetensors(model_dir),
        source=model_dir,
        # Some checkpoints carry precomputed rotary tables; tokenmill computes its own.
        ignore=lambda n: (
            n.endswith("rotary_emb.inv_freq") or n.endswith(".attn.bias") or n.endswith(".attn.masked_bias")
        ),
    )
    quantized = _quantize(model, device, quantization)
    model = _finalize(model, device)
    return LoadedModel(model, tokenizer, cfg, gen_defaults, model_dir, report, quantized)


def _gguf_to_hf_name(name: str, names: dict[str, str], block_prefix: str) -> str:
    parts = name.split(".")
    if parts[0] == "blk" and len(parts) >= 4:
        piece = ".".join(parts[2:-1])
        if piece in names:
            return f"{block_prefix}.{parts[1]}.{names[piece]}.{parts[-1]}"
    else:
        piece = ".".join(parts[:-1])
        if piece in names:
            return f"{names[piece]}.{parts[-1]}"
    return name  # unknown names stay as they are and the strict loader reports them


def load_from_gguf(
    path: str, dtype: torch.dtype, device: torch.device, quantization: str | None = None
) -> LoadedModel:
    from tokenmill.tokenization.gguf_tokenizer import tokenizer_from_gguf
    from tokenmill.weights.gguf_file import GGUFFile

    gguf = GGUFFile(path)
    arch = gguf.metadata.get("general.architecture")
    if arch is None:
        raise ModelLoadError(f"{path}: GGUF metadata has no general.architecture")
    family = family_for(arch, path)
    if family.from_gguf is None or family.gguf_names is None:
        raise ModelLoadError(f"{path}: loading {arch!r} from GGUF is not supported")
    cfg = family.from_gguf(gguf.metadata, gguf.tensor_names)
    tensors = gguf.tensors(skip=frozenset({"rope_freqs.weight"}))
    if "rope_freqs.weight" in gguf.tensor_names:
        factors = gguf.tensor("rope_freqs.weight")
        cfg.rope_scaling = {"rope_type": "freq_factors", "factors": factors.tolist()}
    tokenizer = tokenizer_from_gguf(gguf.metadata)
    _merge_eos(cfg, tokenizer, {})
    model = _build(family, cfg, dtype)
    block_prefix = "transformer.h" if arch == "gpt2" else "model.layers"
    names = family.gguf_names
    hf_to_gguf: dict[str, str] = {}

    def renamed():
        for n, t in tensors:
            hf_name = _gguf_to_hf_name(n, names, block_prefix)
            hf_to_gguf[hf_name] = n
            yield hf_name, t

    def describe(hf_name: str) -> str:
        gguf_name = hf_to_gguf.get(hf_name)
        return repr(hf_name) if gguf_name in (None, hf_name) else f"{gguf_name!r} ({hf_name})"

    transform = family.gguf_transform(cfg, arch) if family.gguf_transform else None
    report = load_weights(model, renamed(), source=path, transform=transform, describe=describe)
    shards = _linear_shards(model, hf_to_gguf)
    sources = (
        _gguf_int4_sources(gguf, model, shards, hf_to_gguf, transform)
        if quantization in ("int4", "w4a8", "gguf")
        else None
    )
    modes = (
        _gguf_layer_modes(gguf, model, shards, hf_to_gguf, dtype, device) if quantization == "gguf" else None
    )
    quantized = _quantize(model, device, quantization, sources, modes)
    model = _finalize(model, device)
    return LoadedModel(model, tokenizer, cfg, {}, path, report, quantized)


def _linear_shards(model: nn.Module, hf_to_gguf: dict[str, str]) -> dict[str, dict[int | None, str]]:
    """Module name -> {shard index (None: the whole weight) -> HF tensor name} for every
    weight the file holds, fused projections (qkv, gate_up) by shard."""
    packed: dict[str, tuple[str, int]] = getattr(model, "packed_modules", {})
    shards: dict[str, dict[int | None, str]] = {}
    for hf_name in hf_to_gguf:
        target, shard = _resolve_target(model, hf_name, packed)
        if target.endswith(".weight"):
            shards.setdefault(target[: -len(".weight")], {})[shard] = hf_name
    return shards


def _shard_order(module: nn.Module, parts: dict[int | None, str]) -> list[int | None] | None:
    """The shards of ``module`` in order, or None when the file does not hold every one."""
    sizes = getattr(module, "shard_sizes", None)
    order: list[int | None] = list(range(len(sizes))) if sizes is not None else [None]
    return order if set(parts) == set(order) else None


def _gguf_int4_sources(
    gguf: Any,
    model: nn.Module,
    shards: dict[str, dict[int | None, str]],
    hf_to_gguf: dict[str, str],
    transform: Any,
) -> dict[str, Int4Source]:
    """Linear layers whose every shard is stored as Q4_0, Q4_1 or Q4_K: their blocks become
    int4 layers as they are (group size 32), with no second rounding.

    Every other GGUF type is dequantized by the ``gguf`` package and quantized again:
    Q8_0 to int8 per channel (its per-32 scales do not fit one scale per channel) or to
    int4, the 4-bit types to int8, F16/BF16/F32, Q5/Q6 and the other K-quants to either.
    GPT-2's (in, out) Conv1D layers, which are not ``nn.Linear``, always quantize again.
    """
    from tokenmill.weights.gguf_file import INT4_TYPES

    sources: dict[str, Int4Source] = {}
    for module_name, parts in shards.items():
        module = model.get_submodule(module_name)
        order = _shard_order(module, parts)
        if order is None or not isinstance(module, nn.Linear):
            continue
        if not all(gguf.qtype_name(hf_to_gguf[parts[i]]) in INT4_TYPES for i in order):
            continue

        def source(names=tuple(parts[i] for i in order)):
            pieces = []
            for hf_name in names:
                blocks = gguf.int4_blocks(hf_to_gguf[hf_name])
                # q/k rows are stored permuted; the fix-up moves whole rows, so it applies
                # to codes, scales and zeros alike (the result is checked against the weight).
                if transform is not None:
                    blocks = tuple(transform(hf_name, t) for t in blocks)
                pieces.append(blocks)
            return tuple(torch.cat(ts) for ts in zip(*pieces))

        sources[module_name] = source
    return sources


def _gguf_layer_modes(
    gguf: Any,
    model: nn.Module,
    shards: dict[str, dict[int | None, str]],
    hf_to_gguf: dict[str, str],
    dtype: torch.dtype,
    device: torch.device,
) -> dict[str, str]:
    """Each linear layer at the precision its file stores it in (quantization "gguf").

    4-bit and smaller types become int4 layers; Q5_*, Q6_K and Q8_0 become int8, whose
    one scale per channel keeps them within a rounding of what the file holds, where 4-bit
    codes would lose most of what the extra bits keep; both run with int8 activations
    (w4a8, w8a8) where those kernels run on ``device``, as llama.cpp, too, rounds the
    activations to 8 bits for these types. Float matrices stay as they are. A fused layer
    takes its most precise shard's format, and an LM head tied to the embedding the
    embedding's.
    """
    from tokenmill.layers.quantized import _linear_weight, a8_runs
    from tokenmill.weights.gguf_file import weight_format

    as_mode = {
        "int4": "w4a8" if a8_runs("w4a8", dtype, device) else "int4",
        "int8": "w8a8" if a8_runs("w8a8", dtype, device) else "int8",
        "float": "none",
    }
    precision = ("int4", "int8", "float")
    # Tied weights are one tensor: the head finds the embedding's file name through it.
    named = dict(model.named_modules())
    by_weight = {id(named[n].weight): n for n in shards if hasattr(named.get(n), "weight")}
    modes: dict[str, str] = {}
    for name, module in named.items():
        if _linear_weight(module) is None:
            continue
        parts = shards.get(name) or shards.get(by_weight.get(id(module.weight), ""), {})
        if not parts:
            raise ModelLoadError(f"{gguf.path}: no tensor of the file holds the weight of {name!r}")
        formats = [weight_format(gguf.qtype_name(hf_to_gguf[n])) for n in parts.values()]
        modes[name] = as_mode[max(formats, key=precision.index)]
    return modes


def _merge_eos(cfg: DecoderConfig, tokenizer: Tokenizer, gen: dict[str, Any]) -> None:
    """Every id that ends generation: config, generation_config and tokenizer all count."""
    ids = list(cfg.eos_token_ids)
    gen_eos = gen.get("eos_token_id")
    ids += gen_eos if isinstance(gen_eos, list) else ([gen_eos] if gen_eos is not None else [])
    ids += tokenizer.eos_token_ids
    # An id outside the vocabulary can never be generated; configs sometimes carry one.
    cfg.eos_token_ids = [int(i) for i in dict.fromkeys(ids) if 0 <= int(i) < cfg.vocab_size]


def load_model(
    model: str | None = None,
    *,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device | None = None,
    revision: str | None = None,
    quantization: str | None = None,
) -> LoadedModel:
    """Load a model by short name, directory, .gguf file or Hub repo id.

    Args:
        model: None for the embedded default model.
        dtype: "float32", "bfloat16" (default) or "float16": the activations' dtype.
        device: "cpu", "cuda" or None for the best available.
        quantization: "int8", "int4" (group size 32), "w4a8", "w8a8" or None: quantization of
            every linear layer, done on ``device`` (see tokenmill.layers.quantized); "gguf"
            for a GGUF file: each layer at the precision the file stores it in.
    """
    quantization = check_quantization(quantization)
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    source = resolve_source(model, revision)
    if os.path.isdir(source):
        return load_from_dir(source, dt, dev, quantization)
    if source.endswith(".gguf") or _is_gguf(source):
        return load_from_gguf(source, dt, dev, quantization)
    raise ModelLoadError(f"{source} is neither a model directory nor a GGUF file")


def _is_gguf(path: str) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == b"GGUF"
