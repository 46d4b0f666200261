"""Gemma 3 (text): a Llama variant.

diff vs Llama: embeddings scaled by sqrt(hidden); RMSNorm scales by (1 + weight);
four norms per layer (before and after attention and MLP); q/k RMSNorm per head;
GELU-tanh MLP; attention scaled by query_pre_attn_scalar; sliding-window layers with
their own rope base, interleaved with full-attention layers.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from tokenmill.layers.norms import RMSNorm
from tokenmill.layers.rotary import RotaryEmbedding
from tokenmill.models.config import DecoderConfig, gguf_get, gguf_special_ids, hf_rope, hf_special_ids
from tokenmill.models.llama import GGUF_NAMES as LLAMA_GGUF_NAMES
from tokenmill.models.llama import CausalLM, GatedMLP, LlamaAttention


class Gemma3DecoderLayer(nn.Module):
    def __init__(self, cfg: DecoderConfig, layer: int) -> None:
        super().__init__()
        eps = cfg.norm_eps
        self.is_sliding = cfg.window_of(layer) is not None
        self.input_layernorm = RMSNorm(cfg.hidden_size, eps, offset=1.0)
        self.self_attn = LlamaAttention(cfg, layer, norm_offset=1.0)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, eps, offset=1.0)
        self.pre_feedforward_layernorm = RMSNorm(cfg.hidden_size, eps, offset=1.0)
        self.post_feedforward_layernorm = RMSNorm(cfg.hidden_size, eps, offset=1.0)
        self.mlp = GatedMLP(cfg)

    def forward(self, x: torch.Tensor, rope: dict[bool, tuple[torch.Tensor, torch.Tensor]], ctx: Any):
        cos, sin = rope[self.is_sliding]
        x = x + self.post_attention_layernorm(self.self_attn(self.input_layernorm(x), cos, sin, ctx))
        return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))


class Gemma3Backbone(nn.Module):
    def __init__(self, cfg: DecoderConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList([Gemma3DecoderLayer(cfg, i) for i in range(cfg.num_layers)])
        self.norm = RMSNorm(cfg.hidden_size, cfg.norm_eps, offset=1.0)


class Gemma3ForCausalLM(CausalLM):
    def build_backbone(self, cfg: DecoderConfig) -> nn.Module:
        return Gemma3Backbone(cfg)

    def build_rotary(self, cfg: DecoderConfig) -> nn.Module:
        local = RotaryEmbedding(cfg.head_dim, cfg.rope_local_theta or 10000.0, None)
        return nn.ModuleDict(
            {"full": RotaryEmbedding(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling), "local": local}
        )

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = self.model.embed_tokens(input_ids)
        # The scale is rounded to the model dtype first, as the reference does.
        return x * torch.tensor(self.config.hidden_size**0.5, dtype=x.dtype)

    def rope_tables(self, positions: torch.Tensor, dtype: torch.dtype, ctx: Any) -> tuple[Any, ...]:
        full = self.rotary["full"](positions, dtype, ctx.max_position)
        return (*full, *self.rotary["local"](positions, dtype, ctx.max_position))

    def layer_by_layer(self, x: torch.Tensor, positions: torch.Tensor, ctx: Any) -> torch.Tensor:
        cos, sin, cos_l, sin_l = self.rope_tables(positions, x.dtype, ctx)
        rope = {False: (cos, sin), True: (cos_l, sin_l)}
        for layer in self.model.layers:
            x = layer(x, rope, ctx)
        return x


def _default_layer_types(num_layers: int, pattern: int = 6) -> list[str]:
    return ["full_attention" if (i + 1) % pattern == 0 else "sliding_attention" for i in range(num_layers)]


def gemma3_config_from_hf(hf: dict[str, Any]) -> DecoderConfig:
    hf = hf.get("text_config", hf) if hf.get("model_type") == "gemma3" and "text_config" in hf else hf
    layers = int(hf["num_hidden_layers"])
    theta, scaling = hf_rope(hf, "full_attention")
    local_theta, _ = hf_rope(hf, "sliding_attention")
    if "rope_local_base_freq" in hf:
        local_theta = float(hf["rope_local_base_freq"])
    layer_types = hf.get("layer_types") or _default_layer_types(
        layers, int(hf.get("sliding_window_pattern", 6))
    )
    heads = int(hf["num_attention_heads"])
    return DecoderConfig(
        architecture="gemma3",
        vocab_size=int(hf["vocab_size"]),
        hidden_size=int(hf["hidden_size"]),
        intermediate_size=int(hf["intermediate_size"]),
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=int(hf.get("num_key_value_heads") or heads),
        head_dim=int(hf.get("head_dim", 256)),
        max_position_embeddings=int(hf.get("max_position_embeddings", 131072)),
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        hidden_act=hf.get("hidden_activation") or hf.get("hidden_act") or "gelu_pytorch_tanh",
        rope_theta=theta,
        rope_scaling=scaling,
        rope_local_theta=local_theta,
        attention_bias=bool(hf.get("attention_bias", False)),
        o_bias=bool(hf.get("attention_bias", False)),
        qk_norm=True,
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", True)),
        sliding_window=int(hf.get("sliding_window") or 4096),
        layer_types=list(layer_types),
        query_pre_attn_scalar=float(hf.get("query_pre_attn_scalar", 256)),
        final_logit_softcapping=hf.get("final_logit_softcapping"),
        **hf_special_ids(hf),
    )


def gemma3_config_from_gguf(meta: dict[str, Any], tensor_names: set[str]) -> DecoderConfig:
    arch = "gemma3"
    heads = int(gguf_get(meta, arch, "attention.head_count", required=True))
    layers = int(gguf_get(meta, arch, "block_count", required=True))
    head_dim = int(gguf_get(meta, arch, "attention.key_length", 256))
    vocab = gguf_get(meta, arch, "vocab_size") or len(meta.get("tokenizer.ggml.tokens", []))
    scaling = None
    if gguf_get(meta, arch, "rope.scaling.type") == "linear":
        scaling = {"rope_type": "linear", "factor": float(gguf_get(meta, arch, "rope.scaling.factor"))}
    return DecoderConfig(
        architecture="gemma3",
        vocab_size=int(vocab),
        hidden_size=int(gguf_get(meta, arch, "embedding_length", required=True)),
        intermediate_size=int(gguf_get(meta, arch, "feed_forward_length", required=True)),
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=int(gguf_get(meta, arch, "attention.head_count_kv") or heads),
        head_dim=head_dim,
        max_position_embeddings=int(gguf_get(meta, arch, "context_length", 32768)),
        norm_eps=float(gguf_get(meta, arch, "attention.layer_norm_rms_epsilon", 1e-6)),
        hidden_act="gelu_pytorch_tanh",
        rope_theta=float(gguf_get(meta, arch, "rope.freq_base", 1000000.0)),
        rope_scaling=scaling,
        rope_local_theta=10000.0,
        qk_norm=True,
        tie_word_embeddings="output.weight" not in tensor_names,
        sliding_window=int(gguf_get(meta, arch, "attention.sliding_window", 4096)),
        layer_types=_default_layer_types(layers),
        # GGUF does not record it; Gemma 3 uses the head size (what transformers assumes too).
        query_pre_attn_scalar=float(head_dim),
        **gguf_special_ids(meta),
    )


def gemma3_gguf_tensor_transform(cfg: DecoderConfig, arch: str):
    def transform(name: str, t: torch.Tensor) -> torch.Tensor:
        # llama.cpp stores Gemma norms as (1 + weight); our RMSNorm adds the 1 itself.
        return t - 1.0 if name.endswith("norm.weight") else t

    return transform


GGUF_NAMES: dict[str, str] = {
    **LLAMA_GGUF_NAMES,
    "ffn_norm": "pre_feedforward_layernorm",
    "post_attention_norm": "post_attention_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
}
