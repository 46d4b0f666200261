"""The batched sampler: penalties, bias, temperature, top-k/top-p/min-p, then a draw.

Rows have their own parameters and their own random generator when they carry a seed,
so a seeded request draws the same noise whatever else shares the batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tokenmill.generation import logits_processors as lp
from tokenmill.generation.sampling_params import SamplingParams

#: per-row parameters, each an (R,) tensor when some row needs it and None otherwise
_ROW_PARAMS = ("greedy", "temperature", "top_k", "top_p", "min_p", "rep", "presence", "frequency")


@dataclass
class SampleResult:
    tokens: list[int]
    #: per row: (sampled token logprob, [(token, logprob), ...] top-k) or None
    logprobs: list[tuple[float, list[tuple[int, float]]] | None]


class SamplingBatch:
    """Sampling state for the rows of one batch; rows can be dropped as they finish."""

    def __init__(
        self,
        params: list[SamplingParams],
        prompts: list[list[int]],
        vocab_size: int,
        eos_ids: list[int],
        device: torch.device,
        generators: list[torch.Generator | None],
        outputs: list[list[int]] | None = None,
    ) -> None:
        """``outputs``: tokens each row already generated (a batch built mid-generation)."""
        self.params = params
        self.V = vocab_size
        self.device = device
        self.generators = generators
        self.eos_ids = eos_ids
        R = len(params)
        f32 = dict(dtype=torch.float32, device=device)
        self.all_greedy = all(p.greedy for p in params)
        self.use_top_k = any(0 < p.top_k < vocab_size for p in params)
        self.use_top_p = any(p.top_p < 1.0 for p in params)
        self.use_min_p = any(p.min_p > 0.0 for p in params)
        self.use_rep = any(p.repetition_penalty != 1.0 for p in params)
        self.use_pf = any(p.presence_penalty or p.frequency_penalty for p in params)
        # The per-row values only the processors in use read, built in one host tensor and
        # moved in one copy: each small copy to a GPU waits for the work queued before it.
        # (top-k as float32 is exact: vocabularies are far below 2**24.)
        cols: dict[str, list[float]] = {}
        if not self.all_greedy:
            cols["greedy"] = [float(p.greedy) for p in params]
            cols["temperature"] = [1.0 if p.greedy else p.temperature for p in params]
        if self.use_top_k:
            cols["top_k"] = [float(p.top_k if p.top_k > 0 else vocab_size) for p in params]
        if self.use_top_p:
            cols["top_p"] = [p.top_p for p in params]
        if self.use_min_p:
            cols["min_p"] = [p.min_p for p in params]
        if self.use_rep:
            cols["rep"] = [p.repetition_penalty for p in params]
        if self.use_pf:
            cols["presence"] = [p.presence_penalty for p in params]
            cols["frequency"] = [p.frequency_penalty for p in params]
        for name in _ROW_PARAMS:
            setattr(self, name, None)
        if cols:
            values = torch.tensor(list(cols.values()), dtype=torch.float32).to(device)
            for name, row in zip(cols, values):
                setattr(self, name, row)
        if self.greedy is not None:
            self.greedy = self.greedy.bool()
        if self.top_k is not None:
            self.top_k = self.top_k.long()
        self.seen = None
        if self.use_rep:
            self.seen = torch.zeros(R, vocab_size, dtype=torch.bool, device=device)
            for r, ids in enumerate(prompts):
                if outputs is not None:
                    ids = list(ids) + list(outputs[r])
                self.seen[r, torch.tensor(ids, dtype=torch.long, device=device)] = True
        self.counts = torch.zeros(R, vocab_size, **f32) if self.use_pf else None
        if self.counts is not None and outputs is not None:
            for r, ids in enumerate(outputs):
                if ids:
                    t = torch.tensor(ids, dtype=torch.long, device=device)
                    self.counts[r].index_add_(0, t, torch.ones(len(ids), **f32))
        self.bias = None
        if any(p.logit_bias for p in params):
            self.bias = torch.zeros(R, vocab_size, **f32)
            for r, p in enumerate(params):
                for tok, val in (p.logit_bias or {}).items():
                    self.bias[r, tok] += val
        #: no processor changes the logits: a greedy batch takes the raw arg-max
        self.plain = (
            self.bias is None and not (self.use_rep or self.use_pf) and not any(p.min_tokens for p in params)
        )
        self.max_logprobs = max((p.logprobs or 0) for p in params)
        self.want_logprobs = any(p.logprobs is not None for p in params)

    def select_rows(self, rows: list[int]) -> None:
        idx = torch.tensor(rows, dtype=torch.long, device=self.device)
        self.params = [self.params[r] for r in rows]
        self.generators = [self.generators[r] for r in rows]
        for name in (*_ROW_PARAMS, "seen", "counts", "bias"):
            t = getattr(self, name)
            if t is not None:
                setattr(self, name, t.index_select(0, idx))

    def record(self, tokens: torch.Tensor) -> None:
        """Note the tokens just sampled (R,) for the penalties."""
        if self.seen is None and self.counts is None:
            return
        rows = torch.arange(tokens.shape[0], device=self.device)
        if self.seen is not None:
            self.seen[rows, tokens] = True
        if self.counts is not None:
            self.counts[rows, tokens] += 1

    def process(self, logits: torch.Tensor, num_generated: list[int]) -> torch.Tensor:
        """Apply every logits processor; returns new float32 logits (R, V)."""
        logits = logits.float()
        if self.bias is not None:
            logits = logits + self.bias
        suppress = (
            [
                (r, tok)
                for r, p in enumerate(self.params)
                if num_generated[r] < p.min_tokens
                for tok in (([] if p.ignore_eos else self.eos_ids) + list(p.stop_token_ids or []))
            ]
            if any(p.min_tokens for p in self.params)
            else []
        )
        if suppress:
            rows, toks = zip(*suppress)
            logits = logits.clone() if self.bias is None else logits
            logits[list(rows), list(toks)] = lp.NEG_INF
        if self.use_rep:
            logits = lp.apply_repetition_penalty(logits, self.seen, self.rep)
        if self.use_pf:
            logits = lp.apply_presence_frequency(logits, self.counts, self.presence, self.frequency)
        return logits

    def sample(self, raw_logits: torch.Tensor, num_generated: list[int]) -> SampleResult:
        # Greedy with nothing to change the logits: their raw arg-max. (A subclass with its
        # own process(), such as the seq2seq rules, always runs it.)
        if self.all_greedy and self.plain and type(self).process is SamplingBatch.process:
            tokens = _argmax(raw_logits)
        else:
            tokens = self._draw(self.process(raw_logits, num_generated))
        self.record(tokens)
        token_list = tokens.tolist()
        return SampleResult(token_list, self._logprobs(raw_logits, tokens, token_list))

    def _draw(self, logits: torch.Tensor) -> torch.Tensor:
        """The tokens from processed float32 logits: greedy rows take the arg-max, the others
        a draw after temperature and the filters."""
        greedy_tokens = logits.argmax(dim=-1)
        if self.all_greedy:
            tokens = greedy_tokens
        else:
            x = lp.apply_temperature(logits, self.temperature)
            if self.use_top_k or self.use_top_p:
                x = lp.apply_top_k_top_p(
                    x, self.top_k if self.use_top_k else None, self.top_p if self.use_top_p else None
                )
            if self.use_min_p:
                x = lp.apply_min_p(x, self.min_p)
            probs = x.softmax(dim=-1)
            sampled = (probs / self._exponential(probs)).argmax(dim=-1)
            tokens = torch.where(self.greedy, greedy_tokens, sampled)
        return tokens

    def _exponential(self, probs: torch.Tensor) -> torch.Tensor:
        """Exp(1) noise; argmax(p / q) is a draw from p (the Gumbel-max trick, no host sync)."""
        q = torch.empty_like(probs)
        unseeded = [r for r, g in enumerate(self.generators) if g is None]
        if len(unseeded) == len(self.generators):
            return q.exponential_()
        for r, g in enumerate(self.generators):
            if g is not None:
                q[r].exponential_(generator=g)
        if unseeded:
            q[unseeded] = torch.empty(len(unseeded), q.shape[1], device=q.device).exponential_()
        return q

    def _logprobs(self, raw_logits: torch.Tensor, tokens: torch.Tensor, token_list: list[int]):
        if not self.want_logprobs:
            return [None] * len(token_list)
        # Log-probabilities of the model's own distribution, before any processing.
        logp = raw_logits.float().log_softmax(dim=-1)
        chosen = logp.gather(1, tokens.unsqueeze(1)).squeeze(1).tolist()
        top_vals, top_ids = (None, None)
        if self.max_logprobs:
            top_vals, top_ids = logp.topk(self.max_logprobs, dim=-1)
            top_vals, top_ids = top_vals.tolist(), top_ids.tolist()
        out = []
        for r, p in enumerate(self.params):
            if p.logprobs is None:
                out.append(None)
                continue
            k = p.logprobs
            top = list(zip(top_ids[r][:k], top_vals[r][:k])) if k else []
            out.append((chosen[r], top))
        return out


def _argmax(logits: torch.Tensor) -> torch.Tensor:
    """The arg-max of each row; on CPU in bf16 without widening the logits to float32
    first (the same index: bf16 widens exactly)."""
    if logits.dtype == torch.bfloat16 and logits.device.type == "cpu":
        from tokenmill.layers import cpu_kernels

        out = cpu_kernels.argmax_rows(logits.contiguous())
        if out is not None:
            return out
    return logits.argmax(dim=-1)
