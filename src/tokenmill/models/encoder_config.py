"""The config of the encoder-only families (BERT, DistilBERT, RoBERTa, XLM-RoBERTa).

Each family's ``*_config_from_hf`` is the only code that knows its foreign key names; the
pipelines read this dataclass. ``hf_labels`` reads the label fields every Hugging Face
config shares, so the seq2seq families can use it too.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from tokenmill.layers.activations import get_activation

PROBLEM_TYPES = ("regression", "single_label_classification", "multi_label_classification")


@dataclass
class EncoderConfig:
    """Hyper-parameters of a post-LayerNorm transformer encoder, in tokenmill's own names."""

    model_type: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    #: rows of the position table (RoBERTa's first ``position_offset`` rows are never used by tokens)
    max_position_embeddings: int
    #: 0 means the family has no token type (segment) embeddings (DistilBERT)
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    hidden_act: str = "gelu"
    pad_token_id: int | None = 0
    id2label: dict[int, str] = field(default_factory=lambda: {0: "LABEL_0", 1: "LABEL_1"})
    label2id: dict[str, int] = field(default_factory=lambda: {"LABEL_0": 0, "LABEL_1": 1})
    #: "regression", "single_label_classification", "multi_label_classification" or None
    #: (None: the pipeline decides from num_labels, as transformers does)
    problem_type: str | None = None
    #: kept so a config round-trips; dropout is off at inference
    classifier_dropout: float | None = None
    #: the masked-LM decoder shares the word embedding matrix
    tie_word_embeddings: bool = True
    #: first position id of a token: 0, or padding_idx + 1 for RoBERTa
    position_offset: int = 0

    @property
    def num_labels(self) -> int:
        return len(self.id2label)

    @property
    def max_input_length(self) -> int:
        """The longest input, special tokens included, that the position table can embed."""
        return self.max_position_embeddings - self.position_offset

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "intermediate_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"config field {name} must be a positive integer, got {value!r}")
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"config field hidden_size ({self.hidden_size}) must be a multiple of "
                f"num_attention_heads ({self.num_heads})"
            )
        if not isinstance(self.type_vocab_size, int) or self.type_vocab_size < 0:
            raise ValueError(f"config field type_vocab_size must be >= 0, got {self.type_vocab_size!r}")
        if not self.layer_norm_eps > 0:
            raise ValueError(f"config field layer_norm_eps must be > 0, got {self.layer_norm_eps!r}")
        get_activation(self.hidden_act)  # raises ValueError naming hidden_act
        if self.pad_token_id is not None and not 0 <= self.pad_token_id < self.vocab_size:
            raise ValueError(
                f"config field pad_token_id must be in [0, {self.vocab_size}), got {self.pad_token_id}"
            )
        if self.max_input_length <= 0:
            raise ValueError(
                f"config field max_position_embeddings ({self.max_position_embeddings}) must exceed "
                f"the first position id ({self.position_offset})"
            )
        if sorted(self.id2label) != list(range(len(self.id2label))) or not self.id2label:
            raise ValueError(
                f"config field id2label must map the ids 0..n-1 to names, got ids {sorted(self.id2label)}"
            )
        if self.problem_type is not None and self.problem_type not in PROBLEM_TYPES:
            raise ValueError(
                f"config field problem_type must be one of {PROBLEM_TYPES} or null, got {self.problem_type!r}"
            )


def hf_labels(hf: dict[str, Any]) -> dict[str, Any]:
    """id2label (int keys), label2id and problem_type from a config.json dict.

    As transformers does: without id2label there are ``num_labels`` (default 2) labels
    named LABEL_i; label2id defaults to the inverse of id2label.
    """
    raw = hf.get("id2label")
    if raw:
        try:
            id2label = {int(k): str(v) for k, v in raw.items()}
        except (TypeError, ValueError) as e:
            raise ValueError(f"config field id2label must have integer keys, got {list(raw)}") from e
    else:
        n = hf.get("num_labels", 2)
        if not isinstance(n, int) or isinstance(n, bool) or n <= 0:
            raise ValueError(f"config field num_labels must be a positive integer, got {n!r}")
        id2label = {i: f"LABEL_{i}" for i in range(n)}
    raw_l2i = hf.get("label2id")
    if raw_l2i:
        try:
            label2id = {str(k): int(v) for k, v in raw_l2i.items()}
        except (TypeError, ValueError) as e:
            raise ValueError(f"config field label2id must have integer values, got {raw_l2i}") from e
    else:
        label2id = {name: i for i, name in id2label.items()}
    return {"id2label": id2label, "label2id": label2id, "problem_type": hf.get("problem_type")}


def reject_unsupported(hf: dict[str, Any], family: str) -> None:
    """Config options the native encoders do not implement, refused by name."""
    kind = hf.get("position_embedding_type", "absolute")
    if kind != "absolute":
        raise ValueError(
            f"{family} config field position_embedding_type={kind!r} is not supported (only 'absolute')"
        )
    for flag in ("is_decoder", "add_cross_attention"):
        if hf.get(flag):
            raise ValueError(
                f"{family} config field {flag}=true is not supported: tokenmill runs it as an encoder"
            )
