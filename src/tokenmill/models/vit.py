"""ViT (Vision Transformer): an image cut into patches, each patch a token, a [CLS] token in front.

Pre-LayerNorm encoder layers (LayerNorm before attention and before the MLP, residuals
around each), a final LayerNorm, and for classification a linear layer on the [CLS] token.
Modules keep the names of transformers' checkpoints (``vit.encoder.layer.0.attention.
attention.query``; transformers 5 renames them in memory but still saves these), with
query/key/value fused into one ``qkv`` product as in BERT.

Position embeddings are learned for the config's ``image_size``; like transformers'
default (``interpolate_pos_encoding=False``) another input size is an error, not an
interpolation: the image processor resizes every image to the size the model was trained at.

Forward contract: ViTModel(pixel_values (B, C, H, W)) -> last_hidden_state (B, 1 + patches, hidden);
ViTForImageClassification(pixel_values) -> logits (B, num_labels).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tokenmill.layers.activations import get_activation
from tokenmill.models.encoder_config import PROBLEM_TYPES, hf_labels


@dataclass
class ViTConfig:
    """ViT hyper-parameters in tokenmill's names; ``vit_config_from_hf`` reads config.json."""

    model_type: str = "vit"
    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-12
    #: (height, width) of the images the position embeddings were learned for
    image_size: tuple[int, int] = (224, 224)
    #: (height, width) of one patch (the patch embedding convolution's kernel and stride)
    patch_size: tuple[int, int] = (16, 16)
    num_channels: int = 3
    qkv_bias: bool = True
    pooler_output_size: int = 768
    #: "tanh" or any hidden_act name
    pooler_act: str = "tanh"
    id2label: dict[int, str] = field(default_factory=lambda: {0: "LABEL_0", 1: "LABEL_1"})
    label2id: dict[str, int] = field(default_factory=lambda: {"LABEL_0": 0, "LABEL_1": 1})
    problem_type: str | None = None

    @property
    def num_labels(self) -> int:
        return len(self.id2label)

    @property
    def grid(self) -> tuple[int, int]:
        """Patches per column and per row (the convolution drops a partial patch at the edge)."""
        return self.image_size[0] // self.patch_size[0], self.image_size[1] // self.patch_size[1]

    @property
    def num_patches(self) -> int:
        rows, cols = self.grid
        return rows * cols

    def __post_init__(self) -> None:
        for name in (
            "hidden_size",
            "num_layers",
            "num_heads",
            "intermediate_size",
            "num_channels",
            "pooler_output_size",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"config field {name} must be a positive integer, got {value!r}")
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"config field hidden_size ({self.hidden_size}) must be a multiple of "
                f"num_attention_heads ({self.num_heads})"
            )
        if not self.layer_norm_eps > 0:
            raise ValueError(f"config field layer_norm_eps must be > 0, got {self.layer_norm_eps!r}")
        get_activation(self.hidden_act)  # raises ValueError naming hidden_act
        _pooler_activation(self.pooler_act)
        if self.num_patches == 0:
            raise ValueError(
                f"config field image_size {self.image_size} is smaller than patch_size {self.patch_size}: "
                "the image holds no patch"
            )
        if sorted(self.id2label) != list(range(len(self.id2label))) or not self.id2label:
            raise ValueError(
                f"config field id2label must map the ids 0..n-1 to names, got ids {sorted(self.id2label)}"
            )
        if self.problem_type is not None and self.problem_type not in PROBLEM_TYPES:
            raise ValueError(
                f"config field problem_type must be one of {PROBLEM_TYPES} or null, got {self.problem_type!r}"
            )


def _pair(value: Any, name: str) -> tuple[int, int]:
    """An int (square) or [height, width], as transformers accepts for image_size and patch_size."""
    if isinstance(value, int) and not isinstance(value, bool):
        value = (value, value)
    if (
        isinstance(value, (list, tuple))
        and len(value) == 2
        and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value)
    ):
        return int(value[0]), int(value[1])
    raise ValueError(f"config field {name} must be a positive integer or [height, width], got {value!r}")


