"""The Llama family: Llama 2/3, Mistral, Qwen2/2.5, Qwen3, SmolLM2.

Variants differ only in config: Qwen2 adds q/k/v biases, Qwen3 adds a per-head RMSNorm
of q and k, Mistral may use a sliding window, Llama 3 scales its rope frequencies.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tokenmill.layers import cpu_kernels
from tokenmill.layers.activations import gelu_tanh, get_activation
from tokenmill.layers.decode_stack import DecodeStack, weights_fingerprint
from tokenmill.layers.norms import RMSNorm
from tokenmill.layers.paged_attention import PagedAttention
from tokenmill.layers.rotary import RotaryEmbedding, apply_rotary
from tokenmill.models.config import DecoderConfig, gguf_get, gguf_special_ids, hf_rope, hf_special_ids

log = logging.getLogger("tokenmill.models")

LLAMA_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")


class LlamaAttention(nn.Module):
    def __init__(self, cfg: DecoderConfig, layer: int, norm_offset: float = 0.0) -> None:
        super().__init__()
        self.layer = layer
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        q_size, kv_size = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        # q, k and v run as one matmul; the loader fills the three shards from q_proj/k_proj/v_proj.
        self.qkv_proj = nn.Linear(cfg.hidden_size, q_size + 2 * kv_size, bias=cfg.attention_bias)
        self.qkv_proj.shard_sizes = [q_size, kv_size, kv_size]
        self.o_proj = nn.Linear(q_size, cfg.hidden_size, bias=cfg.o_bias)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(cfg.head_dim, cfg.norm_eps, offset=norm_offset)
            self.k_norm = RMSNorm(cfg.head_dim, cfg.norm_eps, offset=norm_offset)
        self.qk_norm = cfg.qk_norm
        scalar = cfg.query_pre_attn_scalar if cfg.query_pre_attn_scalar else cfg.head_dim
        self.scale = scalar**-0.5
        self.window = cfg.window_of(layer)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, ctx: Any) -> torch.Tensor:
        B, T, _ = x.shape
        H, Hkv = self.num_heads, self.num_kv_heads
        qkv = self.qkv_proj(x).view(B, T, H + 2 * Hkv, self.head_dim)  # (B, T, H + 2 Hkv, D)
        if self.qk_norm:
            q, k, v = qkv.split([H, Hkv, Hkv], dim=2)
            q, k = apply_rotary(self.q_norm(q), cos, sin), apply_rotary(self.k_norm(k), cos, sin)
        elif cpu_kernels.fused_available(qkv) and cos.is_contiguous():
            # Rotated in place in the fresh projection output: one pass, no copies.
            cpu_kernels.rope_(qkv, cos, sin, H + Hkv)
            q, k, v = qkv.split([H, Hkv, Hkv], dim=2)
        else:
            # One rope call over the q and k heads together: half the small ops per layer.
            qk, v = qkv.split([H + Hkv, Hkv], dim=2)
            q, k = apply_rotary(qk, cos, sin).split([H, Hkv], dim=2)
        out = ctx.attend(self.layer, q, k, v, self.scale, self.window)  # (B, T, H * D)
        return self.o_proj(out)


# act(gate) * up in one C pass over contiguous bf16 on CPU (the decode stack calls the same).
_FUSED_GATES = {F.silu: cpu_kernels.silu_mul, gelu_tanh: cpu_kernels.gelu_tanh_mul}


class GatedMLP(nn.Module):
    def __init__(self, cfg: DecoderConfig) -> None:
        super().__init__()
        self.gate_up_proj = nn.Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=cfg.mlp_bias)
        self.gate_up_proj.shard_sizes = [cfg.intermediate_size, cfg.intermediate_size]
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=cfg.mlp_bias)
        self.act = get_activation(cfg.hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = self.gate_up_proj(x)
        fused = _FUSED_GATES.get(self.act)
        if fused is not None and cpu_kernels.fused_available(gate_up):
            return self.down_proj(fused(gate_up))
        gate, up = gate_up.chunk(2, dim=-1)
        return self.down_proj(self.act(gate) * up)


class LlamaDecoderLayer(nn.Module):
    def __init__(self, cfg: DecoderConfig, layer: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.self_attn = LlamaAttention(cfg, layer)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.mlp = GatedMLP(cfg)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, ctx: Any, residual: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (this layer's MLP output, the residual stream before it): the next
        layer's norm adds the two, fused with its normalisation."""
        if residual is None:
            h, residual = self.input_layernorm(x), x
        else:
            h, residual = self.input_layernorm(x, residual)
        h, residual = self.post_attention_layernorm(self.self_attn(h, cos, sin, ctx), residual)
        return self.mlp(h), residual


