"""T5: original T5 (ReLU), T5 v1.1 and FLAN-T5 (gated GELU), and their encoders.

What sets T5 apart from the BART family: no position embeddings (a learned bias per
relative-distance bucket is added to the attention scores; only the first layer of each
stack holds the table, the other layers reuse its bias), RMS-style LayerNorm without bias,
pre-norm blocks, and no 1/sqrt(d) scaling of the attention scores (folded into the init).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from tokenmill.layers.activations import get_activation
from tokenmill.layers.encoder_decoder import EncoderDecoderCache, attend, causal_mask, split_heads
from tokenmill.layers.norms import RMSNorm
from tokenmill.models.encoder_config import PROBLEM_TYPES, hf_labels


@dataclass
class T5Config:
    """Hyper-parameters of a T5 model, in tokenmill's names (``from_hf`` knows T5's)."""

    vocab_size: int
    hidden_size: int  # d_model
    head_dim: int  # d_kv: T5 does not require num_heads * head_dim == hidden_size
    intermediate_size: int  # d_ff
    num_layers: int
    num_decoder_layers: int
    num_heads: int
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    layer_norm_eps: float = 1e-6
    #: "relu" (original T5) or e.g. "gelu_new" with ``gated`` (T5 v1.1, FLAN-T5: "gated-gelu")
    hidden_act: str = "relu"
    gated: bool = False
    #: lm_head shares the embedding matrix
    tie_word_embeddings: bool = True
    #: multiply the decoder output by hidden_size ** -0.5 before lm_head (original T5, tied)
    scale_decoder_outputs: bool = True
    model_type: str = "t5"
    #: T5 has no position table: inputs are limited by the tokenizer's model_max_length only
    max_position_embeddings: int | None = None
    pad_token_id: int | None = 0
    eos_token_id: int | list[int] | None = 1
    decoder_start_token_id: int | None = 0
    forced_bos_token_id: int | None = None
    forced_eos_token_id: int | list[int] | None = None
    id2label: dict[int, str] = field(default_factory=lambda: {0: "LABEL_0", 1: "LABEL_1"})
    label2id: dict[str, int] = field(default_factory=lambda: {"LABEL_0": 0, "LABEL_1": 1})
    problem_type: str | None = None

    @property
    def num_labels(self) -> int:
        return len(self.id2label)

    @property
    def eos_token_ids(self) -> list[int]:
        return _as_list(self.eos_token_id)

    def __post_init__(self) -> None:
        for name in (
            "vocab_size",
            "hidden_size",
            "head_dim",
            "intermediate_size",
            "num_layers",
            "num_decoder_layers",
            "num_heads",
            "relative_attention_num_buckets",
            "relative_attention_max_distance",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"config field {name} must be a positive integer, got {value!r}")
        if not self.layer_norm_eps > 0:
            raise ValueError(f"config field layer_norm_eps must be > 0, got {self.layer_norm_eps!r}")
        get_activation(self.hidden_act)  # raises ValueError naming hidden_act
        if self.decoder_start_token_id is None:
            raise ValueError("config field decoder_start_token_id must be set (T5 starts from pad_token_id)")
        if self.problem_type is not None and self.problem_type not in PROBLEM_TYPES:
            raise ValueError(
                f"config field problem_type must be one of {PROBLEM_TYPES} or null, got {self.problem_type!r}"
            )


def _as_list(ids: int | list[int] | None) -> list[int]:
    if ids is None:
        return []
    return [int(i) for i in ids] if isinstance(ids, (list, tuple)) else [int(ids)]


def t5_config_from_hf(hf: dict[str, Any]) -> T5Config:
    """A T5Config from a config.json dict (model_type "t5")."""
    proj = str(hf.get("feed_forward_proj", "relu"))
    parts = proj.split("-")
    if len(parts) > 2 or (len(parts) == 2 and parts[0] != "gated"):
        raise ValueError(f"config field feed_forward_proj must be 'ACT' or 'gated-ACT', got {proj!r}")
    gated = parts[0] == "gated"
    # As transformers: "gated-gelu" means the tanh approximation (T5 v1.1 was trained with it).
    act = "gelu_new" if proj == "gated-gelu" else parts[-1]
    tie = hf.get("tie_word_embeddings", True) is not False
    layers = int(hf.get("num_layers", 6))
    pad = hf.get("pad_token_id", 0)
    start = hf.get("decoder_start_token_id")
    return T5Config(
        vocab_size=int(hf["vocab_size"]),
        hidden_size=int(hf["d_model"]),
        head_dim=int(hf["d_kv"]),
        intermediate_size=int(hf["d_ff"]),
        num_layers=layers,
        num_decoder_layers=int(hf.get("num_decoder_layers") or layers),
        num_heads=int(hf["num_heads"]),
        relative_attention_num_buckets=int(hf.get("relative_attention_num_buckets", 32)),
        relative_attention_max_distance=int(hf.get("relative_attention_max_distance", 128)),
        layer_norm_eps=float(hf.get("layer_norm_epsilon", 1e-6)),
        hidden_act=act,
        gated=gated,
        tie_word_embeddings=tie,
        # transformers >= 5 writes this key (and always tie_word_embeddings=true); older
        # configs mean "scaled" exactly when tied (FLAN-T5: untied, unscaled).
        scale_decoder_outputs=bool(hf.get("scale_decoder_outputs", tie)),
        pad_token_id=pad,
        eos_token_id=hf.get("eos_token_id", 1),
        decoder_start_token_id=start if start is not None else pad,
        forced_bos_token_id=hf.get("forced_bos_token_id"),
        forced_eos_token_id=hf.get("forced_eos_token_id"),
        **hf_labels(hf),
    )


def relative_position_bucket(
    relative_position: torch.Tensor, bidirectional: bool, num_buckets: int, max_distance: int
) -> torch.Tensor:
    """T5's bucket of each (key - query) distance: exact for small ones, log-spaced up to
    ``max_distance``; in the decoder (not bidirectional) keys after the query share bucket 0."""
    buckets = torch.zeros_like(relative_position)
    if bidirectional:
        num_buckets //= 2
        buckets += (relative_position > 0).long() * num_buckets
        distance = relative_position.abs()
    else:
        distance = -torch.clamp(relative_position, max=0)
    max_exact = num_buckets // 2
    is_small = distance < max_exact
    # float32 log, then truncation, exactly as the reference computes it
    large = (
        max_exact
        + (
            torch.log(distance.float() / max_exact)
            / math.log(max_distance / max_exact)
            * (num_buckets - max_exact)
        ).long()
    )
    large = torch.clamp(large, max=num_buckets - 1)
    return buckets + torch.where(is_small, distance, large)


class T5Attention(nn.Module):
    def __init__(
        self, cfg: T5Config, has_relative_attention_bias: bool = False, causal: bool = False
    ) -> None:
        super().__init__()
        self.num_heads = cfg.num_heads
        self.causal = causal
        inner = cfg.num_heads * cfg.head_dim
        self.q = nn.Linear(cfg.hidden_size, inner, bias=False)
        self.k = nn.Linear(cfg.hidden_size, inner, bias=False)
        self.v = nn.Linear(cfg.hidden_size, inner, bias=False)
        self.o = nn.Linear(inner, cfg.hidden_size, bias=False)
        if has_relative_attention_bias:
            self.relative_attention_bias = nn.Embedding(cfg.relative_attention_num_buckets, cfg.num_heads)
        self.num_buckets = cfg.relative_attention_num_buckets
        self.max_distance = cfg.relative_attention_max_distance

    def position_bias(self, num_queries: int, num_keys: int, past: int, device: torch.device) -> torch.Tensor:
        """(1, H, T, S) bias for queries at positions past.. past+T-1 over keys 0..S-1."""
        context = torch.arange(past, past + num_queries, device=device).unsqueeze(1)
        memory = torch.arange(num_keys, device=device).unsqueeze(0)
        bucket = relative_position_bucket(
            memory - context, not self.causal, self.num_buckets, self.max_distance
        )
        values = self.relative_attention_bias(bucket)  # (T, S, H)
        return values.permute(2, 0, 1).unsqueeze(0)  # (1, H, T, S)

    def project_kv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return split_heads(self.k(x), self.num_heads), split_heads(self.v(x), self.num_heads)

    def forward(
        self,
        x: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        mask: torch.Tensor | None,
        bias: torch.Tensor | None,
    ) -> torch.Tensor:
        q = split_heads(self.q(x), self.num_heads)  # (B, H, T, D)
        # diff vs BART: no 1/sqrt(d) scaling; the relative position bias is added to the scores
        return self.o(attend(q, k, v, mask=mask, bias=bias, scale=1.0))


class T5LayerSelfAttention(nn.Module):
    def __init__(self, cfg: T5Config, has_relative_attention_bias: bool, causal: bool) -> None:
        super().__init__()
        self.SelfAttention = T5Attention(cfg, has_relative_attention_bias, causal)
        self.layer_norm = RMSNorm(cfg.hidden_size, cfg.layer_norm_eps)


class T5LayerCrossAttention(nn.Module):
    def __init__(self, cfg: T5Config) -> None:
        super().__init__()
        self.EncDecAttention = T5Attention(cfg)
        self.layer_norm = RMSNorm(cfg.hidden_size, cfg.layer_norm_eps)


class T5DenseActDense(nn.Module):
    def __init__(self, cfg: T5Config) -> None:
        super().__init__()
        self.wi = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.wo = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)
        self.act = get_activation(cfg.hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.wo(self.act(self.wi(x)))


class T5DenseGatedActDense(nn.Module):
    def __init__(self, cfg: T5Config) -> None:
        super().__init__()
        self.wi_0 = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.wi_1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.wo = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)
        self.act = get_activation(cfg.hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.wo(self.act(self.wi_0(x)) * self.wi_1(x))


class T5LayerFF(nn.Module):
    def __init__(self, cfg: T5Config) -> None:
        super().__init__()
        self.DenseReluDense = T5DenseGatedActDense(cfg) if cfg.gated else T5DenseActDense(cfg)
        self.layer_norm = RMSNorm(cfg.hidden_size, cfg.layer_norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.DenseReluDense(self.layer_norm(x))


class T5Block(nn.Module):
    """layer[0]: self-attention, layer[1]: cross-attention (decoder only), layer[-1]: MLP."""

    def __init__(self, cfg: T5Config, first: bool, decoder: bool) -> None:
        super().__init__()
        self.layer = nn.ModuleList([T5LayerSelfAttention(cfg, first, causal=decoder)])
        if decoder:
            self.layer.append(T5LayerCrossAttention(cfg))
        self.layer.append(T5LayerFF(cfg))


class T5Stack(nn.Module):
    def __init__(self, cfg: T5Config, embed_tokens: nn.Embedding, decoder: bool) -> None:
        super().__init__()
        self.embed_tokens = embed_tokens  # the shared table: one parameter under both names
        n = cfg.num_decoder_layers if decoder else cfg.num_layers
        self.block = nn.ModuleList([T5Block(cfg, i == 0, decoder) for i in range(n)])
        self.final_layer_norm = RMSNorm(cfg.hidden_size, cfg.layer_norm_eps)

    def attn(self, i: int) -> T5Attention:
        return self.block[i].layer[0].SelfAttention

    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        x = self.embed_tokens(input_ids)  # (B, S, C)
        S = x.shape[1]
        bias = self.attn(0).position_bias(S, S, 0, x.device)  # (1, H, S, S), shared by every layer
        mask = None if attention_mask is None else attention_mask.bool()[:, None, None, :]
        for block in self.block:
            sa = block.layer[0]
            h = sa.layer_norm(x)
            k, v = sa.SelfAttention.project_kv(h)
            x = x + sa.SelfAttention(h, k, v, mask, bias)
            x = block.layer[-1](x)
        return self.final_layer_norm(x)

    def decode(self, input_ids: torch.Tensor, cache: EncoderDecoderCache) -> torch.Tensor:
        """Run T new decoder tokens after the ``cache.length`` cached ones; returns (B, T, C)."""
        x = self.embed_tokens(input_ids)  # (B, T, C)
        T, past = x.shape[1], cache.length
        self_bias = self.attn(0).position_bias(T, past + T, past, x.device)  # (1, H, T, past + T)
        self_mask = causal_mask(T, past, x.device)
        cross_mask = cache.cross_mask()
        for i, block in enumerate(self.block):
            sa, ca = block.layer[0], block.layer[1]
            h = sa.layer_norm(x)
            k, v = cache.append(i, *sa.SelfAttention.project_kv(h))
            x = x + sa.SelfAttention(h, k, v, self_mask, self_bias)
            h = ca.layer_norm(x)
            # Cross-attention has no position bias in T5 (the reference adds zeros).
            x = x + ca.EncDecAttention(h, cache.cross_k[i], cache.cross_v[i], cross_mask, None)
            x = block.layer[-1](x)
        cache.advance(T)
        return self.final_layer_norm(x)


class T5EncoderModel(nn.Module):
    """The encoder stack alone (head "base"): last hidden state, as transformers' T5EncoderModel."""

    def __init__(self, config: T5Config) -> None:
        super().__init__()
        self.config = config
        self.shared = nn.Embedding(config.vocab_size, config.hidden_size)
        self.encoder = T5Stack(config, self.shared, decoder=False)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Returns (B, T, C); token_type_ids is accepted for the encoder contract and unused."""
        return self.encoder.encode(input_ids, attention_mask)


class T5ForConditionalGeneration(nn.Module):
    """T5 with its language-model head (head "seq2seq-lm").

    Decoding: ``cache = start_decoding(encode(ids, mask), mask)``, then ``decode(tokens, cache)``
    for each step; ``forward`` is the uncached reference pass.
    """

    def __init__(self, config: T5Config) -> None:
        super().__init__()
        self.config = config
        self.shared = nn.Embedding(config.vocab_size, config.hidden_size)
        self.encoder = T5Stack(config, self.shared, decoder=False)
        self.decoder = T5Stack(config, self.shared, decoder=True)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.shared.weight

    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """(B, S) ids, right-padded -> encoder hidden states (B, S, C)."""
        return self.encoder.encode(input_ids, attention_mask)

    def start_decoding(
        self, encoder_hidden: torch.Tensor, attention_mask: torch.Tensor | None = None, capacity: int = 0
    ) -> EncoderDecoderCache:
        """Project the encoder output to every layer's cross-attention K/V, once per request."""
        ks, vs = [], []
        for block in self.decoder.block:
            k, v = block.layer[1].EncDecAttention.project_kv(encoder_hidden)
            ks.append(k)
            vs.append(v)
        B, S = encoder_hidden.shape[:2]
        if attention_mask is None:
            mask = torch.ones(B, S, dtype=torch.bool, device=encoder_hidden.device)
        else:
            mask = attention_mask.bool()
        return EncoderDecoderCache(ks, vs, mask, capacity)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.config.scale_decoder_outputs:
            # Tied T5 rescales before the shared matrix projects back to the vocabulary.
            hidden = hidden * (self.config.hidden_size**-0.5)
        return self.lm_head(hidden)

    def decode(self, decoder_input_ids: torch.Tensor, cache: EncoderDecoderCache) -> torch.Tensor:
        """Append (B, T) decoder tokens to ``cache``; returns their logits (B, T, V)."""
        return self.logits(self.decoder.decode(decoder_input_ids, cache))

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        decoder_input_ids: torch.Tensor,
    ) -> torch.Tensor:
        """Uncached teacher-forced pass: logits (B, T, V) for every decoder position."""
        cache = self.start_decoding(self.encode(input_ids, attention_mask), attention_mask)
        return self.decode(decoder_input_ids, cache)
