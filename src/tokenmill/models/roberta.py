"""RoBERTa and XLM-RoBERTa: BERT's encoder with fairseq-style positions and their own heads.

XLM-RoBERTa is the same architecture with a larger (sentencepiece) vocabulary, so one set of
classes runs both. diff vs BERT: position ids start at ``padding_idx + 1`` and count only
non-pad tokens; the MLM head is ``lm_head.dense/layer_norm/decoder`` with an exact GELU; the
sequence classifier is ``classifier.dense`` + tanh + ``classifier.out_proj`` on the <s> token
(no pooler).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tokenmill.models.bert import (
    BertEmbeddings,
    BertForQuestionAnswering,
    BertForTokenClassification,
    BertModel,
    EncoderWithHead,
    bert_config_from_hf,
    select_rows,
)
from tokenmill.models.encoder_config import EncoderConfig


class RobertaEmbeddings(BertEmbeddings):
    def position_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        # diff vs BERT: fairseq positions. Pad tokens sit at padding_idx; the others count
        # from padding_idx + 1 in order, skipping pads (transformers' create_position_ids_from_input_ids).
        keep = input_ids.ne(self.pad_token_id).long()  # (B, T)
        return torch.cumsum(keep, dim=1) * keep + self.pad_token_id  # (B, T)


class RobertaModel(BertModel):
    embeddings_class = RobertaEmbeddings


class _RobertaHead(EncoderWithHead):
    base_model_prefix = "roberta"

    def build_base(self, config: EncoderConfig) -> nn.Module:
        return RobertaModel(config, add_pooling_layer=False)


class RobertaLMHead(nn.Module):
    def __init__(self, cfg: EncoderConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.layer_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.decoder = nn.Linear(cfg.hidden_size, cfg.vocab_size)
        # transformers names the output bias twice (``bias`` and ``decoder.bias``): one tensor
        self.bias = self.decoder.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # the exact GELU whatever hidden_act says, as transformers' RobertaLMHead
        return self.decoder(self.layer_norm(F.gelu(self.dense(x))))


class RobertaForMaskedLM(_RobertaHead):
    def __init__(self, config: EncoderConfig) -> None:
        super().__init__(config)
        self.lm_head = RobertaLMHead(config)
        if config.tie_word_embeddings:
            self.lm_head.decoder.weight = self.base_model.embeddings.word_embeddings.weight

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        select: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Returns logits (B, T, V), or (N, V) for the rows ``select`` picks (see BertForMaskedLM)."""
        hidden = select_rows(self.encode(input_ids, attention_mask, token_type_ids), select)
        return self.lm_head(hidden)


class RobertaClassificationHead(nn.Module):
    def __init__(self, cfg: EncoderConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.out_proj = nn.Linear(cfg.hidden_size, cfg.num_labels)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.out_proj(torch.tanh(self.dense(hidden[:, 0])))  # <s> token, (B, num_labels)


class RobertaForSequenceClassification(_RobertaHead):
    def __init__(self, config: EncoderConfig) -> None:
        super().__init__(config)
        self.classifier = RobertaClassificationHead(config)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Returns logits (B, num_labels) from the <s> token."""
        return self.classifier(self.encode(input_ids, attention_mask, token_type_ids))


class RobertaForTokenClassification(_RobertaHead, BertForTokenClassification):
    pass


class RobertaForQuestionAnswering(_RobertaHead, BertForQuestionAnswering):
    pass


def roberta_config_from_hf(hf: dict[str, Any]) -> EncoderConfig:
    """RoBERTa and XLM-RoBERTa (model_type "roberta" / "xlm-roberta")."""
    pad = hf.get("pad_token_id", 1)
    if pad is None:
        raise ValueError("RoBERTa config field pad_token_id must be set: position ids count from it")
    cfg = bert_config_from_hf({"model_type": "roberta", **hf, "pad_token_id": pad})
    # diff vs BERT: the first pad_token_id + 1 rows of the position table are never a token's
    return replace(cfg, position_offset=pad + 1)