class LlamaBackbone(nn.Module):
    def __init__(self, cfg: DecoderConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList([LlamaDecoderLayer(cfg, i) for i in range(cfg.num_layers)])
        self.norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)


class CausalLM(nn.Module):
    """Shared top of every decoder-only family: embeddings in, logits out.

    ``forward`` takes the attention context built by the engine; ``select`` says which
    positions need logits (``"last"``, flat indices into B*T, or None for all) so the LM
    head, the largest matmul at small batch, runs only where it is needed.
    """

    #: checkpoint sub-name -> (fused parameter sub-name, shard index)
    packed_modules: dict[str, tuple[str, int]] = {
        "q_proj": ("qkv_proj", 0),
        "k_proj": ("qkv_proj", 1),
        "v_proj": ("qkv_proj", 2),
        "gate_proj": ("gate_up_proj", 0),
        "up_proj": ("gate_up_proj", 1),
    }

    def __init__(self, cfg: DecoderConfig) -> None:
        super().__init__()
        self.config = cfg
        self.model = self.build_backbone(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.rotary = self.build_rotary(cfg)

    def build_backbone(self, cfg: DecoderConfig) -> nn.Module:
        return LlamaBackbone(cfg)

    def build_rotary(self, cfg: DecoderConfig) -> nn.Module:
        return RotaryEmbedding(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_tokens(input_ids)

    #: the C decode stack: None until first needed, then the stack or False where it cannot run
    _decode_stack: Any = None
    #: the weights the stack (or the verdict False) was built for
    _decode_stack_key: tuple[int, ...] | None = None

    def __getstate__(self) -> dict[str, Any]:
        # The stack holds raw pointers to this model's weights: a copy or a pickle builds its own.
        state = dict(super().__getstate__())
        state.pop("_decode_stack", None)
        state.pop("_decode_stack_key", None)
        return state

    def rope_tables(self, positions: torch.Tensor, dtype: torch.dtype, ctx: Any) -> tuple[Any, ...]:
        """(cos, sin) of every layer's rope, then (cos, sin) of the local one or nothing."""
        return self.rotary(positions, dtype, ctx.max_position)

    def run_layers(self, x: torch.Tensor, positions: torch.Tensor, ctx: Any) -> torch.Tensor:
        """The decoder layers: a decode step the C stack takes runs there in one call,
        anything else layer by layer."""
        stack = self._decode_stack
        if stack is not None and self._decode_stack_key != weights_fingerprint(self):
            # Moved or replaced weights (to CUDA, another dtype): drop the stack and the old
            # tensors it holds, and look again on the next CPU step.
            self._decode_stack = stack = None
        if stack is None and isinstance(ctx, PagedAttention) and x.device.type == "cpu":
            stack, why = DecodeStack.build(self)
            if stack is None:
                log.info("decode steps run layer by layer: %s", why)
            self._decode_stack = stack or False
            self._decode_stack_key = weights_fingerprint(self)
        if stack and stack.accepts(x, ctx):
            cos, sin, *local = self.rope_tables(positions, x.dtype, ctx)
            out = stack.run(x, cos, sin, ctx, tuple(local) or None)
            if out is not None:
                return out
        return self.layer_by_layer(x, positions, ctx)

    def layer_by_layer(self, x: torch.Tensor, positions: torch.Tensor, ctx: Any) -> torch.Tensor:
        cos, sin = self.rope_tables(positions, x.dtype, ctx)
        residual = None
        for layer in self.model.layers:
            x, residual = layer(x, cos, sin, ctx, residual)
        return x if residual is None else x + residual

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        ctx: Any,
        select: str | torch.Tensor | None = "last",
    ) -> torch.Tensor:
        """input_ids, positions: (B, T). Returns logits (B, V) for "last", (N, V) for indices,
        or (B, T, V) for None."""
        x = self.run_layers(self.embed(input_ids), positions, ctx)  # (B, T, C)
        if isinstance(select, str):
            x = x[:, -1]  # (B, C)
        elif select is not None:
            x = x.reshape(-1, x.shape[-1]).index_select(0, select)  # (N, C)
        logits = self.lm_head(self.model.norm(x))
        if self.config.final_logit_softcapping:
            cap = self.config.final_logit_softcapping
            logits = torch.tanh(logits / cap) * cap
        return logits


class LlamaForCausalLM(CausalLM):
    """Llama, Mistral, Qwen2/2.5, Qwen3, SmolLM2."""


def llama_config_from_hf(hf: dict[str, Any]) -> DecoderConfig:
    model_type = hf.get("model_type", "llama")
    heads = int(hf["num_attention_heads"])
    hidden = int(hf["hidden_size"])
    theta, scaling = hf_rope(hf)
    sliding = hf.get("sliding_window") if model_type == "mistral" else None
    if model_type in ("qwen2",) and hf.get("use_sliding_window"):
        sliding = hf.get("sliding_window")
    return DecoderConfig(
        architecture=model_type,
        vocab_size=int(hf["vocab_size"]),
        hidden_size=hidden,
        intermediate_size=int(hf["intermediate_size"]),
        num_layers=int(hf["num_hidden_layers"]),
        num_heads=heads,
        num_kv_heads=int(hf.get("num_key_value_heads") or heads),
        head_dim=int(hf.get("head_dim") or hidden // heads),
        max_position_embeddings=int(hf.get("max_position_embeddings", 2048)),
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        hidden_act=hf.get("hidden_act", "silu"),
        rope_theta=theta,
        rope_scaling=scaling,
        # diff vs Llama: Qwen2 always has q/k/v biases; Llama has them only when asked.
        attention_bias=model_type == "qwen2" or bool(hf.get("attention_bias", False)),
        o_bias=model_type != "qwen2" and bool(hf.get("attention_bias", False)),
        mlp_bias=bool(hf.get("mlp_bias", False)),
        # diff vs Llama: Qwen3 normalises each head of q and k.
        qk_norm=model_type == "qwen3",
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        sliding_window=int(sliding) if sliding else None,
        **hf_special_ids(hf),
    )


def llama_config_from_gguf(meta: dict[str, Any], tensor_names: set[str]) -> DecoderConfig:
    arch = meta["general.architecture"]
    heads = int(gguf_get(meta, arch, "attention.head_count", required=True))
    hidden = int(gguf_get(meta, arch, "embedding_length", required=True))
    vocab = gguf_get(meta, arch, "vocab_size") or len(meta.get("tokenizer.ggml.tokens", []))
    head_dim = gguf_get(meta, arch, "attention.key_length") or gguf_get(meta, arch, "rope.dimension_count")
    scaling = None
    rope_type = gguf_get(meta, arch, "rope.scaling.type")
    if rope_type == "linear":
        scaling = {"rope_type": "linear", "factor": float(gguf_get(meta, arch, "rope.scaling.factor"))}
    elif rope_type == "yarn":
        scaling = {
            "rope_type": "yarn",
            "factor": float(gguf_get(meta, arch, "rope.scaling.factor")),
            "original_max_position_embeddings": int(
                gguf_get(meta, arch, "rope.scaling.original_context_length", required=True)
            ),
        }
    kind = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}.get(arch, arch)
    sliding = gguf_get(meta, arch, "attention.sliding_window")
    return DecoderConfig(
        architecture=kind,
        vocab_size=int(vocab),
        hidden_size=hidden,
        intermediate_size=int(gguf_get(meta, arch, "feed_forward_length", required=True)),
        num_layers=int(gguf_get(meta, arch, "block_count", required=True)),
        num_heads=heads,
        num_kv_heads=int(gguf_get(meta, arch, "attention.head_count_kv") or heads),
        head_dim=int(head_dim or hidden // heads),
        max_position_embeddings=int(gguf_get(meta, arch, "context_length", 2048)),
        norm_eps=float(gguf_get(meta, arch, "attention.layer_norm_rms_epsilon", 1e-6)),
        rope_theta=float(gguf_get(meta, arch, "rope.freq_base", 10000.0)),
        rope_scaling=scaling,
        attention_bias="blk.0.attn_q.bias" in tensor_names,
        o_bias="blk.0.attn_output.bias" in tensor_names,
        qk_norm="blk.0.attn_q_norm.weight" in tensor_names,
        tie_word_embeddings="output.weight" not in tensor_names,
        sliding_window=int(sliding) if sliding else None,
        **gguf_special_ids(meta),
    )


def _unpermute_qk(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Undo llama.cpp's interleaving of q/k rows so rotate-half rope applies again."""
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def llama_gguf_tensor_transform(cfg: DecoderConfig, arch: str):
    """Per-tensor fix-ups for GGUF files of this family (HF names)."""

    def transform(name: str, t: torch.Tensor) -> torch.Tensor:
        # Only the "llama" GGUF architecture stores q/k permuted; Qwen uses the NeoX layout.
        if arch == "llama":
            if name.endswith("self_attn.q_proj.weight") or name.endswith("self_attn.q_proj.bias"):
                return _unpermute_qk(t, cfg.num_heads)
            if name.endswith("self_attn.k_proj.weight") or name.endswith("self_attn.k_proj.bias"):
                return _unpermute_qk(t, cfg.num_kv_heads)
        return t

    return transform


#: GGUF tensor name pieces -> HF name pieces, for the llama-style families.
GGUF_NAMES: dict[str, str] = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
