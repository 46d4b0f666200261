"""Prometheus metrics of one server, named after vLLM's with a ``tokenmill:`` prefix.

Each app owns its ``CollectorRegistry``: two servers in one process never share
counters. The engine feeds the metrics from its own thread after every step (the
prometheus client is thread-safe); gauges are read again from ``engine.stats()`` at
each scrape so an idle engine reads correctly.
"""

from __future__ import annotations

import logging
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

logger = logging.getLogger("tokenmill.server")

CONTENT_TYPE = CONTENT_TYPE_LATEST

# Seconds: from a millisecond (a small model's decode step) to minutes (a long queue).
_LATENCY_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75,
    1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0, 320.0, 640.0,
)  # fmt: skip
_TOKEN_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000, 100000)


class ServerMetrics:
    """The server's metrics and the engine listener that feeds them."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()

        def hist(name: str, doc: str, buckets: tuple[float, ...] = _LATENCY_BUCKETS) -> Histogram:
            return Histogram(f"tokenmill:{name}", doc, buckets=buckets, registry=r)

        def gauge(name: str, doc: str) -> Gauge:
            return Gauge(f"tokenmill:{name}", doc, registry=r)

        def counter(name: str, doc: str, labels: tuple[str, ...] = ()) -> Counter:
            return Counter(f"tokenmill:{name}", doc, labels, registry=r)

        self.ttft = hist("time_to_first_token_seconds", "Arrival to first generated token.")
        self.itl = hist("inter_token_latency_seconds", "Time between consecutive tokens of a sequence.")
        self.tpot = hist("time_per_output_token_seconds", "Mean time per output token after the first.")
        self.e2e = hist("e2e_request_latency_seconds", "Arrival to the request's end.")
        self.queue = hist("request_queue_time_seconds", "Arrival to first scheduled.")
        self.req_prompt = hist("request_prompt_tokens", "Prompt tokens per finished request.", _TOKEN_BUCKETS)
        self.req_gen = hist(
            "request_generation_tokens", "Generated tokens per finished request.", _TOKEN_BUCKETS
        )

        self.running = gauge("num_requests_running", "Requests in the running batch.")
        self.waiting = gauge("num_requests_waiting", "Requests waiting to be scheduled.")
        self.kv_usage = gauge("kv_cache_usage_perc", "Fraction of KV cache blocks in use (0 to 1).")
        self.kv_used = gauge("kv_cache_blocks_used", "KV cache blocks referenced by requests.")
        self.kv_total = gauge("kv_cache_blocks_total", "KV cache blocks in the pool.")

        self.prompt_tokens = counter(
            "prompt_tokens_total", "Prompt tokens computed (prefix-cache hits excluded)."
        )
        self.generation_tokens = counter("generation_tokens_total", "Tokens generated.")
        self.preemptions = counter("num_preemptions_total", "Requests preempted to free KV cache blocks.")
        self.prefix_queries = counter(
            "prefix_cache_queries_total", "Prompt tokens looked up in the prefix cache."
        )
        self.prefix_hits = counter("prefix_cache_hits_total", "Prompt tokens found in the prefix cache.")
        self.success = counter(
            "request_success_total", "Finished requests by finish reason.", labels=("finished_reason",)
        )
        self.filter_actions = counter(
            "filter_actions_total",
            "Output filter decisions: spans masked, outputs refused, matches flagged.",
            labels=("filter", "action"),
        )

    def on_step(self, s: Any) -> None:
        """Engine listener: fold one step's StepStats in. Runs on the engine thread."""
        try:
            self.running.set(s.num_running)
            self.waiting.set(s.num_waiting)
            self.kv_usage.set(s.kv_usage)
            self.kv_used.set(s.kv_blocks_used)
            self.prompt_tokens.inc(s.prompt_tokens)
            self.generation_tokens.inc(s.generation_tokens)
            self.preemptions.inc(s.num_preemptions)
            self.prefix_queries.inc(s.prefix_cache_queries)
            self.prefix_hits.inc(s.prefix_cache_hits)
            for v in s.ttfts:
                self.ttft.observe(v)
            for v in s.inter_token_latencies:
                self.itl.observe(v)
            for v in s.queue_times:
                self.queue.observe(v)
            for f in s.finished:
                self.success.labels(finished_reason=str(f.finish_reason)).inc()
                self.e2e.observe(f.e2e_s)
                if f.tpot_s is not None:
                    self.tpot.observe(f.tpot_s)
                self.req_prompt.observe(f.prompt_tokens)
                self.req_gen.observe(f.generation_tokens)
        except Exception:
            # A metrics bug must never stop the engine.
            logger.exception("failed to record engine step metrics")

    def refresh(self, stats: Any) -> None:
        """Set the gauges from ``engine.stats()``."""
        self.running.set(stats.num_running)
        self.waiting.set(stats.num_waiting)
        self.kv_usage.set(stats.kv_usage)
        self.kv_used.set(stats.kv_blocks_used)
        self.kv_total.set(stats.kv_blocks_total)

    def render(self) -> bytes:
        return generate_latest(self.registry)
