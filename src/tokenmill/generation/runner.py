"""The model runner: owns the model and runs forward passes without autograd."""

from __future__ import annotations

import torch

from tokenmill.layers.attention import DenseAttention, DenseKVCache
from tokenmill.models.config import DecoderConfig


class ModelRunner:
    def __init__(
        self, model: torch.nn.Module, config: DecoderConfig, device: torch.device, dtype: torch.dtype
    ):
        self.model = model
        self.config = config
        self.device = device
        self.dtype = dtype
        self._cpu_bf16 = device.type == "cpu" and dtype == torch.bfloat16

    @property
    def max_model_len(self) -> int:
        return self.config.max_position_embeddings

    def new_cache(self, batch: int, max_len: int) -> DenseKVCache:
        c = self.config
        return DenseKVCache(c.num_layers, batch, c.num_kv_heads, c.head_dim, max_len, self.dtype, self.device)

    @torch.inference_mode()
    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        ctx: DenseAttention,
        select: str | torch.Tensor | None = "last",
    ) -> torch.Tensor:
        if self._cpu_bf16 and input_ids.numel() <= 2:
            # For one or two rows, ATen's own bf16 GEMV streams weights about twice as fast
            # as oneDNN's; from four rows on oneDNN wins by far.
            # (torch.backends.mkldnn.flags() would also reset TF32 settings and warn each step.)
            prev = torch._C._get_mkldnn_enabled()
            torch._C._set_mkldnn_enabled(False)
            try:
                return self.model(input_ids, positions, ctx, select)
            finally:
                torch._C._set_mkldnn_enabled(prev)
        return self.model(input_ids, positions, ctx, select)

    @torch.inference_mode()
    def full_logits(self, input_ids: list[int]) -> torch.Tensor:
        """Logits at every position of one sequence, with no cache (the reference path)."""
        ids = torch.tensor([input_ids], dtype=torch.long, device=self.device)
        pos = torch.arange(len(input_ids), device=self.device).unsqueeze(0)
        ctx = DenseAttention(None, 0, len(input_ids), len(input_ids) - 1)
        return self.model(ids, pos, ctx, None)[0]
