"""BART and mBART: a transformer encoder-decoder with learned positions.

BART normalises after each residual add (post-LN) and after the embeddings
(``layernorm_embedding``); its position table starts at row 2 (fairseq's offset). mBART
is BART with pre-LN blocks and a final LayerNorm closing each stack. Marian (marian.py)
subclasses these modules and overrides only what differs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from tokenmill.layers.activations import get_activation
from tokenmill.layers.encoder_decoder import EncoderDecoderCache, attend, causal_mask, split_heads
from tokenmill.models.encoder_config import PROBLEM_TYPES, hf_labels


@dataclass
class BartConfig:
    """Hyper-parameters of BART, mBART and Marian, in tokenmill's names."""

    model_type: str  # "bart", "mbart" or "marian"
    vocab_size: int
    hidden_size: int  # d_model
    encoder_layers: int
    decoder_layers: int
    encoder_attention_heads: int
    decoder_attention_heads: int
    encoder_ffn_dim: int
    decoder_ffn_dim: int
    max_position_embeddings: int
    activation_function: str = "gelu"
    layer_norm_eps: float = 1e-5
    #: multiply token embeddings by sqrt(hidden_size)
    scale_embedding: bool = False
    #: mBART: LayerNorm before each sublayer, and a final LayerNorm per stack
    pre_norm: bool = False
    #: lm_head shares the embedding matrix
    tie_word_embeddings: bool = True
    #: Marian: a separate decoder embedding (and output) vocabulary when False
    share_encoder_decoder_embeddings: bool = True
    decoder_vocab_size: int | None = None
    pad_token_id: int | None = 1
    bos_token_id: int | None = 0
    eos_token_id: int | list[int] | None = 2
    decoder_start_token_id: int | None = 2
    forced_bos_token_id: int | None = None
    forced_eos_token_id: int | list[int] | None = None
    id2label: dict[int, str] = field(default_factory=lambda: {i: f"LABEL_{i}" for i in range(3)})
    label2id: dict[str, int] = field(default_factory=lambda: {f"LABEL_{i}": i for i in range(3)})
    problem_type: str | None = None

    @property
    def num_labels(self) -> int:
        return len(self.id2label)

    @property
    def eos_token_ids(self) -> list[int]:
        ids = self.eos_token_id
        if ids is None:
            return []
        return [int(i) for i in ids] if isinstance(ids, (list, tuple)) else [int(ids)]

    @property
    def target_vocab_size(self) -> int:
        """Rows of lm_head: Marian models with their own target vocabulary differ."""
        if self.share_encoder_decoder_embeddings or self.decoder_vocab_size is None:
            return self.vocab_size
        return self.decoder_vocab_size

    def __post_init__(self) -> None:
        for name in (
            "vocab_size",
            "hidden_size",
            "encoder_layers",
            "decoder_layers",
            "encoder_attention_heads",
            "decoder_attention_heads",
            "encoder_ffn_dim",
            "decoder_ffn_dim",
            "max_position_embeddings",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"config field {name} must be a positive integer, got {value!r}")
        for name in ("encoder_attention_heads", "decoder_attention_heads"):
            if self.hidden_size % getattr(self, name):
                raise ValueError(
                    f"config field d_model ({self.hidden_size}) must be a multiple of {name} "
                    f"({getattr(self, name)})"
                )
        get_activation(self.activation_function)  # raises ValueError naming the activation
        if self.decoder_start_token_id is None:
            raise ValueError(f"config field decoder_start_token_id must be set for {self.model_type}")
        if self.problem_type is not None and self.problem_type not in PROBLEM_TYPES:
            raise ValueError(
                f"config field problem_type must be one of {PROBLEM_TYPES} or null, got {self.problem_type!r}"
            )


def bart_config_from_hf(hf: dict[str, Any]) -> BartConfig:
    """A BartConfig from a config.json dict (model_type "bart" or "mbart")."""
    model_type = hf.get("model_type", "bart")
    if model_type not in ("bart", "mbart"):
        raise ValueError(f"bart_config_from_hf reads model_type 'bart' or 'mbart', got {model_type!r}")
    # Legacy keys (normalize_before, add_final_layer_norm) are ignored, as transformers ignores
    # them: the model type decides the block layout.
    return BartConfig(model_type=model_type, pre_norm=model_type == "mbart", **_shared_fields(hf))


