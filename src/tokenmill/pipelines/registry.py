"""Task names, their aliases, the head each needs and the default model where one ships."""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class TaskSpec:
    name: str
    module: str  # under tokenmill.pipelines
    cls: str
    head: str | None  # None: the task runs on the LLM engine, not a task head
    default_model: str | None = None
    description: str = ""
    #: served only by the transformers-backed backend (``pip install tokenmill[hf]``)
    backend: bool = False
    #: native where the architecture is, otherwise the backend (ConvNeXT image classification)
    backend_fallback: bool = False


TASKS: dict[str, TaskSpec] = {
    t.name: t
    for t in [
        TaskSpec(
            "text-generation",
            "text_generation",
            "TextGenerationPipeline",
            None,
            "smollm2-135m-instruct",
            "continue a prompt or answer chat messages",
        ),
        TaskSpec(
            "feature-extraction",
            "feature_extraction",
            "FeatureExtractionPipeline",
            "base",
            "all-minilm-l6-v2",
            "hidden states or pooled sentence embeddings",
        ),
        TaskSpec(
            "sentence-similarity",
            "feature_extraction",
            "SentenceSimilarityPipeline",
            "base",
            "all-minilm-l6-v2",
            "cosine similarity of sentences to a source sentence",
        ),
        TaskSpec("fill-mask", "fill_mask", "FillMaskPipeline", "masked-lm", None, "fill in masked tokens"),
        TaskSpec(
            "text-classification",
            "text_classification",
            "TextClassificationPipeline",
            "sequence-classification",
            None,
            "labels for texts or text pairs",
        ),
        TaskSpec(
            "zero-shot-classification",
            "zero_shot",
            "ZeroShotClassificationPipeline",
            "sequence-classification",
            None,
            "score any candidate labels with an NLI model",
        ),
        TaskSpec(
            "token-classification",
            "token_classification",
            "TokenClassificationPipeline",
            "token-classification",
            None,
            "a label per token or word, e.g. named entities",
        ),
        TaskSpec(
            "question-answering",
            "question_answering",
            "QuestionAnsweringPipeline",
            "question-answering",
            None,
            "find the answer span to a question in a context",
        ),
        TaskSpec(
            "summarization", "text2text", "SummarizationPipeline", "seq2seq-lm", None, "summarize a text"
        ),
        TaskSpec("translation", "text2text", "TranslationPipeline", "seq2seq-lm", None, "translate a text"),
        TaskSpec(
            "text2text-generation",
            "text2text",
            "Text2TextGenerationPipeline",
            "seq2seq-lm",
            None,
            "any text-to-text task of an encoder-decoder model",
        ),
        TaskSpec(
            "automatic-speech-recognition",
            "automatic_speech_recognition",
            "AutomaticSpeechRecognitionPipeline",
            "speech-seq2seq",
            "whisper-tiny.en",
            "transcribe or translate speech (Whisper)",
        ),
        TaskSpec(
            "image-classification",
            "image_classification",
            "ImageClassificationPipeline",
            "image-classification",
            None,
            "labels for images (ViT natively; other architectures through the backend)",
            backend_fallback=True,
        ),
        *(
            TaskSpec(name, "hf_backend", "HFBackendPipeline", None, None, description, backend=True)
            for name, description in (
                ("object-detection", "boxes, labels and scores for objects in an image"),
                ("image-segmentation", "masks and labels for the regions of an image"),
                ("depth-estimation", "a depth map for an image"),
                ("image-to-text", "a caption for an image"),
                ("image-text-to-text", "text from an image and a prompt"),
                ("audio-classification", "labels for audio clips"),
                ("text-to-audio", "speech or sound from text"),
            )
        ),
    ]
}

ALIASES = {
    "ner": "token-classification",
    "sentiment-analysis": "text-classification",
    "asr": "automatic-speech-recognition",
    "text-to-speech": "text-to-audio",
}

_TRANSLATION = re.compile(r"^translation_([A-Za-z_\-]+?)_to_([A-Za-z_\-]+)$")


def resolve_task(task: Any) -> tuple[TaskSpec, dict[str, Any]]:
    """The spec for ``task`` and the options its name implies (translation_en_to_fr)."""
    if not isinstance(task, str):
        raise ValueError(f"task must be a string such as 'text-classification', got {type(task).__name__}")
    if task in TASKS:
        return TASKS[task], {}
    if task in ALIASES:
        return TASKS[ALIASES[task]], {}
    m = _TRANSLATION.match(task)
    if m:
        return TASKS["translation"], {"src_lang": m.group(1), "tgt_lang": m.group(2)}
    names = sorted([*TASKS, *ALIASES])
    close = difflib.get_close_matches(task, names, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise ValueError(
        f"unknown task {task!r}{hint}; tokenmill's tasks are {', '.join(names)} and translation_XX_to_YY"
    )
