"""What generation returns: plain dataclasses, no tensors."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class RequestMetrics:
    """Timings of one request, in seconds, measured on the host around synchronised steps.

    Attributes:
        queue_s: arrival to first scheduled (time spent waiting for a slot).
        ttft_s: arrival to first generated token (includes queueing and prefill).
        tpot_s: mean time per output token after the first.
        prefill_tokens_per_s: prompt tokens / prefill time.
        decode_tokens_per_s: tokens after the first / time after the first.
        peak_memory_bytes: peak GPU memory allocated on CUDA, peak process RSS on CPU.
    """

    arrival_time: float = 0.0
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    finished_time: float | None = None
    prompt_tokens: int = 0
    output_tokens: int = 0
    prefill_s: float = 0.0
    queue_s: float | None = None
    ttft_s: float | None = None
    tpot_s: float | None = None
    prefill_tokens_per_s: float | None = None
    decode_tokens_per_s: float | None = None
    e2e_s: float | None = None
    peak_memory_bytes: int = 0

    def finalize(self) -> None:
        if self.first_scheduled_time is not None:
            self.queue_s = self.first_scheduled_time - self.arrival_time
        if self.first_token_time is not None:
            self.ttft_s = self.first_token_time - self.arrival_time
        if self.prefill_s > 0:
            self.prefill_tokens_per_s = self.prompt_tokens / self.prefill_s
        if self.finished_time is not None:
            self.e2e_s = self.finished_time - self.arrival_time
            if self.first_token_time is not None and self.output_tokens > 1:
                decode_s = self.finished_time - self.first_token_time
                self.tpot_s = decode_s / (self.output_tokens - 1)
                self.decode_tokens_per_s = (self.output_tokens - 1) / decode_s if decode_s > 0 else None


@dataclass
class Logprob:
    token_id: int
    logprob: float
    #: the top-k alternatives (token id -> logprob), including the chosen token when it is among them
    top_logprobs: dict[int, float] = field(default_factory=dict)


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None  # "stop" | "length" | None while running
    #: the stop string or token id that ended generation, when one did
    stop_reason: str | int | None = None
    cumulative_logprob: float | None = None
    logprobs: list[Logprob] | None = None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    metrics: RequestMetrics


@dataclass
class BeamHypothesis:
    text: str
    token_ids: list[int]
    cumulative_logprob: float
    #: cumulative_logprob / generated_length ** length_penalty; hypotheses are sorted by it
    score: float
    finish_reason: str


@dataclass
class BeamSearchOutput:
    prompt: str | None
    prompt_token_ids: list[int]
    sequences: list[BeamHypothesis]
