"""The decoder-only model config shared by every family, and its readers.

``from_hf`` / ``from_gguf`` in each family module are the only code that knows foreign
key names; everything else reads this dataclass.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class DecoderConfig:
    """Hyper-parameters of a decoder-only transformer, in tokenmill's own names."""

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int
    norm_eps: float = 1e-6
    hidden_act: str = "silu"
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    #: Rope base of sliding-window layers where it differs (Gemma 3).
    rope_local_theta: float | None = None
    attention_bias: bool = False  # q/k/v projections
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False  # per-head RMSNorm of q and k (Qwen3, Gemma 3)
    tie_word_embeddings: bool = False
    sliding_window: int | None = None
    #: "full_attention" or "sliding_attention" per layer; None means all full.
    layer_types: list[str] | None = None
    query_pre_attn_scalar: float | None = None
    final_logit_softcapping: float | None = None
    bos_token_id: int | None = None
    eos_token_ids: list[int] = field(default_factory=list)
    pad_token_id: int | None = None

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"config field {name} must be a positive integer, got {value!r}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"config field num_attention_heads ({self.num_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_kv_heads})"
            )
        if self.layer_types is not None and len(self.layer_types) != self.num_layers:
            raise ValueError(
                f"config field layer_types has {len(self.layer_types)} entries for {self.num_layers} layers"
            )

    def window_of(self, layer: int) -> int | None:
        """The sliding window of ``layer``, or None for full attention."""
        if self.sliding_window is None:
            return None
        if self.layer_types is None:
            return self.sliding_window
        return self.sliding_window if self.layer_types[layer] == "sliding_attention" else None


def eos_list(value: Any) -> list[int]:
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return [int(v) for v in value]
    return [int(value)]


def hf_special_ids(hf: dict[str, Any]) -> dict[str, Any]:
    """bos / eos / pad ids of a config.json, as DecoderConfig fields."""
    return {
        "bos_token_id": hf.get("bos_token_id"),
        "eos_token_ids": eos_list(hf.get("eos_token_id")),
        "pad_token_id": hf.get("pad_token_id"),
    }


def gguf_special_ids(meta: dict[str, Any]) -> dict[str, Any]:
    """bos / eos / pad ids of GGUF tokenizer metadata, as DecoderConfig fields."""
    return {
        "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
        "eos_token_ids": eos_list(meta.get("tokenizer.ggml.eos_token_id")),
        "pad_token_id": meta.get("tokenizer.ggml.padding_token_id"),
    }


def hf_rope(hf: dict[str, Any], layer_type: str | None = None) -> tuple[float, dict[str, Any] | None]:
    """Rope base and scaling from a config.json of either transformers 4 or 5 layout."""
    params = hf.get("rope_parameters")
    if isinstance(params, dict) and layer_type is not None and layer_type in params:
        params = params[layer_type]
    if isinstance(params, dict) and "rope_theta" in params:
        theta = float(params["rope_theta"])
        scaling = None if params.get("rope_type", "default") == "default" else dict(params)
    else:
        theta = float(hf.get("rope_theta", 10000.0))
        scaling = hf.get("rope_scaling")
        scaling = dict(scaling) if scaling else None
    if scaling is not None:
        scaling.setdefault("_max_position_embeddings", hf.get("max_position_embeddings"))
    return theta, scaling


def gguf_get(meta: dict[str, Any], arch: str, key: str, default: Any = None, required: bool = False) -> Any:
    full = f"{arch}.{key}"
    if full in meta:
        return meta[full]
    if required:
        raise ValueError(f"GGUF metadata has no {full!r}; the file is incomplete or not a {arch} model")
    return default
