"""Which native class runs which encoder or encoder-decoder architecture, per task head.

Decoder-only LLMs live in ``registry.py`` and run on the generation engine; the families
here are loaded by ``weights.task_loader`` for the pipelines. Modules are named, not
imported, so ``import tokenmill`` never pays for families a program does not use.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

HEADS = (
    "base",
    "masked-lm",
    "sequence-classification",
    "token-classification",
    "question-answering",
    "seq2seq-lm",
    "speech-seq2seq",
    "image-classification",
)

#: what each head is for, named in errors about a checkpoint without it
HEAD_PURPOSE = {
    "base": "hidden states (feature-extraction)",
    "masked-lm": "a masked-language-model head (fill-mask)",
    "sequence-classification": "a sequence classification head (text-classification, zero-shot-classification)",
    "token-classification": "a token classification head (token-classification / ner)",
    "question-answering": "a span prediction head (question-answering)",
    "seq2seq-lm": "an encoder-decoder language-model head (summarization, translation, text2text-generation)",
    "speech-seq2seq": "a speech encoder-decoder head (automatic-speech-recognition)",
    "image-classification": "an image classification head (image-classification)",
}


@dataclass(frozen=True)
class TaskFamily:
    module: str
    config_from_hf: str
    classes: dict[str, str]
    #: the attribute that holds the base model inside head classes (HF's base_model_prefix)
    base_model_prefix: str
    kind: str  # "encoder", "encoder-decoder", "speech" or "vision"

    def load_module(self) -> Any:
        return importlib.import_module(self.module)

    def config(self, hf: dict[str, Any]) -> Any:
        fn: Callable[[dict[str, Any]], Any] = getattr(self.load_module(), self.config_from_hf)
        return fn(hf)

    def model_class(self, head: str) -> type:
        return getattr(self.load_module(), self.classes[head])


def _encoder(module: str, config_fn: str, prefix: str, stem: str) -> TaskFamily:
    return TaskFamily(
        module=f"tokenmill.models.{module}",
        config_from_hf=config_fn,
        classes={
            "base": f"{stem}Model",
            "masked-lm": f"{stem}ForMaskedLM",
            "sequence-classification": f"{stem}ForSequenceClassification",
            "token-classification": f"{stem}ForTokenClassification",
            "question-answering": f"{stem}ForQuestionAnswering",
        },
        base_model_prefix=prefix,
        kind="encoder",
    )


TASK_FAMILIES: dict[str, TaskFamily] = {
    "bert": _encoder("bert", "bert_config_from_hf", "bert", "Bert"),
    "distilbert": _encoder("distilbert", "distilbert_config_from_hf", "distilbert", "DistilBert"),
    "roberta": _encoder("roberta", "roberta_config_from_hf", "roberta", "Roberta"),
    "xlm-roberta": _encoder("roberta", "roberta_config_from_hf", "roberta", "Roberta"),
    "t5": TaskFamily(
        module="tokenmill.models.t5",
        config_from_hf="t5_config_from_hf",
        classes={"base": "T5EncoderModel", "seq2seq-lm": "T5ForConditionalGeneration"},
        base_model_prefix="",
        kind="encoder-decoder",
    ),
    "bart": TaskFamily(
        module="tokenmill.models.bart",
        config_from_hf="bart_config_from_hf",
        classes={
            "seq2seq-lm": "BartForConditionalGeneration",
            "sequence-classification": "BartForSequenceClassification",
        },
        base_model_prefix="model",
        kind="encoder-decoder",
    ),
    "mbart": TaskFamily(
        module="tokenmill.models.bart",
        config_from_hf="bart_config_from_hf",
        classes={"seq2seq-lm": "BartForConditionalGeneration"},
        base_model_prefix="model",
        kind="encoder-decoder",
    ),
    "whisper": TaskFamily(
        module="tokenmill.models.whisper",
        config_from_hf="whisper_config_from_hf",
        classes={"speech-seq2seq": "WhisperForConditionalGeneration"},
        base_model_prefix="model",
        kind="speech",
    ),
    "vit": TaskFamily(
        module="tokenmill.models.vit",
        config_from_hf="vit_config_from_hf",
        classes={"base": "ViTModel", "image-classification": "ViTForImageClassification"},
        base_model_prefix="vit",
        kind="vision",
    ),
    "marian": TaskFamily(
        module="tokenmill.models.marian",
        config_from_hf="marian_config_from_hf",
        classes={"seq2seq-lm": "MarianMTModel"},
        base_model_prefix="model",
        kind="encoder-decoder",
    ),
}


def task_family_for(model_type: str, source: str) -> TaskFamily:
    if model_type not in TASK_FAMILIES:
        raise ValueError(
            f"{source}: architecture {model_type!r} has no native encoder or encoder-decoder "
            f"implementation; tokenmill's pipelines run {', '.join(sorted(TASK_FAMILIES))} natively"
        )
    return TASK_FAMILIES[model_type]
