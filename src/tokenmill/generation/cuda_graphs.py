"""Decode steps replayed from CUDA graphs.

A decode step of a small model on a GPU is launch-bound: a 1B Llama issues a few hundred
kernels per token, each taking a few microseconds of Python and driver time, while the
GPU needs well under a millisecond to read the weights. A CUDA graph records those
launches once and replays them with a single call.

A graph replays fixed shapes from fixed addresses, so every step that uses one works in
persistent buffers:

- one graph per batch size in ``graph_batch_sizes`` (1, 2, 4, 8, then every multiple of
  8); a step of R single-token rows replays the smallest graph with B >= R rows;
- inputs (token ids, positions, KV slots, block tables, context lengths) live in device
  buffers sized for the largest graph, filled each step from pinned host buffers with
  asynchronous copies: no host synchronisation until the sampler reads the tokens;
- the B - R padding rows decode token 0 at position 0 into a scratch block of the KV
  cache that the block pool never hands out, so they cannot touch a request's keys;
- block tables are as wide as the longest context the engine allows; each step copies
  only the columns the longest row uses: the attention kernel reads no further than each
  row's length.

Steps with prompt chunks, or more rows than the largest graph, run eagerly.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any

import torch

from tokenmill.generation.scheduler import ScheduledRequest
from tokenmill.layers.paged_attention import PagedAttention, PagedKVCache

log = logging.getLogger(__name__)

#: decode batches larger than this run eagerly (vLLM's default capture limit too)
MAX_GRAPH_BATCH = 256


def graph_batch_sizes(max_num_seqs: int) -> list[int]:
    """The batch sizes to capture: 1, 2, 4, 8, 16, 24, ... up to the first that holds
    ``max_num_seqs`` rows (or ``MAX_GRAPH_BATCH``)."""
    top = min(max_num_seqs, MAX_GRAPH_BATCH)
    candidates = [1, 2, 4, *range(8, MAX_GRAPH_BATCH + 1, 8)]
    return [b for b in candidates if b < top] + [next(b for b in candidates if b >= top)]


def wanted(
    device: torch.device, head_dim: int, v_head_dim: int, block_size: int, enforce_eager: bool
) -> tuple[bool, str]:
    """Whether decode steps on ``device`` should replay graphs, and why not if not."""
    if enforce_eager:
        return False, "enforce_eager is set"
    if device.type != "cuda":
        return False, "CUDA graphs need a CUDA device"
    from tokenmill.layers import triton_kernels

    if not triton_kernels.supports(head_dim, v_head_dim, block_size):
        # The PyTorch reference path gathers every block of the padded tables: a graph of it
        # would attend over the longest allowed context on every step.
        return False, "the paged decode kernel needs Triton, equal power-of-two head sizes and block size"
    return True, ""


class _Captured:
    """What ``capture`` returns: a graph to replay and the output tensor it writes."""

    def __init__(self, replay: Callable[[], None], out: torch.Tensor) -> None:
        self.replay = replay
        self.out = out


def capture_cuda(fn: Callable[[], torch.Tensor], pool: Any) -> _Captured:
    # Warm up on a side stream, as PyTorch asks: kernels compile and lazy state is built
    # outside the capture.
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        out = fn()
    return _Captured(graph.replay, out)


def capture_eager(fn: Callable[[], torch.Tensor], pool: Any) -> _Captured:
    """Stands in for ``capture_cuda`` where there is no GPU (tests): the same persistent
    buffers and padding, each replay running ``fn`` again into the same output tensor."""
    out = fn().clone()
    return _Captured(lambda: out.copy_(fn()), out)


#: how graphs are recorded; tests swap in ``capture_eager`` to run this module on a CPU
capture: Callable[[Callable[[], torch.Tensor], Any], _Captured] = capture_cuda


class DecodeGraphs:
    """Captured decode steps for a runner's model over one paged KV cache."""

    def __init__(
        self,
        forward: Callable[..., torch.Tensor],
        cache: PagedKVCache,
        scratch_block: int,
        max_model_len: int,
        sizes: list[int],
    ) -> None:
        if not 0 <= scratch_block < cache.num_blocks:
            raise ValueError(
                f"scratch block {scratch_block} is outside the cache's {cache.num_blocks} blocks"
            )
        self.cache = cache
        self.block_size = bs = cache.block_size
        self.scratch_slot = scratch_block * bs
        self.scratch_block = scratch_block
        self.max_model_len = max_model_len
        self.sizes = sorted(set(sizes))
        self.max_batch = self.sizes[-1]
        B, W = self.max_batch, -(-max_model_len // bs)
        dev = cache.k[0].device
        pin = dev.type == "cuda"
        i64 = torch.long
        # host staging (pinned so the copies are asynchronous) and the device buffers
        # token ids, positions, slots and context lengths of every row, in one buffer: one
        # copy a step
        self._h_rows = torch.zeros(4, B, dtype=i64, pin_memory=pin)
        # flat: each step views it as (B, width) for the columns it uses, so the copy to the
        # device reads one contiguous piece
        self._h_tables = torch.zeros(B * W, dtype=i64, pin_memory=pin)
        self._rows = torch.zeros(4, B, dtype=i64, device=dev)
        self._rows[2] = self.scratch_slot
        self._rows[3] = 1
        self.ids, self.pos = self._rows[0:1], self._rows[1:2]  # (1, B) as the model takes them
        self.slots, self.lens = self._rows[2], self._rows[3]
        self.tables = torch.full((B, W), scratch_block, dtype=i64, device=dev)
        self.select = torch.arange(B, dtype=i64, device=dev)
        self.device = dev
        self._forward = forward
        self._graphs: dict[int, _Captured] = {}
        t0 = time.perf_counter()
        # Streams, events and captures belong to the current device: make it the model's
        # (on cuda:1 a capture on cuda:0's stream would record nothing).
        with self._on_device(), torch.inference_mode():
            # the host may not refill the staging buffers while their last copy is in flight
            self._copied = torch.cuda.Event() if pin else None
            pool = torch.cuda.graph_pool_handle() if pin else None
            # Largest first: the smaller graphs reuse the memory the largest one reserved.
            for b in reversed(self.sizes):
                self._graphs[b] = capture(self._step_fn(b), pool)
            self._check_replay()
        self.capture_s = time.perf_counter() - t0
        log.info(
            "captured %d decode graphs (batch %s) in %.2f s", len(self.sizes), self.sizes, self.capture_s
        )

    def _on_device(self) -> Any:
        return torch.cuda.device(self.device) if self.device.type == "cuda" else contextlib.nullcontext()

    def _check_replay(self) -> None:
        """Replay the smallest graph on an input it was not captured with and compare it
        with an eager step: a graph that recorded nothing would return the logits of the
        capture run. Raises RuntimeError (the engine then steps eagerly)."""
        b = self.sizes[0]
        self._rows[0, :b] = 1  # token 1 instead of 0, still into the scratch block
        try:
            graph = self._graphs[b]
            graph.replay()
            got = graph.out.float().clone()
            want = self._step_fn(b)().float()
        finally:
            self._rows[0, :b] = 0
        if not torch.allclose(got, want, rtol=1e-2, atol=1e-2):
            raise RuntimeError(
                f"a replayed decode graph disagrees with the eager step (max difference "
                f"{float((got - want).abs().max()):.3g})"
            )

    def _step_fn(self, b: int) -> Callable[[], torch.Tensor]:
        def step() -> torch.Tensor:
            ctx = PagedAttention(
                self.cache,
                self.slots[:b],
                # sized for the longest context up front: the rope table never grows in a replay
                self.max_model_len - 1,
                b,
                decode_tables=self.tables[:b],
                decode_lens=self.lens[:b],
            )
            return self._forward(self.ids[:, :b], self.pos[:, :b], ctx, self.select[:b])

        return step

    def accepts(self, scheduled: list[ScheduledRequest]) -> bool:
        return 0 < len(scheduled) <= self.max_batch and all(s.num_new_tokens == 1 for s in scheduled)

    def run(
        self, scheduled: list[ScheduledRequest], block_tables: dict[str, list[int]]
    ) -> tuple[torch.Tensor, list[ScheduledRequest]]:
        """One decode step of single-token rows (``accepts``); same contract as
        ``ModelRunner.execute``. The logits are a view of the graph's output, valid until
        the next step."""
        R = len(scheduled)
        B = next(b for b in self.sizes if b >= R)
        bs = self.block_size
        if self._copied is not None:
            self._copied.synchronize()
        ids, pos, slots, lens = self._h_rows.numpy()
        used = []
        for s in scheduled:
            r = s.request
            p = r.num_computed_tokens
            n = p // bs + 1
            if p >= self.max_model_len or n > len(block_tables[r.request_id]):
                raise ValueError(
                    f"request {r.request_id} decodes position {p} but owns "
                    f"{len(block_tables[r.request_id])} blocks of {bs} (max_model_len {self.max_model_len})"
                )
            used.append(n)
        width = max(used)
        tables = self._h_tables.numpy()[: B * width].reshape(B, width)
        samplers: list[ScheduledRequest] = []
        rows: list[int] = []
        for i, (s, n) in enumerate(zip(scheduled, used)):
            r = s.request
            p = r.num_computed_tokens
            table = block_tables[r.request_id]
            ids[i] = r.all_token_ids[p]
            pos[i] = p
            slots[i] = table[p // bs] * bs + p % bs
            lens[i] = p + 1
            tables[i, :n] = table[:n]
            if s.samples:
                samplers.append(s)
                rows.append(i)
        # padding rows: token 0 at position 0, written to and read from the scratch block
        ids[R:B] = 0
        pos[R:B] = 0
        slots[R:B] = self.scratch_slot
        lens[R:B] = 1
        tables[R:B, 0] = self.scratch_block
        nb = self._copied is not None
        graph = self._graphs[B]
        with self._on_device(), torch.inference_mode():
            self._rows.copy_(self._h_rows, non_blocking=nb)
            self.tables[:B, :width].copy_(self._h_tables[: B * width].view(B, width), non_blocking=nb)
            if self._copied is not None:
                self._copied.record()
            graph.replay()
        logits = graph.out[:R]
        if len(rows) < R:
            logits = logits.index_select(0, torch.tensor(rows, dtype=torch.long, device=logits.device))
        return logits, samplers
