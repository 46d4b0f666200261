"""BERT: learned absolute positions, token type embeddings, post-LayerNorm encoder layers.

Modules keep transformers' names and nesting (``bert.encoder.layer.0.attention.self.query``)
so checkpoints load by name. RoBERTa (roberta.py) subclasses the embeddings and heads here;
the classes are written so a subclass swaps ``base_model_prefix`` and ``build_base``.

Forward contract (inputs right-padded, attention_mask (B, T) of 0/1):
  BertModel -> last_hidden_state (B, T, H); ForMaskedLM -> logits (B, T, V) (or (N, V) for
  ``select``); ForSequenceClassification -> (B, num_labels); ForTokenClassification ->
  (B, T, num_labels); ForQuestionAnswering -> (start_logits, end_logits), each (B, T).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from tokenmill.layers.activations import get_activation
from tokenmill.layers.encoder import bidirectional_attention, key_padding_mask
from tokenmill.models.encoder_config import EncoderConfig, hf_labels, reject_unsupported

#: checkpoint tensors with no parameter here that any BERT-style class may skip: buffers older
#: transformers saved (position_ids, token_type_ids) and the next-sentence head of pre-training
#: checkpoints (bert-base-uncased holds ``cls.seq_relationship``)
IGNORE_ON_LOAD = (
    r"(^|\.)embeddings\.position_ids$",
    r"(^|\.)embeddings\.token_type_ids$",
    r"^cls\.seq_relationship\.",
)


class BertEmbeddings(nn.Module):
    def __init__(self, cfg: EncoderConfig) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.position_embeddings = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)
        if cfg.type_vocab_size:
            self.token_type_embeddings = nn.Embedding(cfg.type_vocab_size, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.pad_token_id = cfg.pad_token_id
        self.max_input_length = cfg.max_input_length

    def position_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(B, T) -> position ids, broadcastable to (B, T)."""
        return torch.arange(input_ids.shape[1], device=input_ids.device)[None]  # (1, T)

    def forward(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        T = input_ids.shape[1]
        if T > self.max_input_length:
            raise ValueError(
                f"input of {T} tokens is longer than the model's maximum of {self.max_input_length} positions"
            )
        x = self.word_embeddings(input_ids)  # (B, T, C)
        if hasattr(self, "token_type_embeddings"):
            # Absent ids mean segment 0 everywhere: one row broadcast instead of a (B, T) lookup.
            if token_type_ids is None:
                x = x + self.token_type_embeddings.weight[0]
            else:
                x = x + self.token_type_embeddings(token_type_ids)
        x = x + self.position_embeddings(self.position_ids(input_ids))
        return self.LayerNorm(x)


#: checkpoint names of q/k/v -> (fused parameter, shard): one product instead of three,
#: which matters most for the few rows of a single sentence
BERT_PACKED_MODULES = {"query": ("qkv", 0), "key": ("qkv", 1), "value": ("qkv", 2)}


class BertSelfAttention(nn.Module):
    def __init__(self, cfg: EncoderConfig) -> None:
        super().__init__()
        self.num_heads = cfg.num_heads
        self.qkv = nn.Linear(cfg.hidden_size, 3 * cfg.hidden_size)
        self.qkv.shard_sizes = [cfg.hidden_size] * 3

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        return bidirectional_attention(q, k, v, self.num_heads, mask)


class BertSelfOutput(nn.Module):
    """Projection, residual add, then LayerNorm (post-LN); also the FFN's output (BertOutput)."""

    def __init__(self, cfg: EncoderConfig, n_in: int | None = None) -> None:
        super().__init__()
        self.dense = nn.Linear(n_in or cfg.hidden_size, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, h: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dense(h) + residual)


class BertAttention(nn.Module):
    def __init__(self, cfg: EncoderConfig) -> None:
        super().__init__()
        self.self = BertSelfAttention(cfg)
        self.output = BertSelfOutput(cfg)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        return self.output(self.self(x, mask), x)


class BertIntermediate(nn.Module):
    def __init__(self, cfg: EncoderConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.act = get_activation(cfg.hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.dense(x))


class BertLayer(nn.Module):
    def __init__(self, cfg: EncoderConfig) -> None:
        super().__init__()
        self.attention = BertAttention(cfg)
        self.intermediate = BertIntermediate(cfg)
        self.output = BertSelfOutput(cfg, n_in=cfg.intermediate_size)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        x = self.attention(x, mask)
        return self.output(self.intermediate(x), x)


class BertEncoder(nn.Module):
    def __init__(self, cfg: EncoderConfig) -> None:
        super().__init__()
        self.layer = nn.ModuleList([BertLayer(cfg) for _ in range(cfg.num_layers)])

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        for layer in self.layer:
            x = layer(x, mask)
        return x


class BertPooler(nn.Module):
    """tanh(dense(hidden of the first token)): the [CLS] summary sequence classification reads."""

    def __init__(self, cfg: EncoderConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.dense(hidden[:, 0]))  # (B, C)


class BertModel(nn.Module):
    """The bare encoder. ``pooler`` is built as transformers builds it (checkpoints of
    BertModel hold its weights) but ``forward`` never uses it."""

    embeddings_class: type[nn.Module] = BertEmbeddings
    ignore_on_load = IGNORE_ON_LOAD
    packed_modules = BERT_PACKED_MODULES
    #: submodules ``forward`` does not use: a loader may set them to None when a checkpoint
    #: (say a token classifier's, loaded for feature extraction) has no tensors for them
    optional_modules = ("pooler",)

    def __init__(self, config: EncoderConfig, add_pooling_layer: bool = True) -> None:
        super().__init__()
        self.config = config
        self.embeddings = self.embeddings_class(config)
        self.encoder = BertEncoder(config)
        self.pooler = BertPooler(config) if add_pooling_layer else None

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """input_ids, attention_mask, token_type_ids: (B, T). Returns last_hidden_state (B, T, C)."""
        x = self.embeddings(input_ids, token_type_ids)  # (B, T, C)
        return self.encoder(x, key_padding_mask(attention_mask))


class EncoderWithHead(nn.Module):
    """A base encoder under ``base_model_prefix`` (transformers' attribute name) plus a head."""

    base_model_prefix = "bert"
    ignore_on_load = IGNORE_ON_LOAD + (r"^\w+\.pooler\.",)
    packed_modules = BERT_PACKED_MODULES
    #: whether the head reads the pooler (only BERT's sequence classifier does)
    uses_pooler = False

    def __init__(self, config: EncoderConfig) -> None:
        super().__init__()
        self.config = config
        setattr(self, self.base_model_prefix, self.build_base(config))

    def build_base(self, config: EncoderConfig) -> nn.Module:
        return BertModel(config, add_pooling_layer=self.uses_pooler)

    @property
    def base_model(self) -> nn.Module:
        return getattr(self, self.base_model_prefix)

    def encode(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        token_type_ids: torch.Tensor | None,
    ) -> torch.Tensor:
        return self.base_model(input_ids, attention_mask, token_type_ids)  # (B, T, C)


def select_rows(hidden: torch.Tensor, select: torch.Tensor | None) -> torch.Tensor:
    """(B, T, C) -> the rows a head needs: all, a boolean (B, T) mask's, or flat indices into B*T."""
    if select is None:
        return hidden
    if select.dtype == torch.bool:
        return hidden[select]  # (N, C)
    return hidden.reshape(-1, hidden.shape[-1]).index_select(0, select)  # (N, C)


class BertPredictionHeadTransform(nn.Module):
    def __init__(self, cfg: EncoderConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.act = get_activation(cfg.hidden_act)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.act(self.dense(x)))


class BertLMPredictionHead(nn.Module):
    def __init__(self, cfg: EncoderConfig) -> None:
        super().__init__()
        self.transform = BertPredictionHeadTransform(cfg)
        self.decoder = nn.Linear(cfg.hidden_size, cfg.vocab_size)
        # transformers names the output bias twice (``bias`` and ``decoder.bias``): one tensor
        self.bias = self.decoder.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.transform(x))


class BertOnlyMLMHead(nn.Module):
    def __init__(self, cfg: EncoderConfig) -> None:
        super().__init__()
        self.predictions = BertLMPredictionHead(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.predictions(x)


class BertForMaskedLM(EncoderWithHead):
    def __init__(self, config: EncoderConfig) -> None:
        super().__init__(config)
        self.cls = BertOnlyMLMHead(config)
        if config.tie_word_embeddings:
            self.cls.predictions.decoder.weight = self.base_model.embeddings.word_embeddings.weight

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        select: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Returns logits (B, T, V); with ``select`` (a boolean (B, T) mask or flat indices
        into B*T) only those rows, (N, V): fill-mask needs the masked positions alone, and the
        vocabulary projection is the largest matmul."""
        hidden = select_rows(self.encode(input_ids, attention_mask, token_type_ids), select)
        return self.cls(hidden)


class BertForSequenceClassification(EncoderWithHead):
    ignore_on_load = IGNORE_ON_LOAD
    uses_pooler = True

    def __init__(self, config: EncoderConfig) -> None:
        super().__init__(config)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Returns logits (B, num_labels) from the pooled first token."""
        hidden = self.encode(input_ids, attention_mask, token_type_ids)
        return self.classifier(self.base_model.pooler(hidden))


class BertForTokenClassification(EncoderWithHead):
    def __init__(self, config: EncoderConfig) -> None:
        super().__init__(config)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Returns logits (B, T, num_labels)."""
        return self.classifier(self.encode(input_ids, attention_mask, token_type_ids))


class BertForQuestionAnswering(EncoderWithHead):
    def __init__(self, config: EncoderConfig) -> None:
        super().__init__(config)
        # a start and an end score per token (transformers sizes it by num_labels, always 2 here)
        self.qa_outputs = nn.Linear(config.hidden_size, 2)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (start_logits, end_logits), each (B, T)."""
        logits = self.qa_outputs(self.encode(input_ids, attention_mask, token_type_ids))  # (B, T, 2)
        start, end = logits.unbind(-1)
        return start.contiguous(), end.contiguous()


def bert_config_from_hf(hf: dict[str, Any]) -> EncoderConfig:
    reject_unsupported(hf, "BERT")
    return EncoderConfig(
        model_type=hf.get("model_type", "bert"),
        vocab_size=hf.get("vocab_size", 30522),
        hidden_size=hf.get("hidden_size", 768),
        num_layers=hf.get("num_hidden_layers", 12),
        num_heads=hf.get("num_attention_heads", 12),
        intermediate_size=hf.get("intermediate_size", 3072),
        max_position_embeddings=hf.get("max_position_embeddings", 512),
        type_vocab_size=hf.get("type_vocab_size", 2),
        layer_norm_eps=float(hf.get("layer_norm_eps", 1e-12)),
        hidden_act=hf.get("hidden_act", "gelu"),
        pad_token_id=hf.get("pad_token_id", 0),
        classifier_dropout=hf.get("classifier_dropout"),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", True)),
        **hf_labels(hf),
    )
