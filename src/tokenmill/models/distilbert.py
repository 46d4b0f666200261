"""DistilBERT: BERT with half the layers, no token type embeddings and its own module names.

diff vs BERT: no segment embeddings (``token_type_ids`` is accepted and ignored); layers name
their parts ``attention.q_lin``/``sa_layer_norm``/``ffn.lin1``/``output_layer_norm``; every
LayerNorm uses eps 1e-12; no pooler: sequence classification reads the first token through
``pre_classifier`` and a ReLU; the MLM head is ``vocab_transform``/``vocab_layer_norm``/
``vocab_projector`` at the top level.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tokenmill.layers.activations import get_activation
from tokenmill.layers.encoder import bidirectional_attention, key_padding_mask
from tokenmill.models.bert import (
    BertEmbeddings,
    BertForQuestionAnswering,
    BertForTokenClassification,
    EncoderWithHead,
    select_rows,
)
from tokenmill.models.encoder_config import EncoderConfig, hf_labels

#: buffers older transformers saved with DistilBERT checkpoints
IGNORE_ON_LOAD = (r"(^|\.)embeddings\.position_ids$",)


class DistilBertSelfAttention(nn.Module):
    def __init__(self, cfg: EncoderConfig) -> None:
        super().__init__()
        self.num_heads = cfg.num_heads
        self.qkv_lin = nn.Linear(cfg.hidden_size, 3 * cfg.hidden_size)  # q_lin, k_lin, v_lin fused
        self.qkv_lin.shard_sizes = [cfg.hidden_size] * 3
        self.out_lin = nn.Linear(cfg.hidden_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        q, k, v = self.qkv_lin(x).chunk(3, dim=-1)
        return self.out_lin(bidirectional_attention(q, k, v, self.num_heads, mask))


class FFN(nn.Module):
    def __init__(self, cfg: EncoderConfig) -> None:
        super().__init__()
        self.lin1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.lin2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)
        self.act = get_activation(cfg.hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin2(self.act(self.lin1(x)))


class TransformerBlock(nn.Module):
    def __init__(self, cfg: EncoderConfig) -> None:
        super().__init__()
        self.attention = DistilBertSelfAttention(cfg)
        self.sa_layer_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.ffn = FFN(cfg)
        self.output_layer_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        x = self.sa_layer_norm(self.attention(x, mask) + x)
        return self.output_layer_norm(self.ffn(x) + x)


class Transformer(nn.Module):
    def __init__(self, cfg: EncoderConfig) -> None:
        super().__init__()
        self.layer = nn.ModuleList([TransformerBlock(cfg) for _ in range(cfg.num_layers)])

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        for layer in self.layer:
            x = layer(x, mask)
        return x


DISTILBERT_PACKED_MODULES = {"q_lin": ("qkv_lin", 0), "k_lin": ("qkv_lin", 1), "v_lin": ("qkv_lin", 2)}


class DistilBertModel(nn.Module):
    ignore_on_load = IGNORE_ON_LOAD
    packed_modules = DISTILBERT_PACKED_MODULES
    optional_modules: tuple[str, ...] = ()

    def __init__(self, config: EncoderConfig) -> None:
        super().__init__()
        self.config = config
        # diff vs BERT: config.type_vocab_size is 0, so no token_type_embeddings
        self.embeddings = BertEmbeddings(config)
        self.transformer = Transformer(config)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """input_ids, attention_mask: (B, T); token_type_ids is ignored (DistilBERT has no
        segments). Returns last_hidden_state (B, T, C)."""
        x = self.embeddings(input_ids)  # (B, T, C)
        return self.transformer(x, key_padding_mask(attention_mask))


class _DistilBertHead(EncoderWithHead):
    base_model_prefix = "distilbert"
    ignore_on_load = IGNORE_ON_LOAD
    packed_modules = DISTILBERT_PACKED_MODULES

    def build_base(self, config: EncoderConfig) -> nn.Module:
        return DistilBertModel(config)


class DistilBertForMaskedLM(_DistilBertHead):
    def __init__(self, config: EncoderConfig) -> None:
        super().__init__(config)
        self.vocab_transform = nn.Linear(config.hidden_size, config.hidden_size)
        self.act = get_activation(config.hidden_act)
        self.vocab_layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.vocab_projector = nn.Linear(config.hidden_size, config.vocab_size)
        if config.tie_word_embeddings:
            self.vocab_projector.weight = self.base_model.embeddings.word_embeddings.weight

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        select: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Returns logits (B, T, V), or (N, V) for the rows ``select`` picks (see BertForMaskedLM)."""
        hidden = select_rows(self.encode(input_ids, attention_mask, None), select)
        return self.vocab_projector(self.vocab_layer_norm(self.act(self.vocab_transform(hidden))))


class DistilBertForSequenceClassification(_DistilBertHead):
    def __init__(self, config: EncoderConfig) -> None:
        super().__init__(config)
        self.pre_classifier = nn.Linear(config.hidden_size, config.hidden_size)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Returns logits (B, num_labels) from the first token."""
        first = self.encode(input_ids, attention_mask, None)[:, 0]  # (B, C)
        return self.classifier(F.relu(self.pre_classifier(first)))


class DistilBertForTokenClassification(_DistilBertHead, BertForTokenClassification):
    pass


class DistilBertForQuestionAnswering(_DistilBertHead, BertForQuestionAnswering):
    pass


def distilbert_config_from_hf(hf: dict[str, Any]) -> EncoderConfig:
    return EncoderConfig(
        model_type="distilbert",
        vocab_size=hf.get("vocab_size", 30522),
        hidden_size=hf.get("dim", 768),
        num_layers=hf.get("n_layers", 6),
        num_heads=hf.get("n_heads", 12),
        intermediate_size=hf.get("hidden_dim", 3072),
        max_position_embeddings=hf.get("max_position_embeddings", 512),
        # diff vs BERT: no segment embeddings, and the LayerNorm eps is fixed in the architecture
        type_vocab_size=0,
        layer_norm_eps=1e-12,
        hidden_act=hf.get("activation", "gelu"),
        pad_token_id=hf.get("pad_token_id", 0),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", True)),
        **hf_labels(hf),
    )
