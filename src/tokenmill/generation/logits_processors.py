"""Batched logits processors over (rows, vocab) float32 logits with per-row parameters.

Each function returns a new tensor or modifies ``logits`` in place where documented;
none loops over rows in Python.
"""

from __future__ import annotations

import torch

NEG_INF = float("-inf")


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: torch.Tensor) -> torch.Tensor:
    """CTRL's penalty: a seen token's logit is divided by p when positive, multiplied when not.

    seen: (R, V) bool of prompt and output tokens; penalty: (R,).
    """
    p = penalty.unsqueeze(1)
    penalized = torch.where(logits > 0, logits / p, logits * p)
    return torch.where(seen, penalized, logits)


def apply_presence_frequency(
    logits: torch.Tensor, counts: torch.Tensor, presence: torch.Tensor, frequency: torch.Tensor
) -> torch.Tensor:
    """OpenAI's additive penalties: ``logit - frequency * count - presence * (count > 0)``.

    counts: (R, V) occurrences of each token in the output so far.
    """
    return logits - frequency.unsqueeze(1) * counts - presence.unsqueeze(1) * (counts > 0).to(logits.dtype)


def apply_temperature(logits: torch.Tensor, temperature: torch.Tensor) -> torch.Tensor:
    """Divide each row by its temperature (greedy rows carry 1.0 here)."""
    return logits / temperature.unsqueeze(1)


def apply_top_k_top_p(
    logits: torch.Tensor, top_k: torch.Tensor | None, top_p: torch.Tensor | None
) -> torch.Tensor:
    """Mask tokens outside each row's top-k (k = V keeps all) and top-p nucleus.

    One descending sort serves both filters. Ties at the k-th value are kept, as in
    transformers. The nucleus is the smallest prefix whose probability reaches top_p;
    the most likely token is always kept.
    """
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    V = logits.shape[-1]
    if top_k is not None:
        kth = sorted_logits.gather(1, (top_k.clamp(1, V) - 1).unsqueeze(1))  # (R, 1)
        sorted_logits = sorted_logits.masked_fill(sorted_logits < kth, NEG_INF)
    if top_p is not None:
        probs = sorted_logits.softmax(dim=-1)
        # Probability mass strictly before each token; drop a token once that mass reaches top_p.
        before = probs.cumsum(dim=-1) - probs
        # Rows with top_p >= 1 keep every token: rounding can carry the cumsum to 1.0 early.
        drop = (before >= top_p.unsqueeze(1)) & (top_p < 1.0).unsqueeze(1)
        drop[:, 0] = False
        sorted_logits = sorted_logits.masked_fill(drop, NEG_INF)
    return torch.empty_like(logits).scatter_(1, order, sorted_logits)


def apply_min_p(logits: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Drop tokens whose probability is below min_p times the row's highest probability."""
    probs = logits.softmax(dim=-1)
    threshold = probs.amax(dim=-1, keepdim=True) * min_p.unsqueeze(1)
    return logits.masked_fill(probs < threshold, NEG_INF)
