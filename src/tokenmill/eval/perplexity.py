"""Token-level perplexity of a text, computed with the native forward pass.

A text longer than the window is scored in windows that advance by ``stride`` tokens.
Each window is a fresh sequence (positions from 0, no cache) and scores only the tokens
that no earlier window scored, so every token after the first is scored exactly once;
with ``stride < window`` each of them sees at least ``window - stride`` tokens of context.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from importlib.resources import files
from typing import Any

import torch

from tokenmill.layers.attention import DenseAttention

#: rows of logits turned into log-probabilities at a time (bounds the float32 copy)
_LOGIT_ROWS = 256


@dataclass
class PerplexityResult:
    perplexity: float
    #: mean negative log-likelihood per scored token, in nats
    nll: float
    #: tokens scored (every token of the text but the first)
    tokens: int
    #: forward passes run
    windows: int
    window: int
    stride: int


def default_text() -> str:
    """The English essay shipped with tokenmill for perplexity checks (about 3,000 words)."""
    return files("tokenmill").joinpath("data/perplexity_text.txt").read_text(encoding="utf-8")


def _unwrap(model_or_llm: Any) -> Any:
    """The LoadedModel behind an LLM, a LoadedModel, or a model name to load."""
    if isinstance(model_or_llm, str):
        from tokenmill.weights.model_loader import load_model

        return load_model(model_or_llm)
    loaded = getattr(model_or_llm, "loaded", model_or_llm)  # an LLM keeps its LoadedModel
    if not all(hasattr(loaded, a) for a in ("model", "tokenizer", "config")):
        raise TypeError(
            f"perplexity() takes an LLM, a LoadedModel or a model name, got {type(model_or_llm).__name__}"
        )
    return loaded


def perplexity(
    model_or_llm: Any,
    text: str | None = None,
    max_tokens: int | None = None,
    window: int | None = None,
    stride: int | None = None,
) -> PerplexityResult:
    """Perplexity of ``text`` under a model: exp of the mean negative log-likelihood per token.

    Args:
        model_or_llm: an ``LLM``, a ``LoadedModel`` from ``load_model``, or a model name.
        text: the text to score (default: ``default_text()``).
        max_tokens: score only the first ``max_tokens`` tokens of the text.
        window: tokens per forward pass (default: 1024, or the model's context if shorter).
        stride: tokens each window advances by (default: half the window; equal to the
            window gives non-overlapping windows).
    """
    loaded = _unwrap(model_or_llm)
    model, config = loaded.model, loaded.config
    context = config.max_position_embeddings
    text = default_text() if text is None else text
    if max_tokens is not None and (
        isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 2
    ):
        raise ValueError(f"max_tokens must be an integer >= 2 or None, got {max_tokens!r}")
    window = min(1024, context) if window is None else window
    if isinstance(window, bool) or not isinstance(window, int) or not 2 <= window <= context:
        raise ValueError(f"window must be an integer in [2, {context}] (the model's context), got {window!r}")
    stride = max(1, window // 2) if stride is None else stride
    if isinstance(stride, bool) or not isinstance(stride, int) or not 1 <= stride <= window:
        raise ValueError(f"stride must be an integer in [1, window={window}], got {stride!r}")
    ids = loaded.tokenizer.encode(text)[:max_tokens]
    if len(ids) < 2:
        raise ValueError(f"the text has {len(ids)} token(s); perplexity needs at least 2")

    device = next(model.parameters()).device
    n = len(ids)
    total, scored, windows, done = 0.0, 0, 0, 1  # the first token is context, never scored
    for begin in range(0, n - 1, stride):
        end = min(begin + window, n)
        first = max(done, begin + 1)  # the first target this window scores
        if first < end:
            total += _window_nll(model, ids[begin:end], first - begin, device)
            scored += end - first
            windows += 1
            done = end
        if end == n:
            break
    nll = total / scored
    return PerplexityResult(math.exp(nll), nll, scored, windows, window, stride)


@torch.inference_mode()
def _window_nll(model: Any, ids: list[int], first: int, device: torch.device) -> float:
    """Summed negative log-likelihood of ``ids[first:]``, each predicted from the tokens before it."""
    T = len(ids)
    input_ids = torch.tensor([ids], dtype=torch.long, device=device)  # (1, T)
    positions = torch.arange(T, device=device).unsqueeze(0)  # (1, T)
    ctx = DenseAttention(None, 0, T, T - 1)
    # Logits only where they predict a scored token: position t predicts token t + 1.
    select = torch.arange(first - 1, T - 1, device=device)
    logits = model(input_ids, positions, ctx, select)  # (S, V)
    targets = input_ids[0, first:]  # (S,)
    total = torch.zeros((), dtype=torch.float64, device=device)
    for i in range(0, len(targets), _LOGIT_ROWS):
        rows = logits[i : i + _LOGIT_ROWS].float()  # (R, V)
        picked = rows.gather(1, targets[i : i + _LOGIT_ROWS, None]).squeeze(1)
        total += (torch.logsumexp(rows, dim=-1) - picked).sum(dtype=torch.float64)
    return float(total)
