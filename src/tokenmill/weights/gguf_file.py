"""Reading GGUF files: metadata as plain Python values, tensors dequantized by the `gguf` package."""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from tokenmill.weights.errors import ModelLoadError

# Arrays that are large and only read by the tokenizer builder; kept as numpy to stay fast.
_BULK_ARRAYS = ("tokenizer.ggml.scores", "tokenizer.ggml.token_type")


class GGUFFile:
    """A GGUF file opened read-only (memory-mapped)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        import gguf  # imported lazily: only GGUF users pay for it

        self.path = os.fspath(path)
        if not os.path.isfile(self.path):
            raise ModelLoadError(f"GGUF file not found: {self.path}")
        try:
            self.reader = gguf.GGUFReader(self.path)
        except Exception as e:  # the reader raises many types on bad input
            raise ModelLoadError(
                f"{self.path} is not a readable GGUF file (truncated or corrupt?): {type(e).__name__}: {e}"
            ) from e
        self._gguf = gguf
        self.metadata = self._read_metadata()
        self.tensor_names = {t.name for t in self.reader.tensors}

    def _read_metadata(self) -> dict[str, Any]:
        meta: dict[str, Any] = {}
        for key, field in self.reader.fields.items():
            if key.startswith("GGUF."):
                continue
            try:
                if key in _BULK_ARRAYS:
                    meta[key] = np.concatenate([field.parts[i] for i in field.data]) if field.data else []
                else:
                    meta[key] = field.contents()
            except Exception as e:
                raise ModelLoadError(f"{self.path}: metadata key {key!r} cannot be read: {e}") from e
        return meta

    def tensors(self, skip: frozenset[str] = frozenset()) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield (GGUF name, float32 tensor) with the PyTorch (out, in) orientation."""
        for t in self.reader.tensors:
            if t.name not in skip:
                yield t.name, self._to_torch(t)

    def tensor(self, name: str) -> torch.Tensor:
        for t in self.reader.tensors:
            if t.name == name:
                return self._to_torch(t)
        raise ModelLoadError(f"{self.path}: no tensor {name!r}")

    def _to_torch(self, t: Any) -> torch.Tensor:
        gguf = self._gguf
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))
        try:
            if t.tensor_type in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
                arr = np.asarray(t.data, dtype=np.float32)
            elif t.tensor_type == gguf.GGMLQuantizationType.BF16:
                raw = np.asarray(t.data).view(np.uint16).astype(np.uint32) << 16
                arr = raw.view(np.float32)
            else:
                arr = gguf.quants.dequantize(t.data, t.tensor_type)
            arr = arr.reshape(shape)
        except NotImplementedError as e:
            raise ModelLoadError(
                f"{self.path}: tensor {t.name!r} uses quantization {t.tensor_type.name}, which the "
                f"installed gguf package cannot dequantize; upgrade gguf or re-quantize the file"
            ) from e
        except (ValueError, IndexError) as e:
            raise ModelLoadError(f"{self.path}: tensor {t.name!r} cannot be read: {e}") from e
        return torch.from_numpy(np.ascontiguousarray(arr))
