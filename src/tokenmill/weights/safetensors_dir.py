"""Reading single-file and sharded safetensors checkpoints from a model directory."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator

import torch

from tokenmill.weights.errors import ModelLoadError

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


def safetensors_files(model_dir: str) -> list[str]:
    """The checkpoint files of ``model_dir``, checking that every shard the index names exists."""
    index_path = os.path.join(model_dir, INDEX)
    if os.path.isfile(index_path):
        try:
            with open(index_path, encoding="utf-8") as f:
                weight_map = json.load(f)["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ModelLoadError(f"{index_path} is not a valid safetensors index: {e}") from e
        shards = sorted(set(weight_map.values()))
        missing = [s for s in shards if not os.path.isfile(os.path.join(model_dir, s))]
        if missing:
            raise ModelLoadError(
                f"{index_path} names shard(s) that are not in {model_dir}: {', '.join(missing)}; "
                "download the complete checkpoint"
            )
        return [os.path.join(model_dir, s) for s in shards]
    single = os.path.join(model_dir, SINGLE)
    if os.path.isfile(single):
        return [single]
    found = sorted(f for f in os.listdir(model_dir) if f.endswith(".safetensors"))
    if found:
        return [os.path.join(model_dir, f) for f in found]
    raise ModelLoadError(
        f"no weights in {model_dir}: expected {SINGLE} or {INDEX} with its shards "
        "(PyTorch .bin checkpoints are not loaded; convert them to safetensors)"
    )


def iter_safetensors(model_dir: str) -> Iterator[tuple[str, torch.Tensor]]:
    from safetensors import SafetensorError, safe_open

    for path in safetensors_files(model_dir):
        try:
            with safe_open(path, framework="pt") as f:
                for name in f.keys():
                    yield name, f.get_tensor(name)
        except SafetensorError as e:
            raise ModelLoadError(
                f"{path} is not a readable safetensors file (truncated or corrupt?): {e}"
            ) from e
