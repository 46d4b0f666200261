"""The model runner: owns the model and runs forward passes without autograd."""

from __future__ import annotations

import torch

from tokenmill.generation.cuda_graphs import DecodeGraphs
from tokenmill.generation.scheduler import ScheduledRequest
from tokenmill.layers.attention import DenseAttention, DenseKVCache
from tokenmill.layers.paged_attention import PagedAttention, PagedKVCache, PrefillChunk
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
        #: captured decode steps (generation/cuda_graphs.py), set by the engine on CUDA
        self.graphs: DecodeGraphs | None = None

    @property
    def max_model_len(self) -> int:
        return self.config.max_position_embeddings

    def new_cache(self, batch: int, max_len: int) -> DenseKVCache:
        c = self.config
        return DenseKVCache(c.num_layers, batch, c.num_kv_heads, c.head_dim, max_len, self.dtype, self.device)

    def kv_bytes_per_block(self, block_size: int) -> int:
        c = self.config
        return PagedKVCache.bytes_per_block(c.num_layers, block_size, c.num_kv_heads, c.head_dim, self.dtype)

    def new_paged_cache(self, num_blocks: int, block_size: int) -> PagedKVCache:
        c = self.config
        return PagedKVCache(
            c.num_layers, num_blocks, block_size, c.num_kv_heads, c.head_dim, self.dtype, self.device
        )

    def execute(
        self, cache: PagedKVCache, scheduled: list[ScheduledRequest], block_tables: dict[str, list[int]]
    ) -> tuple[torch.Tensor, list[ScheduledRequest]]:
        """One forward pass over every scheduled token. Returns the logits of the
        requests that sample this step, and those requests in the same order."""
        if self.graphs is not None and self.graphs.accepts(scheduled):
            return self.graphs.run(scheduled, block_tables)
        bs = cache.block_size
        singles = [s for s in scheduled if s.num_new_tokens == 1]
        chunks = [s for s in scheduled if s.num_new_tokens > 1]
        ids: list[int] = []
        pos: list[int] = []
        slots: list[int] = []
        select: list[int] = []
        samplers: list[ScheduledRequest] = []
        prefill: list[PrefillChunk] = []
        max_pos = 0
        for s in singles + chunks:
            r, n = s.request, s.num_new_tokens
            c = r.num_computed_tokens
            table = block_tables[r.request_id]
            start = len(ids)
            ids.extend(r.all_token_ids[c : c + n])
            pos.extend(range(c, c + n))
            slots.extend(table[p // bs] * bs + p % bs for p in range(c, c + n))
            max_pos = max(max_pos, c + n - 1)
            if n > 1:
                blocks = None
                if c > 0:
                    blocks = torch.tensor(table[: -(-(c + n) // bs)], dtype=torch.long, device=self.device)
                prefill.append(PrefillChunk(start, n, c + n, blocks))
            if s.samples:
                select.append(start + n - 1)
                samplers.append(s)
        dev = self.device
        ctx = PagedAttention(
            cache, torch.tensor(slots, dtype=torch.long, device=dev), max_pos, len(singles), chunks=prefill
        )
        if singles:
            lens = [s.request.num_computed_tokens + 1 for s in singles]
            width = -(-max(lens) // bs)
            tables = [block_tables[s.request.request_id][:width] for s in singles]
            ctx.decode_tables = torch.tensor(
                [t + [0] * (width - len(t)) for t in tables], dtype=torch.long, device=dev
            )
            ctx.decode_lens = torch.tensor(lens, dtype=torch.long, device=dev)
        input_ids = torch.tensor([ids], dtype=torch.long, device=dev)
        positions = torch.tensor([pos], dtype=torch.long, device=dev)
        logits = self.forward(input_ids, positions, ctx, torch.tensor(select, dtype=torch.long, device=dev))
        return logits, samplers

    @torch.inference_mode()
    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        ctx: DenseAttention | PagedAttention,
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