def _shared_fields(hf: dict[str, Any]) -> dict[str, Any]:
    """The keys BART, mBART and Marian configs share."""
    start = hf.get("decoder_start_token_id")
    if start is None:
        start = hf.get("bos_token_id")  # transformers' fallback when a config names no start token
    return dict(
        vocab_size=int(hf["vocab_size"]),
        hidden_size=int(hf["d_model"]),
        encoder_layers=int(hf["encoder_layers"]),
        decoder_layers=int(hf["decoder_layers"]),
        encoder_attention_heads=int(hf["encoder_attention_heads"]),
        decoder_attention_heads=int(hf["decoder_attention_heads"]),
        encoder_ffn_dim=int(hf["encoder_ffn_dim"]),
        decoder_ffn_dim=int(hf["decoder_ffn_dim"]),
        max_position_embeddings=int(hf["max_position_embeddings"]),
        activation_function=str(hf.get("activation_function", "gelu")),
        scale_embedding=bool(hf.get("scale_embedding", False)),
        tie_word_embeddings=hf.get("tie_word_embeddings", True) is not False,
        pad_token_id=hf.get("pad_token_id"),
        bos_token_id=hf.get("bos_token_id"),
        eos_token_id=hf.get("eos_token_id"),
        decoder_start_token_id=start,
        forced_bos_token_id=hf.get("forced_bos_token_id"),
        forced_eos_token_id=hf.get("forced_eos_token_id"),
        **hf_labels({"num_labels": 3, **hf}),  # BART configs default to 3 labels (MNLI)
    )


