"""Beam search over a dense KV cache, scored as transformers scores it.

At each step the best ``2 * beam_width`` continuations of all beams are ranked by summed
log-probability. Those among the top ``beam_width`` that end (EOS, or the length limit)
join the finished pool with score ``sum_logprob / generated_len ** length_penalty``;
the best unfinished ones carry on. With early stopping the search ends once the pool
holds ``beam_width`` hypotheses.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from tokenmill.generation.outputs import BeamHypothesis
from tokenmill.generation.runner import ModelRunner
from tokenmill.generation.sampling_params import BeamSearchParams
from tokenmill.layers.attention import DenseAttention

_NEG = -1.0e9


def beam_search(
    runner: ModelRunner,
    prompt_ids: list[int],
    params: BeamSearchParams,
    eos_ids: list[int],
    check: Callable[[], None] | None = None,
) -> list[tuple[float, float, list[int], str]]:
    """Returns (score, cumulative logprob, generated ids, finish reason), best first.

    ``check`` is called before each forward pass; what it raises ends the search (a
    server stops the search of a client that left this way).
    """
    device = runner.device
    W = params.beam_width
    stop_ids = set(params.stop_token_ids or []) | (set() if params.ignore_eos else set(eos_ids))
    L = len(prompt_ids)
    if check is not None:
        check()
    cache = runner.new_cache(1, L + params.max_tokens)
    ids = torch.tensor([prompt_ids], dtype=torch.long, device=device)
    pos = torch.arange(L, device=device).unsqueeze(0)
    logits = runner.forward(ids, pos, DenseAttention(cache, 0, L, L - 1))  # (1, V)
    cache.select_rows(torch.zeros(W, dtype=torch.long, device=device))
    logits = logits.expand(W, -1)
    scores = torch.full((W,), _NEG, device=device)
    scores[0] = 0.0  # all beams start as the same prompt; only one may expand at first
    beams: list[list[int]] = [[] for _ in range(W)]
    finished: list[tuple[float, float, list[int], str]] = []
    K = max(2, 1 + len(stop_ids)) * W
    V = logits.shape[-1]
    for step in range(params.max_tokens):
        gen_len = step + 1
        total = logits.float().log_softmax(dim=-1) + scores.unsqueeze(1)  # (W, V)
        vals, idx = total.view(-1).topk(min(K, W * V))
        vals_l, beam_l, tok_l = vals.tolist(), (idx // V).tolist(), (idx % V).tolist()
        last = gen_len >= params.max_tokens
        next_beams: list[tuple[int, int, float]] = []
        new_finished = []
        for j, (v, b, t) in enumerate(zip(vals_l, beam_l, tok_l)):
            hits = last or t in stop_ids
            if hits:
                if j < W and len(finished) < W:
                    reason = "length" if t not in stop_ids else "stop"
                    new_finished.append((v / gen_len**params.length_penalty, v, beams[b] + [t], reason))
            elif len(next_beams) < W:
                next_beams.append((b, t, v))
        if len(finished) < W:
            finished = sorted(finished + new_finished, key=lambda h: h[0], reverse=True)[:W]
        if len(finished) >= W or last or not next_beams:
            break
        while len(next_beams) < W:  # too few live candidates: pad with dead beams
            next_beams.append((next_beams[0][0], next_beams[0][1], _NEG))
        origin = torch.tensor([b for b, _, _ in next_beams], dtype=torch.long, device=device)
        cache.select_rows(origin)
        beams = [beams[b] + [t] for b, t, _ in next_beams]
        scores = torch.tensor([v for _, _, v in next_beams], device=device)
        tokens = torch.tensor([[t] for _, t, _ in next_beams], dtype=torch.long, device=device)
        positions = torch.full((W, 1), L + step, dtype=torch.long, device=device)
        if check is not None:
            check()
        logits = runner.forward(tokens, positions, DenseAttention(cache, L + step, 1, L + step))
    return finished


def to_hypotheses(results, tokenizer, skip_special_tokens: bool) -> list[BeamHypothesis]:
    return [
        BeamHypothesis(tokenizer.decode(ids, skip_special_tokens), ids, cum, score, reason)
        for score, cum, ids, reason in results
    ]
