"""What one engine step did, for metrics (plain data, filled by the engine)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class FinishedRequestStats:
    finish_reason: str
    e2e_s: float
    tpot_s: float | None
    prompt_tokens: int
    generation_tokens: int


@dataclass
class StepStats:
    num_running: int = 0
    num_waiting: int = 0
    kv_usage: float = 0.0
    kv_blocks_used: int = 0
    #: prompt tokens of requests first scheduled this step (each request's prompt once)
    prompt_tokens: int = 0
    generation_tokens: int = 0
    num_preemptions: int = 0
    prefix_cache_queries: int = 0
    prefix_cache_hits: int = 0
    ttfts: list[float] = field(default_factory=list)
    inter_token_latencies: list[float] = field(default_factory=list)
    queue_times: list[float] = field(default_factory=list)
    finished: list[FinishedRequestStats] = field(default_factory=list)


@dataclass
class EngineStats:
    """A snapshot of the engine's state."""

    num_running: int
    num_waiting: int
    kv_blocks_total: int
    kv_blocks_used: int
    kv_usage: float
    num_preemptions: int