class BartAttention(nn.Module):
    def __init__(self, hidden: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.k_proj = nn.Linear(hidden, hidden)
        self.v_proj = nn.Linear(hidden, hidden)
        self.q_proj = nn.Linear(hidden, hidden)
        self.out_proj = nn.Linear(hidden, hidden)

    def project_kv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return split_heads(self.k_proj(x), self.num_heads), split_heads(self.v_proj(x), self.num_heads)

    def forward(
        self, x: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None
    ) -> torch.Tensor:
        q = split_heads(self.q_proj(x), self.num_heads)  # (B, H, T, D)
        return self.out_proj(attend(q, k, v, mask=mask))


class BartEncoderLayer(nn.Module):
    def __init__(self, cfg: BartConfig) -> None:
        super().__init__()
        C = cfg.hidden_size
        self.pre_norm = cfg.pre_norm
        self.self_attn = BartAttention(C, cfg.encoder_attention_heads)
        self.self_attn_layer_norm = nn.LayerNorm(C, eps=cfg.layer_norm_eps)
        self.fc1 = nn.Linear(C, cfg.encoder_ffn_dim)
        self.fc2 = nn.Linear(cfg.encoder_ffn_dim, C)
        self.final_layer_norm = nn.LayerNorm(C, eps=cfg.layer_norm_eps)
        self.act = get_activation(cfg.activation_function)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        attn = self.self_attn
        if self.pre_norm:  # diff vs BART: mBART normalises before each sublayer
            h = self.self_attn_layer_norm(x)
            x = x + attn(h, *attn.project_kv(h), mask)
            return x + self.fc2(self.act(self.fc1(self.final_layer_norm(x))))
        x = self.self_attn_layer_norm(x + attn(x, *attn.project_kv(x), mask))
        return self.final_layer_norm(x + self.fc2(self.act(self.fc1(x))))


class BartDecoderLayer(nn.Module):
    def __init__(self, cfg: BartConfig) -> None:
        super().__init__()
        C = cfg.hidden_size
        self.pre_norm = cfg.pre_norm
        self.self_attn = BartAttention(C, cfg.decoder_attention_heads)
        self.self_attn_layer_norm = nn.LayerNorm(C, eps=cfg.layer_norm_eps)
        self.encoder_attn = BartAttention(C, cfg.decoder_attention_heads)
        self.encoder_attn_layer_norm = nn.LayerNorm(C, eps=cfg.layer_norm_eps)
        self.fc1 = nn.Linear(C, cfg.decoder_ffn_dim)
        self.fc2 = nn.Linear(cfg.decoder_ffn_dim, C)
        self.final_layer_norm = nn.LayerNorm(C, eps=cfg.layer_norm_eps)
        self.act = get_activation(cfg.activation_function)

    def forward(
        self,
        x: torch.Tensor,
        layer: int,
        cache: EncoderDecoderCache,
        self_mask: torch.Tensor | None,
        cross_mask: torch.Tensor | None,
    ) -> torch.Tensor:
        sa, ca = self.self_attn, self.encoder_attn
        ck, cv = cache.cross_k[layer], cache.cross_v[layer]
        if self.pre_norm:  # diff vs BART: mBART normalises before each sublayer
            h = self.self_attn_layer_norm(x)
            x = x + sa(h, *cache.append(layer, *sa.project_kv(h)), self_mask)
            x = x + ca(self.encoder_attn_layer_norm(x), ck, cv, cross_mask)
            return x + self.fc2(self.act(self.fc1(self.final_layer_norm(x))))
        x = self.self_attn_layer_norm(x + sa(x, *cache.append(layer, *sa.project_kv(x)), self_mask))
        x = self.encoder_attn_layer_norm(x + ca(x, ck, cv, cross_mask))
        return self.final_layer_norm(x + self.fc2(self.act(self.fc1(x))))


class BartLearnedPositionalEmbedding(nn.Embedding):
    """Learned positions; row ``position + 2`` holds a position (fairseq kept two rows unused)."""

    offset = 2

    def __init__(self, num_positions: int, dim: int) -> None:
        super().__init__(num_positions + self.offset, dim)

    def forward(self, start: int, length: int) -> torch.Tensor:  # type: ignore[override]
        """(length, C) embeddings of positions start .. start + length - 1."""
        pos = torch.arange(start + self.offset, start + length + self.offset, device=self.weight.device)
        return super().forward(pos)


class BartStack(nn.Module):
    """What the encoder and decoder stacks share: embeddings in, optional final norm out."""

    def __init__(self, cfg: BartConfig, embed_tokens: nn.Embedding, layers: list[nn.Module]) -> None:
        super().__init__()
        self.embed_tokens = embed_tokens
        self.embed_scale = math.sqrt(cfg.hidden_size) if cfg.scale_embedding else 1.0
        self.max_positions = cfg.max_position_embeddings
        self.embed_positions = self.build_positions(cfg)
        self.layers = nn.ModuleList(layers)
        self.build_norms(cfg)

    def build_positions(self, cfg: BartConfig) -> nn.Module:
        return BartLearnedPositionalEmbedding(cfg.max_position_embeddings, cfg.hidden_size)

    def build_norms(self, cfg: BartConfig) -> None:
        self.layernorm_embedding = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        if cfg.pre_norm:  # diff vs BART: mBART closes each stack with a LayerNorm
            self.layer_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def embed(self, input_ids: torch.Tensor, start: int) -> torch.Tensor:
        T = input_ids.shape[1]
        if start + T > self.max_positions:
            raise ValueError(
                f"sequence of {start + T} tokens is longer than the model's "
                f"max_position_embeddings ({self.max_positions})"
            )
        x = self.embed_tokens(input_ids) * self.embed_scale  # (B, T, C)
        x = x + self.embed_positions(start, T)
        return self.layernorm_embedding(x)

    def finish(self, x: torch.Tensor) -> torch.Tensor:
        norm = getattr(self, "layer_norm", None)
        return x if norm is None else norm(x)


class BartEncoder(BartStack):
    def __init__(self, cfg: BartConfig, embed_tokens: nn.Embedding) -> None:
        super().__init__(cfg, embed_tokens, [BartEncoderLayer(cfg) for _ in range(cfg.encoder_layers)])

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        x = self.embed(input_ids, 0)
        mask = None if attention_mask is None else attention_mask.bool()[:, None, None, :]
        for layer in self.layers:
            x = layer(x, mask)
        return self.finish(x)


class BartDecoder(BartStack):
    def __init__(self, cfg: BartConfig, embed_tokens: nn.Embedding) -> None:
        super().__init__(cfg, embed_tokens, [BartDecoderLayer(cfg) for _ in range(cfg.decoder_layers)])

    def forward(self, input_ids: torch.Tensor, cache: EncoderDecoderCache) -> torch.Tensor:
        """Run T new decoder tokens after the ``cache.length`` cached ones; returns (B, T, C)."""
        T, past = input_ids.shape[1], cache.length
        x = self.embed(input_ids, past)
        self_mask = causal_mask(T, past, x.device)
        cross_mask = cache.cross_mask()
        for i, layer in enumerate(self.layers):
            x = layer(x, i, cache, self_mask, cross_mask)
        cache.advance(T)
        return self.finish(x)


class BartModel(nn.Module):
    """Shared embeddings, encoder and decoder (``model.`` in every head class)."""

    def __init__(self, cfg: BartConfig) -> None:
        super().__init__()
        self.shared = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.encoder = BartEncoder(cfg, self.shared)
        self.decoder = BartDecoder(cfg, self.shared)


class BartSeq2Seq(nn.Module):
    """The encode / start_decoding / decode API every BART-family head shares."""

    config: BartConfig
    model: BartModel

    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """(B, S) ids, right-padded -> encoder hidden states (B, S, C)."""
        return self.model.encoder(input_ids, attention_mask)

    def start_decoding(
        self, encoder_hidden: torch.Tensor, attention_mask: torch.Tensor | None = None, capacity: int = 0
    ) -> EncoderDecoderCache:
        """Project the encoder output to every layer's cross-attention K/V, once per request."""
        ks, vs = [], []
        for layer in self.model.decoder.layers:
            k, v = layer.encoder_attn.project_kv(encoder_hidden)
            ks.append(k)
            vs.append(v)
        B, S = encoder_hidden.shape[:2]
        if attention_mask is None:
            mask = torch.ones(B, S, dtype=torch.bool, device=encoder_hidden.device)
        else:
            mask = attention_mask.bool()
        return EncoderDecoderCache(ks, vs, mask, capacity)

    def decode_hidden(self, decoder_input_ids: torch.Tensor, cache: EncoderDecoderCache) -> torch.Tensor:
        return self.model.decoder(decoder_input_ids, cache)


class BartForConditionalGeneration(BartSeq2Seq):
    """BART / mBART with the language-model head (head "seq2seq-lm").

    Decoding: ``cache = start_decoding(encode(ids, mask), mask)``, then ``decode(tokens, cache)``
    for each step; ``forward`` is the uncached reference pass.
    """

    def __init__(self, config: BartConfig) -> None:
        super().__init__()
        self.config = config
        self.model = self.build_model(config)
        V = config.target_vocab_size
        self.lm_head = nn.Linear(config.hidden_size, V, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.decoder.embed_tokens.weight
        # A saved buffer, loaded when the checkpoint has it (zeros otherwise, as transformers).
        self.register_buffer("final_logits_bias", torch.zeros(1, V))

    def build_model(self, config: BartConfig) -> BartModel:
        return BartModel(config)

    def decode(self, decoder_input_ids: torch.Tensor, cache: EncoderDecoderCache) -> torch.Tensor:
        """Append (B, T) decoder tokens to ``cache``; returns their logits (B, T, V)."""
        return self.lm_head(self.decode_hidden(decoder_input_ids, cache)) + self.final_logits_bias

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        decoder_input_ids: torch.Tensor,
    ) -> torch.Tensor:
        """Uncached teacher-forced pass: logits (B, T, V) for every decoder position."""
        cache = self.start_decoding(self.encode(input_ids, attention_mask), attention_mask)
        return self.decode(decoder_input_ids, cache)


class BartClassificationHead(nn.Module):
    def __init__(self, hidden: int, num_labels: int) -> None:
        super().__init__()
        self.dense = nn.Linear(hidden, hidden)
        self.out_proj = nn.Linear(hidden, num_labels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out_proj(torch.tanh(self.dense(x)))


class BartForSequenceClassification(BartSeq2Seq):
    """BART with a classification head on the decoder state of the last EOS token
    (head "sequence-classification"; zero-shot NLI models such as bart-large-mnli)."""

    def __init__(self, config: BartConfig) -> None:
        super().__init__()
        self.config = config
        self.model = BartModel(config)
        self.classification_head = BartClassificationHead(config.hidden_size, config.num_labels)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """(B, T) right-padded ids, each row holding at least one EOS -> logits (B, num_labels)."""
        eos = self.config.eos_token_ids
        if not eos:
            raise ValueError("BartForSequenceClassification needs config eos_token_id")
        is_eos = input_ids == eos[0]
        has_eos = is_eos.any(dim=1)
        if not bool(has_eos.all()):
            bad = (~has_eos).nonzero().flatten().tolist()
            raise ValueError(f"every input must contain the EOS token {eos[0]}; rows {bad} do not")
        # The decoder reads the input shifted right behind the start token, as in training.
        start = torch.full_like(input_ids[:, :1], self.config.decoder_start_token_id)
        decoder_ids = torch.cat([start, input_ids[:, :-1]], dim=1)
        if self.config.pad_token_id is not None:
            decoder_ids = decoder_ids.masked_fill(decoder_ids == -100, self.config.pad_token_id)
        cache = self.start_decoding(self.encode(input_ids, attention_mask), attention_mask)
        hidden = self.decode_hidden(decoder_ids, cache)  # (B, T, C)
        # Causal attention: the last EOS's state has read the whole input (pads come after it).
        T = input_ids.shape[1]
        last = torch.where(is_eos, torch.arange(T, device=input_ids.device), -1).amax(dim=1)  # (B,)
        sentence = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]  # (B, C)
        return self.classification_head(sentence)
