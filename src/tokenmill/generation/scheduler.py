"""The scheduler: which requests run this step, and how many tokens each computes.

There are no prefill and decode phases. Each step has one token budget; running
requests are served first (oldest first), then waiting ones are admitted while the
budget, ``max_num_seqs`` and the KV pool allow. A request computes the tokens it has
not computed yet: a whole prompt, a chunk of it, or the one token sampled last step.
When the pool runs dry the newest running request is preempted: its blocks are freed
and it is recomputed later from its prompt and the tokens it already generated.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from tokenmill.generation.kv_manager import KVCacheManager
from tokenmill.generation.request import Request, RequestStatus


@dataclass
class SchedulerConfig:
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 512
    max_model_len: int = 2048

    def __post_init__(self) -> None:
        for name in ("max_num_seqs", "max_num_batched_tokens", "max_model_len"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")


@dataclass
class ScheduledRequest:
    request: Request
    num_new_tokens: int
    #: True when this step computes the request's last uncomputed token, so it samples
    samples: bool


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledRequest] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)
    num_batched_tokens: int = 0
    #: prompt tokens looked up in the prefix cache this step, and how many were found
    prefix_queries: int = 0
    prefix_hits: int = 0
    #: requests scheduled for the first time this step
    first_scheduled: list[Request] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not self.scheduled


class Scheduler:
    def __init__(self, config: SchedulerConfig, kv: KVCacheManager) -> None:
        self.config = config
        self.kv = kv
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.num_preemptions = 0

    def add(self, req: Request) -> None:
        req.status = RequestStatus.WAITING
        self.waiting.append(req)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.config.max_num_batched_tokens
        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            n = min(req.num_tokens - req.num_computed_tokens, budget)
            while not self.kv.allocate_slots(req, n):
                victim = self.running.pop()
                self._preempt(victim)
                out.preempted.append(victim)
                if victim is req:
                    break
            if req.status is not RequestStatus.RUNNING:
                break
            out.scheduled.append(ScheduledRequest(req, n, req.num_computed_tokens + n == req.num_tokens))
            budget -= n
            i += 1
        # Admitting new work in a step that had to preempt would only thrash.
        while not out.preempted and self.waiting and budget > 0:
            if len(self.running) >= self.config.max_num_seqs:
                break
            req = self.waiting[0]
            cached = self.kv.find_cached_prefix(req)
            num_cached = len(cached) * self.kv.block_size
            n = min(req.num_tokens - num_cached, budget)
            if not self.kv.allocate_slots(req, n, cached):
                break
            self.waiting.popleft()
            req.num_computed_tokens = num_cached
            req.status = RequestStatus.RUNNING
            self.running.append(req)
            if not req.first_scheduled:
                req.first_scheduled = True
                req.num_cached_tokens = num_cached
                out.first_scheduled.append(req)
            out.prefix_queries += req.num_tokens
            out.prefix_hits += num_cached
            out.scheduled.append(ScheduledRequest(req, n, num_cached + n == req.num_tokens))
            budget -= n
        out.num_batched_tokens = self.config.max_num_batched_tokens - budget
        return out

    def _preempt(self, req: Request) -> None:
        self.kv.free(req)
        req.num_computed_tokens = 0
        req.status = RequestStatus.PREEMPTED
        req.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(req)

    def update(self, out: SchedulerOutput) -> None:
        """Advance every scheduled request by the tokens it computed this step."""
        for s in out.scheduled:
            s.request.num_computed_tokens += s.num_new_tokens
            self.kv.cache_full_blocks(s.request)

    def finish(self, req: Request) -> None:
        """Remove a request (finished or aborted) wherever it is and free its blocks."""
        if req.status is RequestStatus.RUNNING:
            self.running.remove(req)
        elif req.status in (RequestStatus.WAITING, RequestStatus.PREEMPTED) and req in self.waiting:
            self.waiting.remove(req)  # (a request the engine never queued is not there)
        req.status = RequestStatus.FINISHED
        self.kv.forget(req)

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)
