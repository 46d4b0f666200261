"""Load an encoder or encoder-decoder checkpoint with the head a pipeline needs.

Checkpoints come saved from many classes: a bare ``BertModel`` (no ``bert.`` prefix,
no head), a ``BertForMaskedLM`` (prefix and MLM head), a classifier, ... Like
transformers, any of them loads into any head class of its family, as long as the
weights that class needs are there: names gain or lose the base-model prefix, tensors
of other heads are set aside, and a head that is not in the checkpoint is an error that
says which task needs it (transformers would initialise it at random and warn; a
pipeline over random weights gives confident nonsense).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from tokenmill.models.task_registry import HEAD_PURPOSE, HEADS, TaskFamily, task_family_for
from tokenmill.tokenization.tokenizer import Tokenizer
from tokenmill.utils.devices import resolve_device
from tokenmill.weights.ctranslate2 import is_ct2_dir, open_ct2_dir
from tokenmill.weights.errors import ModelLoadError
from tokenmill.weights.loader import LoadReport, _resolve_target, load_weights


class MissingHeadError(ModelLoadError):
    """The checkpoint has no weights for the head a task needs."""


class NotNativeError(ModelLoadError):
    """The checkpoint's architecture has no native tokenmill implementation."""


@dataclass
class LoadedTaskModel:
    model: nn.Module
    tokenizer: Tokenizer | None  # None for vision models
    config: Any
    hf_config: dict[str, Any]
    generation_defaults: dict[str, Any] = field(default_factory=dict)
    source: str = ""
    head: str = "base"
    family: TaskFamily | None = None
    report: LoadReport | None = None

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype


def resolve_task_dtype(dtype: str | torch.dtype | None) -> torch.dtype:
    # Encoders score and embed: float32 by default, as transformers does, so scores match
    # the reference; bf16 is there for whoever asks.
    from tokenmill.utils.devices import resolve_dtype

    if dtype is None or dtype == "auto":
        return torch.float32
    return resolve_dtype(dtype, torch.device("cpu"))


def _checkpoint_names(model_dir: str) -> list[str]:
    from safetensors import SafetensorError, safe_open

    from tokenmill.weights.safetensors_dir import safetensors_files

    names: list[str] = []
    for path in safetensors_files(model_dir):
        try:
            with safe_open(path, framework="pt") as f:
                names.extend(f.keys())
        except SafetensorError as e:
            raise ModelLoadError(
                f"{path} is not a readable safetensors file (truncated or corrupt?): {e}"
            ) from e
    return names


class _NameMap:
    """Maps checkpoint names onto the model's parameters, adding or removing the base prefix."""

    def __init__(self, model: nn.Module, prefix: str) -> None:
        self.model = model
        self.prefix = prefix + "." if prefix else ""
        self.packed: dict[str, tuple[str, int]] = getattr(model, "packed_modules", {})
        self.params = dict(model.named_parameters(remove_duplicate=False))
        # Saved buffers such as BART's final_logits_bias are weights too.
        self.buffers = {n for n, _ in model.named_buffers() if _persistent(model, n)}

    def _known(self, name: str) -> bool:
        return _resolve_target(self.model, name, self.packed)[0] in self.params or name in self.buffers

    def target(self, name: str) -> str | None:
        """The model name for checkpoint tensor ``name``, or None when it has no place."""
        candidates = [name]
        # Old BERT checkpoints (bert-base-uncased) name LayerNorm parameters gamma/beta.
        legacy = re.sub(
            r"LayerNorm\.gamma$", "LayerNorm.weight", re.sub(r"LayerNorm\.beta$", "LayerNorm.bias", name)
        )
        if legacy != name:
            candidates = [legacy]
            name = legacy
        if self.prefix:
            if name.startswith(self.prefix):
                candidates.append(name[len(self.prefix) :])
            else:
                candidates.append(self.prefix + name)
        for c in candidates:
            if self._known(c):
                return c
        return None

    def in_base(self, model_name: str) -> bool:
        """Whether a parameter belongs to the base model rather than to a task head.

        A base model's optional parts (BERT's pooler, used only by its sequence
        classifier) count as head: a checkpoint without them lacks that head.
        """
        head_class_has_prefix = bool(self.prefix) and any(p.startswith(self.prefix) for p in self.params)
        inner = model_name[len(self.prefix) :] if head_class_has_prefix else model_name
        if head_class_has_prefix and not model_name.startswith(self.prefix):
            return False
        base = self.model.get_submodule(self.prefix[:-1]) if head_class_has_prefix else self.model
        return not any(inner.startswith(m + ".") for m in getattr(base, "optional_modules", ()))


def _persistent(model: nn.Module, name: str) -> bool:
    module_name, _, leaf = name.rpartition(".")
    module = model.get_submodule(module_name) if module_name else model
    return leaf not in module._non_persistent_buffers_set


def _missing(model: nn.Module, filled: set[str]) -> list[str]:
    params = dict(model.named_parameters(remove_duplicate=False))
    groups: dict[int, list[str]] = {}
    for name, p in params.items():
        groups.setdefault(id(p), []).append(name)
    missing = []
    for names in groups.values():
        if not any(n in filled for n in names):
            missing.append(names[0])
    return missing


def _drop_absent_optional_modules(model: nn.Module, family: TaskFamily, names: list[str]) -> None:
    """A base model's optional parts (BERT's pooler) that the checkpoint lacks are removed:
    feature extraction never runs them, and a masked-LM checkpoint has no pooler."""
    nm = _NameMap(model, family.base_model_prefix)
    targets = {t for n in names if (t := nm.target(n)) is not None}
    for name in getattr(model, "optional_modules", ()):
        if getattr(model, name, None) is not None and not any(t.startswith(name + ".") for t in targets):
            setattr(model, name, None)


