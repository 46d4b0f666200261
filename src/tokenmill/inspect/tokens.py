"""Token probabilities at every generated step, as the engine's sampler shapes them.

For each step the model's raw distribution (what the engine reports as logprobs), the
distribution after the penalties and temperature, and the one after top-k / top-p /
min-p (renormalised) that the engine draws from, with the filter that removed each
token. The penalties and filters are the sampler's own functions, applied in the
sampler's order with its switches, so the numbers are the ones the engine used.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from tokenmill.generation import logits_processors as lp
from tokenmill.generation.sampler import SamplingBatch
from tokenmill.generation.sampling_params import SamplingParams

#: removed_by values, in the order the filters run
FILTERS = ("top_k", "top_p", "min_p")


@dataclass
class Candidate:
    """One token at one step."""

    id: int
    logprob: float  # log of ``prob``
    prob: float  # softmax of the model's logits
    prob_temperature: float  # after penalties and temperature
    prob_final: float  # after top-k / top-p / min-p, renormalised; 0 when removed
    removed_by: str | None  # the filter that removed it, if one did


@dataclass
class Step:
    index: int
    token: Candidate  # the token that was generated
    alternatives: list[Candidate]  # the most likely tokens by ``prob``, most likely first


#: steps computed together: (rows, vocab) tensors of one block stay around 10 MB a piece
_BLOCK = 64


@dataclass
class Stages:
    """Distributions over the vocabulary, float32 (R, V): one row per step."""

    logprob: torch.Tensor
    prob_temperature: torch.Tensor
    prob_final: torch.Tensor
    removed: torch.Tensor  # int8: 0 kept, 1 + index into FILTERS


def stages(batch: SamplingBatch, raw: torch.Tensor, num_generated: list[int]) -> Stages:
    """The distributions of the rows of ``batch``; raw: the model's logits (R, V).

    Mirrors ``SamplingBatch.sample``: penalties (``process``), then for sampled rows
    temperature, top-k and top-p in one call, min-p; greedy rows take the argmax of the
    penalised logits, so their distribution after temperature is that one token. The
    rows of one batch share their parameters (one request's steps).
    """
    logprob = raw.float().log_softmax(dim=-1)
    x = batch.process(raw, num_generated)  # (R, V) float32
    removed = torch.zeros(x.shape, dtype=torch.int8, device=x.device)
    if batch.all_greedy:
        onehot = torch.zeros_like(x).scatter_(1, x.argmax(dim=-1, keepdim=True), 1.0)
        return Stages(logprob, onehot, onehot, removed)
    x = lp.apply_temperature(x, batch.temperature)
    prob_temperature = x.softmax(dim=-1)
    live = torch.isfinite(x)
    if batch.use_top_k or batch.use_top_p:
        top_k = batch.top_k if batch.use_top_k else None
        kept = lp.apply_top_k_top_p(x, top_k, batch.top_p if batch.use_top_p else None)
        if top_k is not None:
            # Credit a removal to top-k when top-k alone removes it: it runs first.
            removed[torch.isinf(lp.apply_top_k_top_p(x, top_k, None)) & live] = 1
        removed[torch.isinf(kept) & live & (removed == 0)] = 2
        x, live = kept, torch.isfinite(kept)
    if batch.use_min_p:
        kept = lp.apply_min_p(x, batch.min_p)
        removed[torch.isinf(kept) & live] = 3
        x = kept
    return Stages(logprob, prob_temperature, x.softmax(dim=-1), removed)


def _finite(x: float) -> float:
    # JSON has no -inf; as the completion routes do, a ruled-out token gets -9999.
    return x if math.isfinite(x) else -9999.0


def token_steps(
    logits: torch.Tensor,
    prompt_ids: list[int],
    completion_ids: list[int],
    params: SamplingParams,
    eos_ids: list[int],
    top_n: int,
) -> list[Step]:
    """Each generated token with the ``top_n`` most likely alternatives of its step.

    Args:
        logits: float32 (len(completion_ids), V): row i is the model's distribution over
            completion token i (the logits at the position before it).
        params: resolved sampling parameters (``SamplingParams.resolved``).
        eos_ids: the model's end-of-sequence ids (min_tokens suppresses them).
    """
    C, V = logits.shape
    if C != len(completion_ids):
        raise ValueError(f"{C} rows of logits for {len(completion_ids)} completion tokens")
    steps: list[Step] = []
    for b in range(0, C, _BLOCK):
        rows = list(range(b, min(C, b + _BLOCK)))
        n = len(rows)
        # One row per step, each with the tokens generated before it: the penalties see
        # what the engine's batch saw at that step.
        batch = SamplingBatch(
            [params] * n,
            [prompt_ids] * n,
            V,
            eos_ids,
            logits.device,
            [None] * n,
            outputs=[completion_ids[:i] for i in rows],
        )
        s = stages(batch, logits[b : b + n], rows)
        chosen = torch.tensor(completion_ids[b : b + n], device=logits.device).unsqueeze(1)  # (n, 1)
        idx = torch.cat([chosen, s.logprob.topk(min(top_n, V), dim=-1).indices], dim=1)  # (n, 1 + top_n)
        ids = idx.tolist()
        lps, pt, pf, rm = (
            t.gather(1, idx).tolist() for t in (s.logprob, s.prob_temperature, s.prob_final, s.removed)
        )
        for r in range(n):
            cands = [
                Candidate(
                    id=ids[r][j],
                    logprob=_finite(lps[r][j]),
                    prob=math.exp(lps[r][j]),
                    prob_temperature=pt[r][j],
                    prob_final=pf[r][j],
                    removed_by=FILTERS[rm[r][j] - 1] if rm[r][j] else None,
                )
                for j in range(len(ids[r]))
            ]
            steps.append(Step(b + r, cands[0], cands[1:]))
    return steps