def _pooler_activation(name: str) -> Any:
    if name == "tanh":
        return torch.tanh
    try:
        return get_activation(name)
    except ValueError:
        raise ValueError(
            f"config field pooler_act must be 'tanh' or a hidden_act name, got {name!r}"
        ) from None


def vit_config_from_hf(hf: dict[str, Any]) -> ViTConfig:
    """The ViTConfig of a transformers config.json dict (defaults as ``transformers.ViTConfig``)."""
    hidden = hf.get("hidden_size", 768)
    return ViTConfig(
        model_type=hf.get("model_type", "vit"),
        hidden_size=hidden,
        num_layers=hf.get("num_hidden_layers", 12),
        num_heads=hf.get("num_attention_heads", 12),
        intermediate_size=hf.get("intermediate_size", 3072),
        hidden_act=hf.get("hidden_act", "gelu"),
        layer_norm_eps=float(hf.get("layer_norm_eps", 1e-12)),
        image_size=_pair(hf.get("image_size", 224), "image_size"),
        patch_size=_pair(hf.get("patch_size", 16), "patch_size"),
        num_channels=hf.get("num_channels", 3),
        qkv_bias=bool(hf.get("qkv_bias", True)),
        pooler_output_size=hf.get("pooler_output_size") or hidden,
        pooler_act=hf.get("pooler_act", "tanh"),
        **hf_labels(hf),
    )


class ViTPatchEmbeddings(nn.Module):
    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        self.projection = nn.Conv2d(
            cfg.num_channels, cfg.hidden_size, kernel_size=cfg.patch_size, stride=cfg.patch_size
        )

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = self.projection(pixel_values)  # (B, C, rows, cols)
        return x.flatten(2).transpose(1, 2)  # (B, rows * cols, C): patches in row-major order


class ViTEmbeddings(nn.Module):
    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.hidden_size))
        self.patch_embeddings = ViTPatchEmbeddings(cfg)
        self.position_embeddings = nn.Parameter(torch.zeros(1, cfg.num_patches + 1, cfg.hidden_size))
        self.image_size = cfg.image_size
        self.num_channels = cfg.num_channels

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        B, C, H, W = pixel_values.shape
        if C != self.num_channels:
            raise ValueError(f"pixel_values have {C} channels, this model takes {self.num_channels}")
        if (H, W) != self.image_size:
            raise ValueError(
                f"pixel_values are {H}x{W} (height x width), this model takes "
                f"{self.image_size[0]}x{self.image_size[1]} images (config image_size)"
            )
        patches = self.patch_embeddings(pixel_values)  # (B, N, C)
        x = torch.cat([self.cls_token.expand(B, -1, -1), patches], dim=1)  # (B, 1 + N, C)
        return x + self.position_embeddings


#: checkpoint names of q/k/v -> (fused parameter, shard): one product instead of three
VIT_PACKED_MODULES = {"query": ("qkv", 0), "key": ("qkv", 1), "value": ("qkv", 2)}


class ViTSelfAttention(nn.Module):
    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        self.num_heads = cfg.num_heads
        self.qkv = nn.Linear(cfg.hidden_size, 3 * cfg.hidden_size, bias=cfg.qkv_bias)
        self.qkv.shard_sizes = [cfg.hidden_size] * 3

    def forward(self, x: torch.Tensor, first_only: bool = False) -> torch.Tensor:
        """(B, T, C) -> (B, T, C); with ``first_only`` just the first ([CLS]) row, (B, 1, C)."""
        B, T, C = x.shape
        H, D = self.num_heads, C // self.num_heads
        q, k, v = self.qkv(x).chunk(3, dim=-1)  # each (B, T, C)
        if first_only:
            q = q[:, :1]
        q = q.view(B, q.shape[1], H, D).transpose(1, 2)  # (B, H, Tq, D)
        k, v = (t.view(B, T, H, D).transpose(1, 2) for t in (k, v))  # (B, H, T, D)
        out = F.scaled_dot_product_attention(q, k, v)  # (B, H, Tq, D); every patch sees every patch
        return out.transpose(1, 2).reshape(B, q.shape[2], C)


