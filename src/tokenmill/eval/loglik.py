"""Log-likelihoods of chosen tokens, batched: what probes and evaluations score texts with.

- ``continuation_logprobs``: a causal LM's log-probability of each continuation token
  given a context and the continuation tokens before it (the chain rule, exact).
- ``pseudo_logprobs``: a masked LM's log-probability of each chosen token when that token
  alone is replaced by the mask and every other token stays visible (Salazar et al.'s
  pseudo-log-likelihood when the chosen tokens are all the tokens of a text).

Rows are right-padded: under a causal mask a real token never attends to the padding after
it, so every row scores exactly as it would alone. Rows of similar length share a batch.
Continuations of one shared context (a probe's many words after one sentence start) run
the context once into a KV cache and score every continuation on a copy of it.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from typing import Any

import torch

from tokenmill.layers.attention import DenseAttention, DenseKVCache
from tokenmill.pipelines.base import Feature, plan_batches

#: rows of logits turned into log-probabilities at a time (bounds the float32 copy)
_LOGIT_ROWS = 256

Progress = Callable[[int], None]


def _gather_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> list[float]:
    """log_softmax(logits)[i, targets[i]] for every row, in float32, a few rows at a time."""
    out: list[float] = []
    for i in range(0, len(targets), _LOGIT_ROWS):
        rows = logits[i : i + _LOGIT_ROWS].float()  # (R, V)
        picked = rows.gather(1, targets[i : i + _LOGIT_ROWS, None]).squeeze(1)  # (R,)
        out.extend((picked - torch.logsumexp(rows, dim=-1)).tolist())
    return out


@torch.inference_mode()
def continuation_logprobs(
    loaded: Any,
    requests: Sequence[tuple[Sequence[int], Sequence[int]]],
    *,
    batch_size: int = 32,
    progress: Progress | None = None,
) -> list[list[float]]:
    """Per-token log-probabilities of continuations under a causal LM.

    Args:
        loaded: a ``LoadedModel`` (``load_model``) or an ``LLM`` (its ``.loaded`` is used).
        requests: (context ids, continuation ids) pairs; the context must not be empty
            (the first token of a text has nothing to be predicted from: start the context
            with the model's BOS token).
        batch_size: most rows per forward pass.
        progress: called with the number of requests finished after each batch.

    Returns:
        For each request, ``log p(cont[i] | context + cont[:i])`` for every continuation token.
    """
    loaded = getattr(loaded, "loaded", loaded)
    limit = loaded.config.max_position_embeddings
    groups: dict[tuple[int, ...], list[int]] = {}
    for k, (context, cont) in enumerate(requests):
        if not context or not cont:
            raise ValueError(f"request {k}: the context and the continuation need at least one token each")
        if len(context) + len(cont) - 1 > limit:
            raise ValueError(
                f"request {k} is {len(context) + len(cont)} tokens long, over the model's context of {limit}"
            )
        groups.setdefault(tuple(context), []).append(k)
    results: list[list[float]] = [[] for _ in requests]
    singles = [ks[0] for ks in groups.values() if len(ks) == 1]
    _score_rows(loaded.model, requests, singles, batch_size, results, progress)
    for context, ks in groups.items():
        if len(ks) > 1:
            _score_shared(loaded, list(context), requests, ks, batch_size, results, progress)
    return results


def _score_rows(
    model: Any,
    requests: Sequence[tuple[Sequence[int], Sequence[int]]],
    which: list[int],
    batch_size: int,
    results: list[list[float]],
    progress: Progress | None,
) -> None:
    """Context and continuation in one right-padded row each."""
    device = next(model.parameters()).device
    rows = {
        k: list(requests[k][0]) + list(requests[k][1][:-1]) for k in which
    }  # the last token is never read
    for batch in plan_batches([len(rows[k]) for k in which], batch_size):
        idx = [which[b] for b in batch]
        B, T = len(idx), max(len(rows[k]) for k in idx)
        input_ids = torch.zeros(B, T, dtype=torch.long)  # right padding: any id works
        select: list[int] = []
        targets: list[int] = []
        for r, k in enumerate(idx):
            context, cont = requests[k]
            input_ids[r, : len(rows[k])] = torch.tensor(rows[k])
            # position t predicts token t + 1: the continuation is predicted from len(context) - 1 on
            select.extend(r * T + len(context) - 1 + i for i in range(len(cont)))
            targets.extend(cont)
        positions = torch.arange(T).repeat(B, 1)  # (B, T)
        ctx = DenseAttention(None, 0, T, T - 1)
        logits = model(
            input_ids.to(device), positions.to(device), ctx, torch.tensor(select, device=device)
        )  # (S, V)
        _scatter(_gather_logprobs(logits, torch.tensor(targets, device=device)), requests, idx, results)
        if progress is not None:
            progress(len(idx))


def _score_shared(
    loaded: Any,
    context: list[int],
    requests: Sequence[tuple[Sequence[int], Sequence[int]]],
    which: list[int],
    batch_size: int,
    results: list[list[float]],
    progress: Progress | None,
) -> None:
    """Continuations of one context: the context runs once into a KV cache, then every
    continuation runs on a copy of it (probes score many words after one sentence start)."""
    model, cfg = loaded.model, loaded.config
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    P = len(context)
    longest = max(len(requests[k][1]) for k in which)
    cache = DenseKVCache(cfg.num_layers, 1, cfg.num_kv_heads, cfg.head_dim, P + longest, dtype, device)
    ids = torch.tensor([context], device=device)  # (1, P)
    first = model(ids, torch.arange(P, device=device)[None], DenseAttention(cache, 0, P, P - 1), "last")
    first = first.reshape(1, -1).float().log_softmax(-1)[0]  # (V,): every continuation's first token
    for start in range(0, len(which), batch_size):
        idx = which[start : start + batch_size]
        out = {k: [float(first[requests[k][1][0]])] for k in idx}
        T = max(len(requests[k][1]) for k in idx) - 1  # the tokens after the first are read
        if T > 0:
            B = len(idx)
            rows = copy.copy(cache)
            rows.select_rows(
                torch.zeros(B, dtype=torch.long, device=device)
            )  # (B, ...) copies of the context
            input_ids = torch.zeros(B, T, dtype=torch.long)
            select: list[int] = []
            targets: list[int] = []
            for r, k in enumerate(idx):
                cont = requests[k][1]
                input_ids[r, : len(cont) - 1] = torch.tensor(list(cont[:-1]))
                select.extend(r * T + i for i in range(len(cont) - 1))
                targets.extend(cont[1:])
            positions = (P + torch.arange(T)).repeat(B, 1)  # (B, T)
            ctx = DenseAttention(rows, P, T, P + T - 1)
            logits = model(
                input_ids.to(device), positions.to(device), ctx, torch.tensor(select, device=device)
            )
            rest = _gather_logprobs(logits, torch.tensor(targets, device=device))
            n = 0
            for k in idx:
                m = len(requests[k][1]) - 1
                out[k] += rest[n : n + m]
                n += m
        for k in idx:
            results[k] = out[k]
        if progress is not None:
            progress(len(idx))


def _scatter(flat: list[float], requests: Sequence, idx: list[int], results: list[list[float]]) -> None:
    n = 0
    for k in idx:
        m = len(requests[k][1])
        results[k] = flat[n : n + m]
        n += m


@torch.inference_mode()
def pseudo_logprobs(
    pipe: Any,
    sequences: Sequence[Sequence[int]],
    positions: Sequence[Sequence[int]],
    *,
    batch_size: int = 32,
    progress: Progress | None = None,
) -> list[list[float]]:
    """Per-token pseudo-log-probabilities under a masked LM.

    Args:
        pipe: a fill-mask pipeline (``tokenmill.pipeline("fill-mask", model=...)``).
        sequences: token ids with special tokens, as ``pipe.encode`` gives them.
        positions: for each sequence, the positions to score.
        batch_size: most rows (one per scored position) per forward pass.
        progress: called with the number of sequences finished after each batch.

    Returns:
        For each sequence, ``log p(ids[p] | ids with position p masked)`` for each ``p`` in order.
    """
    mask_id = pipe.mask_token_id
    rows: list[tuple[int, int]] = [(s, p) for s, ps in enumerate(positions) for p in ps]
    for s, p in rows:
        if not 0 <= p < len(sequences[s]):
            raise ValueError(f"sequence {s}: position {p} is outside its {len(sequences[s])} tokens")
    results: list[list[float]] = [[0.0] * len(ps) for ps in positions]
    slot = {row: j for s, ps in enumerate(positions) for j, row in enumerate((s, p) for p in ps)}
    remaining = [len(ps) for ps in positions]
    for idx in plan_batches([len(sequences[s]) for s, _ in rows], batch_size):
        features = []
        for k in idx:
            s, p = rows[k]
            ids = list(sequences[s])
            ids[p] = mask_id
            features.append(Feature(ids, k))
        batch = pipe.collate(features)
        T = batch["input_ids"].shape[1]
        select = torch.tensor([r * T + rows[k][1] for r, k in enumerate(idx)], device=pipe.device)
        logits = pipe.model(**batch, select=select)  # (B, V)
        targets = torch.tensor([sequences[rows[k][0]][rows[k][1]] for k in idx], device=pipe.device)
        done = 0
        for k, value in zip(idx, _gather_logprobs(logits, targets)):
            s, _ = rows[k]
            results[s][slot[rows[k]]] = value
            remaining[s] -= 1
            done += remaining[s] == 0
        if progress is not None and done:
            progress(done)
    return results


@torch.inference_mode()
def next_token_topk(
    loaded: Any, contexts: Sequence[Sequence[int]], k: int = 10, *, batch_size: int = 32
) -> list[list[tuple[int, float]]]:
    """The ``k`` most likely next tokens after each context, as (token id, log-probability)."""
    loaded = getattr(loaded, "loaded", loaded)
    model = loaded.model
    device = next(model.parameters()).device
    out: list[list[tuple[int, float]]] = [[] for _ in contexts]
    for idx in plan_batches([len(c) for c in contexts], batch_size):
        B, T = len(idx), max(len(contexts[j]) for j in idx)
        input_ids = torch.zeros(B, T, dtype=torch.long)
        for r, j in enumerate(idx):
            input_ids[r, : len(contexts[j])] = torch.tensor(list(contexts[j]))
        positions = torch.arange(T).repeat(B, 1)  # (B, T)
        select = torch.tensor([r * T + len(contexts[j]) - 1 for r, j in enumerate(idx)], device=device)
        logits = model(input_ids.to(device), positions.to(device), DenseAttention(None, 0, T, T - 1), select)
        values, ids = logits.float().log_softmax(-1).topk(k, dim=-1)  # (B, k)
        for r, j in enumerate(idx):
            out[j] = list(zip(ids[r].tolist(), values[r].tolist()))
    return out
