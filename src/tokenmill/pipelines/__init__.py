"""``pipeline(task, model)``: one call from raw input to plain Python results, per task."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from tokenmill.pipelines.registry import ALIASES, TASKS, resolve_task

if TYPE_CHECKING:
    import torch

__all__ = ["pipeline", "TASKS", "ALIASES"]


def pipeline(
    task: str,
    model: str | None = None,
    *,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    revision: str | None = None,
    batch_size: int = 8,
    **kwargs: Any,
) -> Any:
    """A ready pipeline for ``task``.

    Args:
        task: a task name (``tokenmill.pipelines.TASKS``), an alias ("ner",
            "sentiment-analysis") or ``translation_XX_to_YY``.
        model: short name, model directory or Hub repo id; None takes the task's default
            model where one ships (feature-extraction, sentence-similarity, text-generation).
        dtype: float32 by default for encoder tasks (scores match transformers);
            "bfloat16" runs faster.
        batch_size: inputs per forward pass; inputs of similar length are batched together.
        kwargs: default options for every call (each task documents its own).
    """
    spec, implied = resolve_task(task)
    name = model if model is not None else spec.default_model
    if name is None:
        raise ValueError(
            f"task {spec.name!r} has no default model in tokenmill; pass model= with a checkpoint "
            "fine-tuned for it (a directory or a Hub repo id)"
        )
    if not isinstance(name, str):
        raise ValueError(
            f"model must be a name, a directory or a Hub repo id (a string), got {type(name).__name__}"
        )
    common = {"device": device, "dtype": dtype, "revision": revision, "batch_size": batch_size}
    if spec.backend:
        return _backend(spec.name, name, common, {**implied, **kwargs})
    cls = getattr(importlib.import_module(f"tokenmill.pipelines.{spec.module}"), spec.cls)
    if spec.head is None:
        return cls(name, **common, **kwargs)
    from tokenmill.weights.task_loader import NotNativeError, load_task_model

    try:
        loaded = load_task_model(name, spec.head, dtype=dtype, device=device, revision=revision)
    except NotNativeError:
        if not spec.backend_fallback:
            raise
        return _backend(spec.name, name, common, {**implied, **kwargs})
    return cls(loaded, batch_size=batch_size, **implied, **kwargs)


def _backend(task: str, model: str, common: dict[str, Any], kwargs: dict[str, Any]) -> Any:
    """A task (or architecture) tokenmill does not run natively, through transformers."""
    from tokenmill.pipelines.hf_backend import HFBackendPipeline

    return HFBackendPipeline(task, model, **common, **kwargs)
