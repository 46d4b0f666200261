"""Generation over a dense KV cache: prefill the batch in one pass, then decode token by token.

Prompts of different lengths are left-padded so every row writes its next key at the
same cache offset. Finished rows leave the batch at once. This is the reference path
for every faster engine.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from tokenmill.generation.outputs import Logprob, RequestMetrics
from tokenmill.generation.runner import ModelRunner
from tokenmill.generation.sampler import SamplingBatch
from tokenmill.generation.sampling_params import SamplingParams
from tokenmill.generation.stop import StopStringMatcher
from tokenmill.layers.attention import DenseAttention
from tokenmill.tokenization.detokenizer import IncrementalDetokenizer
from tokenmill.tokenization.tokenizer import Tokenizer


@dataclass
class Sequence:
    """One generated sequence (a request with n > 1 has n of them)."""

    request_index: int
    sample_index: int
    prompt_ids: list[int]
    params: SamplingParams
    metrics: RequestMetrics
    generator: torch.Generator | None = None
    output_ids: list[int] = field(default_factory=list)
    text: str = ""
    logprobs: list[Logprob] | None = None
    cumulative_logprob: float = 0.0
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    detok: IncrementalDetokenizer | None = None
    stops: StopStringMatcher | None = None
    last_token_time: float = 0.0


@dataclass
class StepEvent:
    seq: Sequence
    delta: str
    finished: bool


def generate_batch(
    runner: ModelRunner, tokenizer: Tokenizer, eos_ids: list[int], seqs: list[Sequence]
) -> Iterator[StepEvent]:
    """Run ``seqs`` to completion, yielding text deltas as they are decoded."""
    device = runner.device
    B = len(seqs)
    lengths = [len(s.prompt_ids) for s in seqs]
    L = max(lengths)
    max_new = max(s.params.max_tokens for s in seqs)
    for s in seqs:
        s.detok = IncrementalDetokenizer(tokenizer, s.prompt_ids, s.params.skip_special_tokens)
        s.stops = StopStringMatcher(s.params.stop, s.params.include_stop_str_in_output)
        if s.params.logprobs is not None:
            s.logprobs = []

    ids = torch.zeros(B, L, dtype=torch.long)
    pos = torch.zeros(B, L, dtype=torch.long)
    for r, s in enumerate(seqs):
        n = lengths[r]
        ids[r, L - n :] = torch.tensor(s.prompt_ids)
        pos[r, L - n :] = torch.arange(n)
    key_valid = None
    if min(lengths) != L:
        key_valid = torch.arange(L).unsqueeze(0) >= torch.tensor([L - n for n in lengths]).unsqueeze(1)
        key_valid = key_valid.to(device)
    cache = runner.new_cache(B, L + max_new)
    sampling = SamplingBatch(
        [s.params for s in seqs],
        [s.prompt_ids for s in seqs],
        runner.config.vocab_size,
        eos_ids,
        device,
        [s.generator for s in seqs],
    )

    t0 = time.perf_counter()
    ctx = DenseAttention(cache, 0, L, L - 1, key_valid)
    logits = runner.forward(ids.to(device), pos.to(device), ctx)
    active = list(seqs)
    next_pos = list(lengths)
    step = 0
    while True:
        result = sampling.sample(logits, [len(s.output_ids) for s in active])
        now = time.perf_counter()
        keep: list[int] = []
        for r, s in enumerate(active):
            m = s.metrics
            if m.first_token_time is None:
                m.first_token_time = now
                m.prefill_s = now - t0
            delta, done = _emit(s, _append(s, result.tokens[r], result.logprobs[r], eos_ids))
            yield StepEvent(s, delta, done)
            if done:
                m.finished_time = now
            else:
                keep.append(r)
        if not keep:
            return
        if len(keep) != len(active):
            idx = torch.tensor(keep, dtype=torch.long, device=device)
            cache.select_rows(idx)
            sampling.select_rows(keep)
            if key_valid is not None:
                key_valid = key_valid.index_select(0, idx)
            active = [active[r] for r in keep]
            next_pos = [next_pos[r] for r in keep]
        step += 1
        tokens = torch.tensor([[s.output_ids[-1]] for s in active], dtype=torch.long, device=device)
        positions = torch.tensor([[p] for p in next_pos], dtype=torch.long, device=device)
        next_pos = [p + 1 for p in next_pos]
        if key_valid is not None:
            key_valid = torch.cat([key_valid, torch.ones(len(active), 1, dtype=torch.bool, device=device)], 1)
        ctx = DenseAttention(cache, L + step - 1, 1, max(next_pos) - 1, key_valid)
        logits = runner.forward(tokens, positions, ctx)


def _append(s: Sequence, token: int, logprob, eos_ids: list[int]) -> bool:
    """Record ``token``; return True when the sequence is finished."""
    p = s.params
    s.output_ids.append(token)
    if logprob is not None:
        chosen, top = logprob
        s.cumulative_logprob += chosen
        assert s.logprobs is not None
        s.logprobs.append(Logprob(token, chosen, dict(top)))
    n = len(s.output_ids)
    if n >= p.min_tokens:
        if not p.ignore_eos and token in eos_ids:
            s.finish_reason, s.stop_reason = "stop", None
            return True
        if p.stop_token_ids and token in p.stop_token_ids:
            s.finish_reason, s.stop_reason = "stop", token
            return True
    if n >= p.max_tokens:
        s.finish_reason = "length"
        return True
    return False


def _emit(s: Sequence, done: bool) -> tuple[str, bool]:
    """Detokenize the newest token and run the stop strings.

    Returns the text safe to show now and whether the sequence is finished (a stop
    string can finish it).
    """
    assert s.detok is not None and s.stops is not None
    stopped_by_token = done and s.finish_reason == "stop"
    # The text of an EOS or stop id is not part of the output (as in vLLM).
    delta = (
        "" if stopped_by_token and not s.params.include_stop_str_in_output else s.detok.step(s.output_ids[-1])
    )
    if done:
        delta += s.detok.flush()
    out = s.stops.feed(delta, can_stop=len(s.output_ids) >= s.params.min_tokens)
    if s.stops.matched is not None:
        if not stopped_by_token:
            s.finish_reason, s.stop_reason = "stop", s.stops.matched
        done = True
    elif done:
        out += s.stops.flush()
    s.text += out
    return out, done
