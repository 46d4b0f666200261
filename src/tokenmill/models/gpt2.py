"""GPT-2: learned absolute positions, LayerNorm, fused c_attn, GELU MLP.

diff vs Llama: no rope (a learned position table is added to the embeddings); LayerNorm
with bias; checkpoints store Conv1D weights as (in, out), kept as they are here.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from tokenmill.layers.activations import get_activation
from tokenmill.models.config import DecoderConfig, gguf_get, gguf_special_ids, hf_special_ids


class Conv1D(nn.Module):
    """A linear layer whose weight is stored (in, out), as GPT-2 checkpoints store it."""

    #: read by quantize_model: a linear layer whose weight is the transpose of nn.Linear's
    weight_is_in_out = True

    def __init__(self, n_in: int, n_out: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(n_in, n_out))
        self.bias = nn.Parameter(torch.zeros(n_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.addmm(self.bias, x.reshape(-1, x.shape[-1]), self.weight).view(*x.shape[:-1], -1)


class GPT2Attention(nn.Module):
    def __init__(self, cfg: DecoderConfig, layer: int) -> None:
        super().__init__()
        self.layer, self.num_heads, self.head_dim = layer, cfg.num_heads, cfg.head_dim
        self.c_attn = Conv1D(cfg.hidden_size, 3 * cfg.hidden_size)
        self.c_proj = Conv1D(cfg.hidden_size, cfg.hidden_size)
        self.scale = cfg.head_dim**-0.5

    def forward(self, x: torch.Tensor, ctx: Any) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=-1)
        shape = (B, T, self.num_heads, self.head_dim)  # (B, T, H, D)
        out = ctx.attend(self.layer, q.view(shape), k.view(shape), v.view(shape), self.scale, None)
        return self.c_proj(out)


class GPT2MLP(nn.Module):
    def __init__(self, cfg: DecoderConfig) -> None:
        super().__init__()
        self.c_fc = Conv1D(cfg.hidden_size, cfg.intermediate_size)
        self.c_proj = Conv1D(cfg.intermediate_size, cfg.hidden_size)
        self.act = get_activation(cfg.hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(self.act(self.c_fc(x)))


class GPT2Block(nn.Module):
    def __init__(self, cfg: DecoderConfig, layer: int) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.norm_eps)
        self.attn = GPT2Attention(cfg, layer)
        self.ln_2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.norm_eps)
        self.mlp = GPT2MLP(cfg)

    def forward(self, x: torch.Tensor, ctx: Any) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), ctx)
        return x + self.mlp(self.ln_2(x))


class GPT2Backbone(nn.Module):
    def __init__(self, cfg: DecoderConfig) -> None:
        super().__init__()
        self.wte = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.wpe = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)
        self.h = nn.ModuleList([GPT2Block(cfg, i) for i in range(cfg.num_layers)])
        self.ln_f = nn.LayerNorm(cfg.hidden_size, eps=cfg.norm_eps)


class GPT2LMHeadModel(nn.Module):
    packed_modules: dict[str, tuple[str, int]] = {}

    def __init__(self, cfg: DecoderConfig) -> None:
        super().__init__()
        self.config = cfg
        self.transformer = GPT2Backbone(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.transformer.wte.weight

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        ctx: Any,
        select: str | torch.Tensor | None = "last",
    ) -> torch.Tensor:
        t = self.transformer
        x = t.wte(input_ids) + t.wpe(positions)  # (B, T, C)
        for block in t.h:
            x = block(x, ctx)
        if isinstance(select, str):
            x = x[:, -1]
        elif select is not None:
            x = x.reshape(-1, x.shape[-1]).index_select(0, select)
        return self.lm_head(t.ln_f(x))


def gpt2_config_from_hf(hf: dict[str, Any]) -> DecoderConfig:
    for flag in ("scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn"):
        if hf.get(flag):
            raise ValueError(f"GPT-2 config option {flag}=true is not supported")
    hidden = int(hf["n_embd"])
    heads = int(hf["n_head"])
    return DecoderConfig(
        architecture="gpt2",
        vocab_size=int(hf["vocab_size"]),
        hidden_size=hidden,
        intermediate_size=int(hf.get("n_inner") or 4 * hidden),
        num_layers=int(hf["n_layer"]),
        num_heads=heads,
        num_kv_heads=heads,
        head_dim=hidden // heads,
        max_position_embeddings=int(hf["n_positions"]),
        norm_eps=float(hf.get("layer_norm_epsilon", 1e-5)),
        hidden_act=hf.get("activation_function", "gelu_new"),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", True)),
        **hf_special_ids(hf),
    )


def gpt2_config_from_gguf(meta: dict[str, Any], tensor_names: set[str]) -> DecoderConfig:
    arch = "gpt2"
    hidden = int(gguf_get(meta, arch, "embedding_length", required=True))
    heads = int(gguf_get(meta, arch, "attention.head_count", required=True))
    return DecoderConfig(
        architecture="gpt2",
        vocab_size=len(meta.get("tokenizer.ggml.tokens", [])) or int(gguf_get(meta, arch, "vocab_size")),
        hidden_size=hidden,
        intermediate_size=int(gguf_get(meta, arch, "feed_forward_length", 4 * hidden)),
        num_layers=int(gguf_get(meta, arch, "block_count", required=True)),
        num_heads=heads,
        num_kv_heads=heads,
        head_dim=hidden // heads,
        max_position_embeddings=int(gguf_get(meta, arch, "context_length", 1024)),
        norm_eps=float(gguf_get(meta, arch, "attention.layer_norm_epsilon", 1e-5)),
        hidden_act="gelu_new",
        tie_word_embeddings="output.weight" not in tensor_names,
        **gguf_special_ids(meta),
    )


def gpt2_gguf_tensor_transform(cfg: DecoderConfig, arch: str):
    def transform(name: str, t: torch.Tensor) -> torch.Tensor:
        # GGUF stores linear weights (out, in); GPT-2's Conv1D keeps (in, out).
        if name.endswith(".weight") and t.dim() == 2 and any(p in name for p in ("c_attn", "c_proj", "c_fc")):
            return t.t().contiguous()
        return t

    return transform


GGUF_NAMES: dict[str, str] = {
    "token_embd": "transformer.wte",
    "position_embd": "transformer.wpe",
    "output_norm": "transformer.ln_f",
    "output": "lm_head",
    "attn_norm": "ln_1",
    "attn_qkv": "attn.c_attn",
    "attn_output": "attn.c_proj",
    "ffn_norm": "ln_2",
    "ffn_up": "mlp.c_fc",
    "ffn_down": "mlp.c_proj",
}