class ViTDense(nn.Module):
    """A linear layer under transformers' ``.dense`` name (the attention and MLP outputs)."""

    def __init__(self, n_in: int, n_out: int) -> None:
        super().__init__()
        self.dense = nn.Linear(n_in, n_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dense(x)


class ViTAttention(nn.Module):
    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        self.attention = ViTSelfAttention(cfg)
        self.output = ViTDense(cfg.hidden_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor, first_only: bool = False) -> torch.Tensor:
        return self.output(self.attention(x, first_only))


class ViTIntermediate(nn.Module):
    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.act = get_activation(cfg.hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.dense(x))


class ViTLayer(nn.Module):
    """Pre-LN: x + attention(LN(x)), then x + MLP(LN(x)). (BERT normalizes after the residual.)"""

    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        self.attention = ViTAttention(cfg)
        self.intermediate = ViTIntermediate(cfg)
        self.output = ViTDense(cfg.intermediate_size, cfg.hidden_size)
        self.layernorm_before = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.layernorm_after = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, x: torch.Tensor, first_only: bool = False) -> torch.Tensor:
        """(B, T, C) -> (B, T, C), or (B, 1, C) for ``first_only``: a classifier reads only the
        [CLS] row of the last layer, so that layer's attention output and MLP run on one row."""
        attn = self.attention(self.layernorm_before(x), first_only)
        x = (x[:, :1] if first_only else x) + attn
        return x + self.output(self.intermediate(self.layernorm_after(x)))


class ViTEncoder(nn.Module):
    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        self.layer = nn.ModuleList([ViTLayer(cfg) for _ in range(cfg.num_layers)])

    def forward(self, x: torch.Tensor, first_only: bool = False) -> torch.Tensor:
        last = len(self.layer) - 1
        for i, layer in enumerate(self.layer):
            x = layer(x, first_only and i == last)
        return x


class ViTPooler(nn.Module):
    """act(dense(hidden of the [CLS] token)): transformers' ``pooler_output`` of ViTModel."""

    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.pooler_output_size)
        self.act = _pooler_activation(cfg.pooler_act)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.act(self.dense(hidden[:, 0]))  # (B, pooler_output_size)


class ViTModel(nn.Module):
    """The bare ViT. ``pooler`` is built as transformers builds it (ViTModel checkpoints hold
    its weights); ``forward`` returns the hidden states and ``pool`` applies it."""

    packed_modules = VIT_PACKED_MODULES
    #: submodules ``forward`` does not use; a loader removes them where a checkpoint lacks them
    optional_modules = ("pooler",)

    def __init__(self, config: ViTConfig, add_pooling_layer: bool = True) -> None:
        super().__init__()
        self.config = config
        self.embeddings = ViTEmbeddings(config)
        self.encoder = ViTEncoder(config)
        self.layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.pooler = ViTPooler(config) if add_pooling_layer else None

    def hidden(self, pixel_values: torch.Tensor, first_only: bool = False) -> torch.Tensor:
        """The encoder's output before the final LayerNorm: (B, 1 + N, C), or (B, 1, C)."""
        pixel_values = pixel_values.to(self.embeddings.cls_token.dtype)
        return self.encoder(self.embeddings(pixel_values), first_only)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """pixel_values (B, C, H, W) -> last_hidden_state (B, 1 + N, hidden)."""
        return self.layernorm(self.hidden(pixel_values))

    def pool(self, last_hidden_state: torch.Tensor) -> torch.Tensor:
        """transformers' ``pooler_output``: (B, 1 + N, hidden) -> (B, pooler_output_size)."""
        if self.pooler is None:
            raise ValueError("this ViT checkpoint has no pooler weights (vit.pooler.dense)")
        return self.pooler(last_hidden_state)


class ViTForImageClassification(nn.Module):
    """ViT with a linear classifier on the final [CLS] hidden state."""

    base_model_prefix = "vit"
    packed_modules = VIT_PACKED_MODULES

    def __init__(self, config: ViTConfig) -> None:
        super().__init__()
        self.config = config
        self.vit = ViTModel(config, add_pooling_layer=False)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """pixel_values (B, C, H, W) -> logits (B, num_labels)."""
        cls = self.vit.hidden(pixel_values, first_only=True)[:, 0]  # (B, C)
        return self.classifier(self.vit.layernorm(cls))
