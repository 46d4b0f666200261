"""Whisper: a speech encoder-decoder (OpenAI's Whisper, transformers' ``WhisperForConditionalGeneration``).

The encoder reads a (mel bins, 3000 frames) log-Mel spectrogram: two 1-D convolutions
(the second halves the frame rate to 1500 positions), fixed sinusoidal positions, then
pre-LN transformer blocks. The decoder is a pre-LN text decoder with learned positions
and cross-attention to the encoder. The blocks are mBART's (models/bart.py, pre_norm) with
one difference: attention has no bias on its key projection. The output projection
``proj_out`` is the decoder's token embedding.

Decoding: ``cache = start_decoding(encode(features))``, then ``decode(tokens, cache)``
per step, where the first call feeds the whole decoder prompt
(``<|startoftranscript|><|en|><|transcribe|><|notimestamps|>``, ...).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from tokenmill.layers.activations import get_activation
from tokenmill.layers.encoder_decoder import EncoderDecoderCache, causal_mask
from tokenmill.layers.half_linear import MAX_ROWS
from tokenmill.models.bart import BartAttention, BartDecoderLayer, BartEncoderLayer, BartSeq2Seq
from tokenmill.models.encoder_config import hf_labels
from tokenmill.models.whisper_half import HalfDecoder, decode_step, weights_key


@dataclass
class WhisperConfig:
    """Hyper-parameters of a Whisper checkpoint, in tokenmill's names."""

    vocab_size: int
    num_mel_bins: int
    hidden_size: int  # d_model
    encoder_layers: int
    decoder_layers: int
    encoder_attention_heads: int
    decoder_attention_heads: int
    encoder_ffn_dim: int
    decoder_ffn_dim: int
    #: encoder positions after the stride-2 convolution: 1500 for 30-second windows
    max_source_positions: int = 1500
    #: decoder positions: the prompt plus generated tokens fit in this many
    max_target_positions: int = 448
    activation_function: str = "gelu"
    layer_norm_eps: float = 1e-5
    model_type: str = "whisper"
    pad_token_id: int | None = 50257
    bos_token_id: int | None = 50257
    eos_token_id: int | list[int] | None = 50257
    decoder_start_token_id: int | None = 50258
    #: token ids never generated / not generated as the first token (generation defaults)
    suppress_tokens: list[int] | None = None
    begin_suppress_tokens: list[int] | None = None
    tie_word_embeddings: bool = True
    forced_bos_token_id: int | None = None
    forced_eos_token_id: int | list[int] | None = None
    id2label: dict[int, str] = field(default_factory=lambda: {0: "LABEL_0", 1: "LABEL_1"})
    label2id: dict[str, int] = field(default_factory=lambda: {"LABEL_0": 0, "LABEL_1": 1})
    problem_type: str | None = None
    #: the encoder and decoder blocks are mBART's pre-LN blocks (read by models/bart.py)
    pre_norm: bool = True

    def __post_init__(self) -> None:
        for name in (
            "vocab_size",
            "num_mel_bins",
            "hidden_size",
            "encoder_layers",
            "decoder_layers",
            "encoder_attention_heads",
            "decoder_attention_heads",
            "encoder_ffn_dim",
            "decoder_ffn_dim",
            "max_source_positions",
            "max_target_positions",
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
            raise ValueError("config field decoder_start_token_id must be set for whisper")
        if not self.pre_norm:
            raise ValueError("config field pre_norm must be True: Whisper's blocks are pre-LN")

    @property
    def max_position_embeddings(self) -> int:
        """The decoder's length limit, under the name every seq2seq config shares."""
        return self.max_target_positions

    @property
    def num_frames(self) -> int:
        """Input frames the encoder reads (3000): two per position, for the stride-2 convolution."""
        return 2 * self.max_source_positions

    @property
    def num_labels(self) -> int:
        return len(self.id2label)

    @property
    def eos_token_ids(self) -> list[int]:
        ids = self.eos_token_id
        if ids is None:
            return []
        return [int(i) for i in ids] if isinstance(ids, (list, tuple)) else [int(ids)]


def whisper_config_from_hf(hf: dict[str, Any]) -> WhisperConfig:
    """A WhisperConfig from a config.json dict (model_type "whisper")."""
    model_type = hf.get("model_type", "whisper")
    if model_type != "whisper":
        raise ValueError(f"whisper_config_from_hf reads model_type 'whisper', got {model_type!r}")
    missing = [k for k in ("vocab_size", "d_model", "encoder_layers", "decoder_layers") if k not in hf]
    if missing:
        raise ValueError(f"whisper config is missing {', '.join(missing)}")
    start = hf.get("decoder_start_token_id")
    if start is None:
        start = hf.get("bos_token_id")
    d_model = int(hf["d_model"])
    # transformers ignores scale_embedding in Whisper (the scale is computed, never applied), so we do too.
    return WhisperConfig(
        vocab_size=int(hf["vocab_size"]),
        num_mel_bins=int(hf.get("num_mel_bins", 80)),
        hidden_size=d_model,
        encoder_layers=int(hf["encoder_layers"]),
        decoder_layers=int(hf["decoder_layers"]),
        encoder_attention_heads=int(hf.get("encoder_attention_heads", 4)),
        decoder_attention_heads=int(hf.get("decoder_attention_heads", 4)),
        encoder_ffn_dim=int(hf.get("encoder_ffn_dim", 4 * d_model)),
        decoder_ffn_dim=int(hf.get("decoder_ffn_dim", 4 * d_model)),
        max_source_positions=int(hf.get("max_source_positions", 1500)),
        max_target_positions=int(hf.get("max_target_positions", 448)),
        activation_function=str(hf.get("activation_function", "gelu")),
        pad_token_id=hf.get("pad_token_id"),
        bos_token_id=hf.get("bos_token_id"),
        eos_token_id=hf.get("eos_token_id"),
        decoder_start_token_id=start,
        suppress_tokens=hf.get("suppress_tokens"),
        begin_suppress_tokens=hf.get("begin_suppress_tokens"),
        tie_word_embeddings=hf.get("tie_word_embeddings", True) is not False,
        forced_bos_token_id=hf.get("forced_bos_token_id"),
        forced_eos_token_id=hf.get("forced_eos_token_id"),
        **hf_labels({"num_labels": 2, **hf}),
    )


class WhisperAttention(BartAttention):
    def __init__(self, hidden: int, num_heads: int) -> None:
        super().__init__(hidden, num_heads)
        # diff vs BART: no key bias (it would add the same q.b to every score of a query,
        # which softmax ignores)
        self.k_proj = nn.Linear(hidden, hidden, bias=False)


class WhisperEncoderLayer(BartEncoderLayer):
    """mBART's pre-LN encoder block with Whisper's attention."""

    def __init__(self, cfg: WhisperConfig) -> None:
        super().__init__(cfg)  # type: ignore[arg-type]
        self.self_attn = WhisperAttention(cfg.hidden_size, cfg.encoder_attention_heads)


class WhisperDecoderLayer(BartDecoderLayer):
    """mBART's pre-LN decoder block with Whisper's attention."""

    def __init__(self, cfg: WhisperConfig) -> None:
        super().__init__(cfg)  # type: ignore[arg-type]
        self.self_attn = WhisperAttention(cfg.hidden_size, cfg.decoder_attention_heads)
        self.encoder_attn = WhisperAttention(cfg.hidden_size, cfg.decoder_attention_heads)


class WhisperEncoder(nn.Module):
    def __init__(self, cfg: WhisperConfig) -> None:
        super().__init__()
        C = cfg.hidden_size
        self.num_mel_bins = cfg.num_mel_bins
        self.num_frames = cfg.num_frames
        self.conv1 = nn.Conv1d(cfg.num_mel_bins, C, kernel_size=3, padding=1)
        self.conv2 = nn.Conv1d(C, C, kernel_size=3, stride=2, padding=1)
        # Sinusoidal in the original; checkpoints store the table, so it loads like a weight.
        self.embed_positions = nn.Embedding(cfg.max_source_positions, C)
        self.layers = nn.ModuleList(WhisperEncoderLayer(cfg) for _ in range(cfg.encoder_layers))
        self.layer_norm = nn.LayerNorm(C, eps=cfg.layer_norm_eps)

    def forward(self, input_features: torch.Tensor) -> torch.Tensor:
        """(B, num_mel_bins, 3000) log-Mel features -> (B, 1500, C)."""
        if input_features.dim() != 3 or tuple(input_features.shape[1:]) != (
            self.num_mel_bins,
            self.num_frames,
        ):
            raise ValueError(
                f"Whisper's encoder reads features of shape (batch, {self.num_mel_bins}, {self.num_frames}) "
                f"(one 30-second window, padded with silence), got {tuple(input_features.shape)}"
            )
        x = input_features.to(self.conv1.weight.dtype)
        # exact GELU after the convolutions whatever activation_function says, as transformers
        x = nn.functional.gelu(self.conv1(x))  # (B, C, 3000)
        x = nn.functional.gelu(self.conv2(x))  # (B, C, 1500)
        x = x.transpose(1, 2) + self.embed_positions.weight  # (B, 1500, C)
        for layer in self.layers:
            x = layer(x, None)
            if x.dtype == torch.float16:
                # as transformers: keep fp16 activations finite
                limit = torch.finfo(x.dtype).max - 1000
                x = x.clamp(min=-limit, max=limit)
        return self.layer_norm(x)


class WhisperDecoder(nn.Module):
    def __init__(self, cfg: WhisperConfig) -> None:
        super().__init__()
        C = cfg.hidden_size
        self.max_positions = cfg.max_target_positions
        self.embed_tokens = nn.Embedding(cfg.vocab_size, C)
        self.embed_positions = nn.Embedding(cfg.max_target_positions, C)
        self.layers = nn.ModuleList(WhisperDecoderLayer(cfg) for _ in range(cfg.decoder_layers))
        self.layer_norm = nn.LayerNorm(C, eps=cfg.layer_norm_eps)

    def check_length(self, length: int) -> None:
        if length > self.max_positions:
            raise ValueError(
                f"decoder sequence of {length} tokens is longer than Whisper's "
                f"max_target_positions ({self.max_positions})"
            )

    def forward(self, input_ids: torch.Tensor, cache: EncoderDecoderCache) -> torch.Tensor:
        """Run T new decoder tokens after the ``cache.length`` cached ones; returns (B, T, C)."""
        T, past = input_ids.shape[1], cache.length
        self.check_length(past + T)
        # diff vs BART: no embedding scale and no embedding LayerNorm
        x = self.embed_tokens(input_ids) + self.embed_positions.weight[past : past + T]  # (B, T, C)
        self_mask = causal_mask(T, past, x.device)
        cross_mask = cache.cross_mask()
        for i, layer in enumerate(self.layers):
            x = layer(x, i, cache, self_mask, cross_mask)
        cache.advance(T)
        return self.layer_norm(x)


class WhisperModel(nn.Module):
    """The encoder and decoder (``model.`` in the head class)."""

    def __init__(self, cfg: WhisperConfig) -> None:
        super().__init__()
        self.encoder = WhisperEncoder(cfg)
        self.decoder = WhisperDecoder(cfg)


class WhisperForConditionalGeneration(BartSeq2Seq):
    """Whisper with its language-model head (head "speech-seq2seq").

    ``encode(features)`` -> (B, 1500, C); ``start_decoding(hidden, capacity=N)`` projects
    the cross-attention K/V once; ``decode(tokens, cache)`` -> logits (B, T, V) and grows
    the cache; ``cache.select_rows(rows)`` drops finished rows or follows beams.

    On CPU, when every decoder weight is an exact float16 value (the released checkpoints
    are float16), decode steps of up to ``MAX_ROWS`` rows read float16 copies of the
    weights and compute in float32 (models/whisper_half.py): the same logits up to
    summation order, about twice as fast. ``use_half_weights = False`` turns that off.
    """

    def __init__(self, config: WhisperConfig) -> None:
        super().__init__()
        self.config = config  # type: ignore[assignment]
        self.model = WhisperModel(config)  # type: ignore[assignment]
        self.proj_out = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.proj_out.weight = self.model.decoder.embed_tokens.weight
        self.use_half_weights = True
        # (weights_key, HalfDecoder or None): rebuilt when a decoder weight changes
        self._half: tuple[tuple, HalfDecoder | None] | None = None

    @property
    def lm_head(self) -> nn.Linear:
        """``proj_out`` under the name tokenmill's seq2seq generation reads."""
        return self.proj_out

    def encode(
        self, input_features: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:  # type: ignore[override]
        """(B, num_mel_bins, 3000) features -> encoder states (B, 1500, C).

        ``attention_mask`` is accepted and ignored, as transformers does: every window is
        a full 30 seconds, silence included.
        """
        return self.model.encoder(input_features)

    def start_decoding(
        self, encoder_hidden: torch.Tensor, attention_mask: torch.Tensor | None = None, capacity: int = 0
    ) -> EncoderDecoderCache:
        """Project the encoder output to every layer's cross-attention K/V, once per window.

        The K/V are stored contiguous (B, H, 1500, D): each decode step reads all of them,
        and attention over a strided copy runs at half the speed.
        """
        ks, vs = [], []
        for layer in self.model.decoder.layers:
            k, v = layer.encoder_attn.project_kv(encoder_hidden)
            ks.append(k.contiguous())
            vs.append(v.contiguous())
        B, S = encoder_hidden.shape[:2]
        if attention_mask is None:
            mask = torch.ones(B, S, dtype=torch.bool, device=encoder_hidden.device)
        else:
            mask = attention_mask.bool()
        if not torch.is_grad_enabled():
            self.half_decoder()  # (re)builds the float16 copies when the weights changed
        return EncoderDecoderCache(ks, vs, mask, capacity)

    def half_decoder(self) -> HalfDecoder | None:
        """The float16 weight copies the fast decode step reads, or None where it cannot
        run (weights not exact float16 values, no kernel on this CPU, not on CPU)."""
        if not self.use_half_weights:
            return None
        key = weights_key(self)
        if self._half is None or self._half[0] != key:
            self._half = (key, HalfDecoder.build(self))
        return self._half[1]

    def decode(self, decoder_input_ids: torch.Tensor, cache: EncoderDecoderCache) -> torch.Tensor:
        """Append (B, T) decoder tokens to ``cache``; returns their logits (B, T, V)."""
        if (
            decoder_input_ids.numel() <= MAX_ROWS
            and decoder_input_ids.device.type == "cpu"
            and not torch.is_grad_enabled()
            and cache.cross_k[0].dtype == torch.float32
        ):
            # checked against the weights by start_decoding, once per window rather than per step
            half = self._half[1] if self._half is not None and self.use_half_weights else None
            if half is not None:
                return decode_step(self, half, decoder_input_ids, cache)
        return self.proj_out(self.decode_hidden(decoder_input_ids, cache))

    def forward(self, input_features: torch.Tensor, decoder_input_ids: torch.Tensor) -> torch.Tensor:
        """Uncached teacher-forced pass: logits (B, T, V) for every decoder position."""
        cache = self.start_decoding(self.encode(input_features))
        return self.decode(decoder_input_ids, cache)


def greedy_decode(
    model: WhisperForConditionalGeneration,
    input_features: torch.Tensor,
    prompt_ids: list[int] | list[list[int]],
    *,
    max_new_tokens: int,
    eos_token_id: int | None = None,
    suppress_tokens: list[int] | None = None,
    begin_suppress_tokens: list[int] | None = None,
) -> list[list[int]]:
    """Greedy transcription of each window: the generated ids after the prompt, EOS kept.

    A reference loop for tests and simple callers (the pipeline adds timestamps, beams,
    fallbacks).

    Args:
        input_features: (B, num_mel_bins, 3000).
        prompt_ids: the decoder prompt, one for all rows or one per row (equal lengths).
        eos_token_id: stops a row (the config's EOS when None).
        suppress_tokens: never generated; begin_suppress_tokens: not as the first token.
    """
    cfg = model.config
    B = input_features.shape[0]
    if prompt_ids and all(isinstance(t, int) for t in prompt_ids):
        rows = [list(prompt_ids)] * B  # type: ignore[arg-type]
    else:
        rows = [list(p) for p in prompt_ids]  # type: ignore[union-attr]
    if len(rows) != B or not rows[0] or any(len(r) != len(rows[0]) for r in rows):
        raise ValueError(f"prompt_ids must be one non-empty prompt or {B} prompts of equal length")
    if max_new_tokens < 1 or len(rows[0]) + max_new_tokens > cfg.max_target_positions:
        raise ValueError(
            f"max_new_tokens must be in [1, {cfg.max_target_positions - len(rows[0])}] "
            f"(prompt of {len(rows[0])} tokens, max_target_positions {cfg.max_target_positions}), "
            f"got {max_new_tokens}"
        )
    eos = cfg.eos_token_ids[0] if eos_token_id is None else eos_token_id
    device = next(model.parameters()).device
    suppress = torch.tensor(suppress_tokens or [], dtype=torch.long, device=device)
    begin = torch.tensor(begin_suppress_tokens or [], dtype=torch.long, device=device)
    out: list[list[int]] = [[] for _ in range(B)]
    active = list(range(B))
    with torch.inference_mode():
        cache = model.start_decoding(
            model.encode(input_features.to(device)), capacity=len(rows[0]) + max_new_tokens
        )
        tokens = torch.tensor(rows, dtype=torch.long, device=device)  # (B, P): the prompt, in one step
        for step in range(max_new_tokens):
            logits = model.decode(tokens, cache)[:, -1].float()  # (A, V)
            if suppress.numel():
                logits = logits.index_fill(1, suppress, float("-inf"))
            if step == 0 and begin.numel():
                logits = logits.index_fill(1, begin, float("-inf"))
            next_ids = logits.argmax(dim=-1).tolist()
            keep = []
            for a, r in enumerate(active):
                out[r].append(next_ids[a])
                if next_ids[a] != eos:
                    keep.append(a)
            if not keep:
                break
            if len(keep) != len(active):
                cache.select_rows(torch.tensor(keep, dtype=torch.long, device=device))
                active = [active[a] for a in keep]
            tokens = torch.tensor([[next_ids[a]] for a in keep], dtype=torch.long, device=device)
    return out