def _plan(model: nn.Module, family: TaskFamily, names: list[str], source: str, head: str) -> dict[str, str]:
    """checkpoint name -> model name for every tensor that loads; raises on a missing head."""
    if head == "base":
        _drop_absent_optional_modules(model, family, names)
    nm = _NameMap(model, family.base_model_prefix)
    plan: dict[str, str] = {}
    for name in names:
        target = nm.target(name)
        if target is not None:
            plan[name] = target
    filled = {_resolve_target(model, t, nm.packed)[0] for t in plan.values()}
    missing = _missing(model, filled)
    if missing:
        shown = ", ".join(missing[:6]) + (f" and {len(missing) - 6} more" if len(missing) > 6 else "")
        if head != "base" and not all(nm.in_base(m) for m in missing):
            raise MissingHeadError(
                f"{source} has no weights for {HEAD_PURPOSE[head]} (missing: {shown}); "
                "use a checkpoint saved with this head (a model trained or fine-tuned for the task)"
            )
        raise ModelLoadError(f"{source}: missing tensor(s) for {shown}")
    return plan


def _copy_buffer(buf: torch.Tensor, tensor: torch.Tensor, source: str, name: str) -> None:
    if tuple(buf.shape) != tuple(tensor.shape):
        raise ModelLoadError(
            f"{source}: tensor {name!r} has shape {tuple(tensor.shape)}, the model expects {tuple(buf.shape)}"
        )
    with torch.no_grad():
        buf.copy_(tensor)


def _read_json(path: str) -> dict[str, Any]:
    import json

    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ModelLoadError(f"{path} is not valid JSON: {e}") from e


def load_task_model(
    model: str | None,
    head: str,
    *,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device | None = None,
    revision: str | None = None,
) -> LoadedTaskModel:
    """Load ``model`` (short name, directory or Hub repo id) with ``head`` on top.

    Args:
        head: one of ``HEADS``: "base" for hidden states, or a task head.
        dtype: float32 by default (scores match the reference); "bfloat16" is faster.
    """
    from tokenmill.weights.model_loader import resolve_source
    from tokenmill.weights.safetensors_dir import iter_safetensors

    if head not in HEADS:
        raise ValueError(f"head must be one of {', '.join(HEADS)}, got {head!r}")
    dev = resolve_device(device)
    dt = resolve_task_dtype(dtype)
    source = resolve_source(model, revision)
    if not os.path.isdir(source):
        raise ModelLoadError(
            f"{source} is a single file; pipelines load encoder and encoder-decoder models "
            "from a model directory (config.json, tokenizer.json, *.safetensors)"
        )
    # A CTranslate2 (faster-whisper) directory: model.bin and its own config.json, read
    # as the Hugging Face checkpoint it was converted from (weights/ctranslate2.py).
    ct2 = open_ct2_dir(source) if is_ct2_dir(source) else None
    cfg_path = os.path.join(source, "config.json" if ct2 is None else "model.bin")
    if ct2 is not None:
        hf = ct2.hf_config
    elif not os.path.isfile(cfg_path):
        raise ModelLoadError(f"no config.json in {source}")
    else:
        hf = _read_json(cfg_path)
    model_type = hf.get("model_type")
    if model_type is None:
        raise ModelLoadError(f"{cfg_path} has no model_type")
    try:
        family = task_family_for(model_type, cfg_path)
    except ValueError as e:
        raise NotNativeError(str(e)) from e
    if head not in family.classes:
        heads = ", ".join(h for h in HEADS if h in family.classes)
        raise MissingHeadError(
            f"{source}: tokenmill has no {model_type!r} model with {HEAD_PURPOSE[head]}; "
            f"this family offers: {heads}"
        )
    names = ct2.names() if ct2 is not None else _checkpoint_names(source)
    cfg = family.config(hf)
    if model_type == "t5" and head == "seq2seq-lm" and "lm_head.weight" in names:
        # transformers 5 writes tie_word_embeddings=true for every T5 and unties where the
        # checkpoint holds its own lm_head (FLAN-T5, T5 v1.1): so must we.
        cfg.tie_word_embeddings = False
    # Vision models read pixels, not text: they have no tokenizer.
    tokenizer = None if family.kind == "vision" else Tokenizer.from_dir(source)
    gen_path = os.path.join(source, "generation_config.json")
    gen_defaults = _read_json(gen_path) if os.path.isfile(gen_path) else {}
    if ct2 is not None:
        gen_defaults = {**ct2.generation_config, **gen_defaults}

    from tokenmill.weights.model_loader import _skip_init

    with _skip_init():
        net = family.model_class(head)(cfg)
    net = net.to(dt)
    plan = _plan(net, family, names, source, head)
    buffers = dict(net.named_buffers())

    def renamed() -> Iterator[tuple[str, torch.Tensor]]:
        for name, tensor in iter_safetensors(source) if ct2 is None else ct2.tensors():
            target = plan.get(name)
            if target in buffers:
                _copy_buffer(buffers[target], tensor, source, name)
            elif target is not None:
                yield target, tensor

    report = load_weights(net, renamed(), source=source)
    report.ignored = sorted(set(names) - set(plan))
    net = net.to(dev).eval()
    if dev.type == "cpu":
        # oneDNN with pre-packed weights beats ATen's product at every encoder batch shape
        # here; the packed copy doubles the linear weights, small for these models.
        from tokenmill.layers.linear import pack_linears_for_onednn

        pack_linears_for_onednn(net, dtypes=(torch.float32, torch.bfloat16))
    return LoadedTaskModel(net, tokenizer, cfg, hf, gen_defaults, source, head, family, report)
