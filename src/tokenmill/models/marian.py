"""Marian (OPUS-MT translation models): BART's post-LN layers with sinusoidal positions.

diff vs BART: positions are a fixed sinusoid table (not in the checkpoint; computed here
exactly as transformers computes it), no LayerNorm after the embeddings, the decoder starts
from the pad token, and the target vocabulary may be separate from the source one.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from tokenmill.models.bart import (
    BartConfig,
    BartDecoder,
    BartEncoder,
    BartForConditionalGeneration,
    BartModel,
    _shared_fields,
)


def marian_config_from_hf(hf: dict[str, Any]) -> BartConfig:
    """A BartConfig from a Marian config.json dict (model_type "marian")."""
    fields = _shared_fields(hf)
    if hf.get("decoder_start_token_id") is None:
        fields["decoder_start_token_id"] = hf.get("pad_token_id")  # Marian decodes from <pad>
    return BartConfig(
        model_type="marian",
        share_encoder_decoder_embeddings=hf.get("share_encoder_decoder_embeddings", True) is not False,
        decoder_vocab_size=hf.get("decoder_vocab_size") or None,
        **fields,
    )


def sinusoidal_table(num_positions: int, dim: int) -> torch.Tensor:
    """(num_positions, dim) float32: sines in the first half of each row, cosines in the second.

    Computed in float64 and rounded once, as transformers does with numpy.
    """
    pos = torch.arange(num_positions, dtype=torch.float64).unsqueeze(1)
    j = torch.arange(dim, dtype=torch.float64)
    angle = pos / torch.pow(
        torch.tensor(10000.0, dtype=torch.float64), 2 * torch.div(j, 2, rounding_mode="floor") / dim
    )
    half = dim // 2 if dim % 2 == 0 else dim // 2 + 1
    out = torch.empty(num_positions, dim, dtype=torch.float64)
    out[:, :half] = torch.sin(angle[:, 0::2])
    out[:, half:] = torch.cos(angle[:, 1::2])
    return out.float()


class MarianSinusoidalPositionalEmbedding(nn.Module):
    """A static position table; a non-persistent buffer, so it is neither saved nor loaded."""

    def __init__(self, num_positions: int, dim: int) -> None:
        super().__init__()
        self.register_buffer("weight", sinusoidal_table(num_positions, dim), persistent=False)

    def forward(self, start: int, length: int) -> torch.Tensor:
        """(length, C) embeddings of positions start .. start + length - 1 (no offset)."""
        return self.weight[start : start + length]


class MarianStackMixin:
    # diff vs BART: a fixed sinusoid table, and no LayerNorm after the embeddings
    def build_positions(self, cfg: BartConfig) -> nn.Module:
        return MarianSinusoidalPositionalEmbedding(cfg.max_position_embeddings, cfg.hidden_size)

    def build_norms(self, cfg: BartConfig) -> None:
        self.layernorm_embedding = nn.Identity()


class MarianEncoder(MarianStackMixin, BartEncoder):
    pass


class MarianDecoder(MarianStackMixin, BartDecoder):
    pass


class MarianModel(BartModel):
    def __init__(self, cfg: BartConfig) -> None:
        nn.Module.__init__(self)
        if cfg.share_encoder_decoder_embeddings:
            self.shared = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
            self.encoder = MarianEncoder(cfg, self.shared)
            self.decoder = MarianDecoder(cfg, self.shared)
        else:
            # diff vs BART: separate source and target vocabularies, and no "shared" table
            self.encoder = MarianEncoder(cfg, nn.Embedding(cfg.vocab_size, cfg.hidden_size))
            self.decoder = MarianDecoder(cfg, nn.Embedding(cfg.target_vocab_size, cfg.hidden_size))


class MarianMTModel(BartForConditionalGeneration):
    """Marian with its language-model head (head "seq2seq-lm"); lm_head shares the decoder's
    embedding matrix, final_logits_bias is loaded from the checkpoint."""

    def build_model(self, config: BartConfig) -> BartModel:
        return MarianModel(config)
