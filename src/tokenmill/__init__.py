"""tokenmill: run pretrained transformer models from Python, the command line and a server.

The public API is imported lazily so ``import tokenmill`` stays fast.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["LLM", "SamplingParams", "BeamSearchParams", "load_model", "pipeline", "__version__"]

_LAZY = {
    "LLM": "tokenmill.generation.llm",
    "SamplingParams": "tokenmill.generation.sampling_params",
    "BeamSearchParams": "tokenmill.generation.sampling_params",
    "load_model": "tokenmill.weights.model_loader",
    "pipeline": "tokenmill.pipelines",
}

if TYPE_CHECKING:
    from tokenmill.generation.llm import LLM
    from tokenmill.generation.sampling_params import BeamSearchParams, SamplingParams
    from tokenmill.pipelines import pipeline
    from tokenmill.weights.model_loader import load_model


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'tokenmill' has no attribute {name!r}")
