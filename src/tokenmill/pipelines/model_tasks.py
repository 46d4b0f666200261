"""Which tasks a model can serve, read from its files without loading any weights.

A checkpoint's ``config.json`` names the class it was saved from (``architectures``)
and its family (``model_type``). The class's suffix says which head it carries, the
family says whether tokenmill has a native implementation of that head, and the
pipeline registry says which tasks run on that head. Only tasks registered in
``tokenmill.pipelines.registry.TASKS`` are ever listed, so a task appears here once its
pipeline exists. Nothing here imports torch: ``tokenmill models`` stays fast.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any

from tokenmill.pipelines.registry import TASKS

#: model_type of the decoder-only families the generation engine runs
#: (tokenmill.models.registry; a test keeps the two in step)
DECODER_MODEL_TYPES = ("gemma3", "gemma3_text", "gpt2", "llama", "mistral", "qwen2", "qwen3")

#: what a class name ends with, after its family's stem: BertForMaskedLM -> ForMaskedLM
_SUFFIX = re.compile(r"(For[A-Za-z0-9]+|MTModel|EncoderModel|Model)$")

#: families whose hidden states are text features (feature-extraction, sentence-similarity)
_TEXT_KINDS = ("encoder", "encoder-decoder")

#: extra tasks a head serves besides those registered on it: a pretrained masked-LM
#: encoder is a general-purpose one, so its hidden states are worth extracting too
_ALSO = {"masked-lm": ("feature-extraction",)}

#: architectures without a native implementation whose task the transformers backend
#: runs (registry tasks with ``backend`` or ``backend_fallback``), by class-name suffix
_BACKEND_SUFFIXES = {
    "ForImageClassification": "image-classification",
    "ForObjectDetection": "object-detection",
    "ForSemanticSegmentation": "image-segmentation",
    "ForInstanceSegmentation": "image-segmentation",
    "ForUniversalSegmentation": "image-segmentation",
    "ForDepthEstimation": "depth-estimation",
    "ForAudioClassification": "audio-classification",
}

#: tasks of the packaged models before filtering by what is registered (whisper's
#: speech tasks appear once their pipelines exist)
_PACKAGED_TASKS = {
    "smollm2-135m-instruct": ("text-generation",),
    "gemma3-270m": ("text-generation",),
    "all-minilm-l6-v2": ("feature-extraction", "sentence-similarity"),
    "whisper-tiny.en": ("automatic-speech-recognition",),
    "whisper-base": ("automatic-speech-recognition",),
}


def _registered(tasks: Any) -> list[str]:
    """``tasks`` in TASKS order, without duplicates or unregistered ones."""
    wanted = set(tasks)
    return [name for name in TASKS if name in wanted]


def tasks_for_packaged(name: str) -> list[str]:
    """The tasks a packaged model (``tokenmill.weights.packaged.PACKAGED``) serves."""
    return _registered(_PACKAGED_TASKS.get(name, ()))


def _suffix(name: str) -> str | None:
    m = _SUFFIX.search(name)
    return m.group(1) if m else None


def has_entailment_label(hf_config: dict[str, Any]) -> bool:
    """Whether an NLI label is there for zero-shot classification (found as transformers finds it)."""
    labels = list((hf_config.get("label2id") or {}).keys())
    labels += [str(v) for v in (hf_config.get("id2label") or {}).values()]
    return any(str(label).lower().startswith("entail") for label in labels)


def tasks_for_config(hf_config: dict[str, Any], *, sentence_transformers: bool = False) -> list[str]:
    """The tasks a checkpoint with this ``config.json`` serves in tokenmill.

    The head comes from the class the checkpoint was saved from (``architectures``),
    matched to the native classes of its family by their suffix (``ForMaskedLM``, ...).

    Args:
        sentence_transformers: the directory holds a sentence-transformers layout
            (``modules.json``), so the model is made for sentence embeddings.
    """
    from tokenmill.models.task_registry import TASK_FAMILIES

    model_type = hf_config.get("model_type")
    architectures = [a for a in hf_config.get("architectures") or [] if isinstance(a, str)]
    if model_type in DECODER_MODEL_TYPES:
        return _registered(["text-generation"])
    family = TASK_FAMILIES.get(model_type) if isinstance(model_type, str) else None
    if family is None:
        backend = [_BACKEND_SUFFIXES.get(_suffix(a) or "") for a in architectures]
        return _registered(t for t in backend if t is not None and _through_backend(t))
    by_suffix = {_suffix(cls): head for head, cls in family.classes.items()}
    # a config without the class it came from: only the bare model is sure
    heads = {by_suffix.get(_suffix(a)) for a in architectures} if architectures else {"base"}
    if sentence_transformers:
        heads.add("base")
    tasks: list[str] = []
    for head in heads - {None}:
        if head == "base" and family.kind not in _TEXT_KINDS:
            continue  # an image or speech encoder's features are no text task
        tasks += [spec.name for spec in TASKS.values() if spec.head == head]
        tasks += _ALSO.get(head, ())
    if not has_entailment_label(hf_config):
        tasks = [t for t in tasks if t != "zero-shot-classification"]
    return _registered(tasks)


def _through_backend(task: str) -> bool:
    spec = TASKS[task] if task in TASKS else None
    return spec is not None and (getattr(spec, "backend", False) or getattr(spec, "backend_fallback", False))


def tasks_for_model_dir(path: str) -> list[str]:
    """The tasks the model in ``path`` serves: a model directory or a .gguf file.

    A directory without a readable ``config.json`` serves nothing (a GGUF file inside one
    still serves text-generation).
    """
    if os.path.isfile(path):
        return _registered(["text-generation"]) if path.endswith(".gguf") else []
    cfg_path = os.path.join(path, "config.json")
    try:
        with open(cfg_path, encoding="utf-8") as f:
            hf = json.load(f)
    except (OSError, ValueError):
        hf = None
    if not isinstance(hf, dict):
        try:
            has_gguf = any(name.endswith(".gguf") for name in os.listdir(path))
        except OSError:
            has_gguf = False
        return _registered(["text-generation"]) if has_gguf else []
    st = os.path.isfile(os.path.join(path, "modules.json"))
    return tasks_for_config(hf, sentence_transformers=st)
