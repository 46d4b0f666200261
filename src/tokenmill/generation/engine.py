"""The continuous-batching engine: a scheduler over a paged KV cache, one step at a time.

``LLMEngine`` is synchronous and single-threaded: ``add_request``, then ``step`` until
nothing is left. Each step schedules tokens under one budget, runs one forward pass over
all of them, samples for the requests whose tokens are all computed, and turns the new
tokens into text. A request with ``n`` samples runs as ``n`` sequences that share the
prompt's cached blocks.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import torch

from tokenmill.generation import cuda_graphs
from tokenmill.generation.dense_engine import Sequence, _append, _emit
from tokenmill.generation.errors import check_context
from tokenmill.generation.kv_manager import KVCacheManager, cdiv
from tokenmill.generation.outputs import CompletionOutput, RequestMetrics, RequestOutput
from tokenmill.generation.request import Request
from tokenmill.generation.runner import ModelRunner
from tokenmill.generation.sampler import SamplingBatch
from tokenmill.generation.sampling_params import SamplingParams
from tokenmill.generation.scheduler import Scheduler, SchedulerConfig
from tokenmill.generation.stats import EngineStats, FinishedRequestStats, StepStats
from tokenmill.generation.stop import StopStringMatcher
from tokenmill.tokenization.detokenizer import IncrementalDetokenizer
from tokenmill.utils.devices import available_memory_bytes

log = logging.getLogger(__name__)

# Share of free memory the KV cache takes when no budget is given, and the cap on CPU
# (where the pool is ordinary RAM that the rest of the machine needs too).
_CUDA_KV_SHARE = 0.8
_CPU_KV_SHARE = 0.25
_CPU_KV_CAP = 4 << 30


@dataclass
class EngineConfig:
    """How to load the model and size the engine (see ``tokenmill serve --help``)."""

    model: str | None = None
    dtype: str | None = None
    device: str | None = None
    revision: str | None = None
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 512
    max_model_len: int | None = None
    block_size: int = 16
    kv_cache_memory: int | None = None
    enable_prefix_caching: bool = True
    max_waiting: int | None = None
    #: quantization of the linear layers: "int8", "int4", "w4a8", "w8a8", "gguf" or None
    quantization: str | None = None
    #: run CUDA decode steps eagerly instead of replaying captured CUDA graphs
    enforce_eager: bool = False

    def __post_init__(self) -> None:
        from tokenmill.layers.quantized import check_quantization

        self.quantization = check_quantization(self.quantization)
        for name in ("max_num_seqs", "max_num_batched_tokens", "block_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        for name in ("max_model_len", "kv_cache_memory"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a positive integer or None, got {value!r}")
        if not isinstance(self.enforce_eager, bool):
            raise ValueError(f"enforce_eager must be True or False, got {self.enforce_eager!r}")
        if self.max_waiting is not None and (not isinstance(self.max_waiting, int) or self.max_waiting < 0):
            raise ValueError(f"max_waiting must be an integer >= 0 or None, got {self.max_waiting!r}")


@dataclass(eq=False)
class _Group:
    """One user request: its ``n`` sequences and their shared metrics."""

    request_id: str
    prompt: str | None
    prompt_ids: list[int]
    params: SamplingParams
    metrics: RequestMetrics
    requests: list[Request]
    deadline: float | None = None
    num_finished: int = 0
    #: samples 2..n not yet handed to the scheduler (they wait for the prompt's blocks)
    siblings_pending: bool = False

    @property
    def finished(self) -> bool:
        return self.num_finished == len(self.requests)


class LLMEngine:
    def __init__(self, loaded: Any, config: EngineConfig) -> None:
        self.loaded = loaded
        self.config = config
        self.tokenizer = loaded.tokenizer
        self.model_config = loaded.config
        param = next(loaded.model.parameters())
        self.device, self.dtype = param.device, param.dtype
        self.runner = ModelRunner(loaded.model, loaded.config, self.device, self.dtype)
        self.eos_token_ids = list(loaded.config.eos_token_ids)
        self.generation_defaults = loaded.generation_defaults
        model_len = loaded.config.max_position_embeddings
        if config.max_model_len is not None and config.max_model_len > model_len:
            raise ValueError(
                f"max_model_len is {config.max_model_len} but the model's context is {model_len} tokens; "
                f"give at most {model_len}"
            )
        self.max_model_len = config.max_model_len or model_len
        bs = config.block_size
        per_block = self.runner.kv_bytes_per_block(bs)
        budget = config.kv_cache_memory
        if budget is None:
            budget = self.default_kv_memory(per_block)
        num_blocks = budget // per_block
        if num_blocks * bs < self.max_model_len:
            raise ValueError(
                f"the KV cache budget of {budget / 2**20:.1f} MiB holds {num_blocks * bs} tokens "
                f"({num_blocks} blocks of {bs}), fewer than max_model_len={self.max_model_len}; "
                f"raise the KV cache memory to at least {cdiv(self.max_model_len, bs) * per_block / 2**20:.1f} "
                "MiB or lower max_model_len"
            )
        self.kv_cache_bytes = num_blocks * per_block
        if self.device.type == "cpu":
            # Build (or load) the CPU attention kernel now, not inside the first request.
            from tokenmill.layers import cpu_kernels

            cpu_kernels.paged_decode_available(self.dtype)
        c = loaded.config
        graphs, self.graphs_reason = cuda_graphs.wanted(
            self.device, c.head_dim, c.head_dim, bs, config.enforce_eager
        )
        # With graphs the pool gets one block more than the block manager knows: padding
        # rows of a replayed batch write there.
        self.cache = self.runner.new_paged_cache(num_blocks + int(graphs), bs)
        if graphs:
            self._capture_graphs(num_blocks)
        # On CPU the pool's pages are mapped as first written (layers/paged_attention.py):
        # recycle warm blocks before growing into new memory (generation/block_pool.py).
        self.kv = KVCacheManager(
            num_blocks, bs, config.enable_prefix_caching, prefer_warm=self.device.type == "cpu"
        )
        self.scheduler = Scheduler(
            SchedulerConfig(config.max_num_seqs, config.max_num_batched_tokens, self.max_model_len), self.kv
        )
        self._groups: dict[str, _Group] = {}
        self.last_stats = StepStats()
        # Requests ended between steps (aborts), reported with the next step's stats.
        self._ended_between_steps: list[FinishedRequestStats] = []

    def _capture_graphs(self, scratch_block: int) -> None:
        sizes = cuda_graphs.graph_batch_sizes(self.config.max_num_seqs)
        try:
            self.runner.graphs = cuda_graphs.DecodeGraphs(
                self.runner.forward, self.cache, scratch_block, self.max_model_len, sizes
            )
        except RuntimeError as e:
            # A model whose forward cannot be captured still serves, eagerly.
            self.graphs_reason = f"capture failed: {e}"
            log.warning("decode steps run eagerly: CUDA graph %s", self.graphs_reason)

    @classmethod
    def from_config(cls, config: EngineConfig) -> LLMEngine:
        from tokenmill.weights.model_loader import load_model

        loaded = load_model(
            config.model,
            dtype=config.dtype,
            device=config.device,
            revision=config.revision,
            quantization=config.quantization,
        )
        return cls(loaded, config)

    def default_kv_memory(self, per_block: int) -> int:
        """A budget from free memory, but never more than every sequence at full length needs."""
        free = available_memory_bytes(self.device)
        if self.device.type == "cuda":
            budget = int(free * _CUDA_KV_SHARE)
        else:
            budget = min(int(free * _CPU_KV_SHARE), _CPU_KV_CAP)
        bs = self.config.block_size
        needed = self.config.max_num_seqs * cdiv(self.max_model_len, bs) * per_block
        # Always room for one full-length sequence, or start-up fails with a clear error.
        return max(min(budget, needed), cdiv(self.max_model_len, bs) * per_block)

    # -- requests ---------------------------------------------------------------------
    def resolve_params(self, params: SamplingParams | None, prompt_len: int) -> SamplingParams:
        """Fill ``params`` from the model's defaults and check they fit the context."""
        params = SamplingParams() if params is None else params
        if not isinstance(params, SamplingParams):
            raise TypeError(f"sampling_params must be a SamplingParams, got {type(params).__name__}")
        p = params.resolved(self.generation_defaults, self.model_config.vocab_size)
        if p.max_tokens is None:
            p.max_tokens = max(1, self.max_model_len - prompt_len)
            if p.min_tokens > p.max_tokens:
                raise ValueError(
                    f"min_tokens is {p.min_tokens} but only {p.max_tokens} tokens fit after the "
                    f"{prompt_len}-token prompt in the model's context of {self.max_model_len}"
                )
        check_context(prompt_len, p.max_tokens, self.max_model_len)
        return p

    def add_request(
        self,
        request_id: str,
        prompt_ids: list[int],
        params: SamplingParams,
        *,
        prompt: str | None = None,
        arrival_time: float | None = None,
        deadline: float | None = None,
    ) -> None:
        """Queue a request. ``params`` come from ``resolve_params``; ``deadline`` is a
        ``time.monotonic()`` value after which the request ends with reason "timeout"."""
        if request_id in self._groups:
            raise ValueError(f"request id {request_id!r} is already running")
        if params.max_tokens is None:
            raise ValueError("max_tokens is unset: pass the parameters through resolve_params first")
        check_context(len(prompt_ids), params.max_tokens, self.max_model_len)
        now = time.perf_counter() if arrival_time is None else arrival_time
        metrics = RequestMetrics(arrival_time=now, prompt_tokens=len(prompt_ids))
        group = _Group(request_id, prompt, list(prompt_ids), params, metrics, [], deadline)
        for j in range(params.n):
            gen = None
            if params.seed is not None:
                gen = torch.Generator(device=self.device)
                gen.manual_seed(params.seed + j)  # each of the n samples gets its own stream
            seq = Sequence(0, j, group.prompt_ids, params, metrics, gen)
            seq.detok = IncrementalDetokenizer(self.tokenizer, group.prompt_ids, params.skip_special_tokens)
            seq.stops = StopStringMatcher(params.stop, params.include_stop_str_in_output)
            if params.logprobs is not None:
                seq.logprobs = []
            group.requests.append(
                Request(f"{request_id}#{j}", list(prompt_ids), len(prompt_ids), now, (group, seq))
            )
        # Nothing reaches the scheduler until every sample is built, so a failure leaves no
        # orphan holding blocks. The first sample goes alone: its siblings follow once the
        # prompt is computed, and then find its blocks in the prefix cache instead of
        # computing the same prompt beside it.
        self._groups[request_id] = group
        self.scheduler.add(group.requests[0])
        group.siblings_pending = len(group.requests) > 1

    def abort(self, request_id: str) -> bool:
        """End a request now and free its blocks. Returns False when it is unknown."""
        group = self._groups.get(request_id)
        if group is None:
            return False
        self._end_group(group, "abort", time.perf_counter())
        return True

    def get_group(self, request_id: str) -> _Group | None:
        return self._groups.get(request_id)

    def has_unfinished(self) -> bool:
        return bool(self._groups)

    @property
    def num_requests(self) -> int:
        return len(self._groups)

    # -- stepping ---------------------------------------------------------------------
    def step(self) -> list[_Group]:
        """Run one engine step; returns the requests that got new output (finished ones
        included, already removed from the engine)."""
        stats = StepStats(finished=self._ended_between_steps)
        self._ended_between_steps = []
        changed: dict[str, _Group] = {}
        now = time.perf_counter()
        self._expire(now, changed, stats)
        out = self.scheduler.schedule()
        stats.num_preemptions = len(out.preempted)
        stats.prefix_cache_queries, stats.prefix_cache_hits = out.prefix_queries, out.prefix_hits
        for req in out.first_scheduled:
            group, _seq = req.payload
            if group.metrics.first_scheduled_time is None:
                group.metrics.first_scheduled_time = now
                stats.queue_times.append(now - group.metrics.arrival_time)
                stats.prompt_tokens += len(group.prompt_ids)  # once per request, as vLLM counts
        if not out.empty:
            tables = {s.request.request_id: self.kv.block_ids(s.request.request_id) for s in out.scheduled}
            logits, samplers = self.runner.execute(self.cache, out.scheduled, tables)
            self.scheduler.update(out)
            if samplers:
                self._sample(logits, [s.request for s in samplers], changed, stats)
        stats.num_running = self.scheduler.num_running
        stats.num_waiting = self.scheduler.num_waiting
        stats.kv_usage = self.kv.usage()
        stats.kv_blocks_used = self.kv.pool.num_used
        self.last_stats = stats
        return list(changed.values())

    def _sample(self, logits: torch.Tensor, reqs: list[Request], changed: dict, stats: StepStats) -> None:
        seqs: list[Sequence] = [r.payload[1] for r in reqs]
        batch = SamplingBatch(
            [s.params for s in seqs],
            [s.prompt_ids for s in seqs],
            self.model_config.vocab_size,
            self.eos_token_ids,
            self.device,
            [s.generator for s in seqs],
            outputs=[s.output_ids for s in seqs],
        )
        result = batch.sample(logits, [len(s.output_ids) for s in seqs])
        now = time.perf_counter()
        stats.generation_tokens += len(reqs)
        for req, seq, token, logprob in zip(reqs, seqs, result.tokens, result.logprobs):
            group: _Group = req.payload[0]
            req.append_token(token)
            if group.siblings_pending:
                group.siblings_pending = False
                for sibling in group.requests[1:]:
                    self.scheduler.add(sibling)
            m = group.metrics
            if m.first_token_time is None:
                m.first_token_time = now
                m.prefill_s = now - (m.first_scheduled_time or m.arrival_time)
                stats.ttfts.append(now - m.arrival_time)
            if seq.output_ids:
                stats.inter_token_latencies.append(now - seq.last_token_time)
            seq.last_token_time = now
            delta, done = _emit(seq, _append(seq, token, logprob, self.eos_token_ids))
            changed[group.request_id] = group
            if done:
                self._finish_request(group, req, now, stats)

    def _finish_request(self, group: _Group, req: Request, now: float, stats: StepStats) -> None:
        self.scheduler.finish(req)
        group.num_finished += 1
        if group.finished:
            m = group.metrics
            m.finished_time = now
            m.output_tokens = max(len(r.payload[1].output_ids) for r in group.requests)
            m.finalize()
            self._groups.pop(group.request_id, None)
            reason = req.payload[1].finish_reason or "abort"  # the sample that ended the group
            stats.finished.append(
                FinishedRequestStats(
                    reason,
                    m.e2e_s or 0.0,
                    m.tpot_s,
                    m.prompt_tokens,
                    sum(len(r.payload[1].output_ids) for r in group.requests),
                )
            )

    def _end_group(self, group: _Group, reason: str, now: float, stats: StepStats | None = None) -> None:
        """Finish every unfinished sequence of ``group`` with ``reason``."""
        if stats is None:
            stats = StepStats(finished=self._ended_between_steps)
        for req in group.requests:
            seq: Sequence = req.payload[1]
            if seq.finish_reason is None:
                seq.finish_reason = reason
                assert seq.detok is not None and seq.stops is not None
                tail = seq.stops.feed(seq.detok.flush(), can_stop=False) + seq.stops.flush()
                seq.text += tail
                self._finish_request(group, req, now, stats)

    def _expire(self, now: float, changed: dict, stats: StepStats) -> None:
        mono = time.monotonic()
        for group in [g for g in self._groups.values() if g.deadline is not None and mono >= g.deadline]:
            self._end_group(group, "timeout", now, stats)
            changed[group.request_id] = group

    # -- outputs ----------------------------------------------------------------------
    def snapshot(self, group: _Group) -> RequestOutput:
        """The request's output so far (cumulative), safe to hand to another thread."""
        completions = []
        for req in group.requests:
            s: Sequence = req.payload[1]
            completions.append(
                CompletionOutput(
                    index=s.sample_index,
                    text=s.text,
                    token_ids=list(s.output_ids),
                    finish_reason=s.finish_reason,
                    stop_reason=s.stop_reason,
                    cumulative_logprob=s.cumulative_logprob if s.logprobs is not None else None,
                    logprobs=list(s.logprobs) if s.logprobs is not None else None,
                )
            )
        return RequestOutput(
            group.request_id, group.prompt, group.prompt_ids, completions, group.finished, group.metrics
        )

    def stats(self) -> EngineStats:
        pool = self.kv.pool
        return EngineStats(
            self.scheduler.num_running,
            self.scheduler.num_waiting,
            pool.num_blocks,
            pool.num_used,
            pool.usage(),
            self.scheduler.num_preemptions,
        )
