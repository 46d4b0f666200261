"""The strict weight loader shared by every format.

Checkpoint tensors arrive under Hugging Face names. Fused parameters (qkv_proj,
gate_up_proj) declare which checkpoint names fill which shard; everything else must
match a parameter exactly. Anything missing, unexpected or of the wrong shape is an
error that names it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
from torch import nn

from tokenmill.weights.errors import ModelLoadError


@dataclass
class LoadReport:
    loaded: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)


def _resolve_target(
    model: nn.Module, name: str, packed: dict[str, tuple[str, int]]
) -> tuple[str, int | None]:
    parts = name.split(".")
    for i, part in enumerate(parts):
        if part in packed:
            fused, shard = packed[part]
            return ".".join(parts[:i] + [fused] + parts[i + 1 :]), shard
    return name, None


def load_weights(
    model: nn.Module,
    tensors: Iterable[tuple[str, torch.Tensor]],
    *,
    source: str,
    transform: Callable[[str, torch.Tensor], torch.Tensor] | None = None,
    ignore: Callable[[str], bool] | None = None,
    describe: Callable[[str], str] | None = None,
) -> LoadReport:
    """Copy ``tensors`` into ``model``'s parameters, strictly.

    Args:
        source: the file or directory, named in errors.
        transform: per-tensor fix-up applied after renaming (GGUF layouts).
        ignore: names that may be present without a parameter (e.g. rotary caches).
        describe: how to name a tensor in errors (GGUF files add their own name).
    """

    def show(name: str) -> str:
        return describe(name) if describe is not None else repr(name)

    packed: dict[str, tuple[str, int]] = getattr(model, "packed_modules", {})
    params = dict(model.named_parameters(remove_duplicate=False))
    # Tied parameters appear under several names; each must be filled once under any.
    by_id: dict[int, list[str]] = {}
    for pname, p in params.items():
        by_id.setdefault(id(p), []).append(pname)
    filled: dict[str, set[int | None]] = {}
    report = LoadReport()
    for name, tensor in tensors:
        target, shard = _resolve_target(model, name, packed)
        if target not in params:
            if ignore is not None and ignore(name):
                report.ignored.append(name)
                continue
            raise ModelLoadError(f"{source}: unexpected tensor {show(name)} has no place in the model")
        param = params[target]
        if shard is None:
            dest = param.data
        else:
            module = model.get_submodule(target.rsplit(".", 1)[0])
            sizes = module.shard_sizes
            start = sum(sizes[:shard])
            dest = param.data.narrow(0, start, sizes[shard])
        if transform is not None:
            try:
                tensor = transform(name, tensor)
            except RuntimeError as e:  # a layout fix-up (q/k un-permute) cannot reshape a wrong-shaped tensor
                raise ModelLoadError(
                    f"{source}: tensor {show(name)} has shape {tuple(tensor.shape)}, "
                    f"the model expects {tuple(dest.shape)}"
                ) from e
        if tuple(tensor.shape) != tuple(dest.shape):
            raise ModelLoadError(
                f"{source}: tensor {show(name)} has shape {tuple(tensor.shape)}, "
                f"the model expects {tuple(dest.shape)}"
            )
        with torch.no_grad():
            dest.copy_(tensor)
        for alias in by_id[id(param)]:
            filled.setdefault(alias, set()).add(shard)
        report.loaded.append(name)
    missing = []
    for pname in params:
        got = filled.get(pname, set())
        module_name = pname.rsplit(".", 1)[0]
        module = model.get_submodule(module_name) if module_name != pname else model
        shards = getattr(module, "shard_sizes", None)
        need = set(range(len(shards))) if shards is not None else {None}
        if not need <= got:
            missing.append(pname)
    if missing:
        shown = ", ".join(missing[:8]) + (f" and {len(missing) - 8} more" if len(missing) > 8 else "")
        raise ModelLoadError(f"{source}: missing tensor(s) for {shown}")
    return report
