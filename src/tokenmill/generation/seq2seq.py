"""Batched generation for encoder-decoder models (T5, BART, mBART, Marian).

Each input is encoded once; its cross-attention keys and values are projected once and
shared by its rows (``n`` samples or ``beam_width`` beams); then the decoder runs one token
per step over a growing self-attention cache. Finished rows leave the batch at once.

Sampling (greedy included) goes through tokenmill's batched sampler, so every
:class:`SamplingParams` field means what it means for decoder-only models. Beam search
follows transformers' ``generate()`` step for step (candidates, finished pool, length
penalty, ``early_stopping`` True / False / "never"), so results are equal on the same model.

The model provides ``encode(ids, mask)``, ``start_decoding(hidden, mask, capacity)`` and
``decode(tokens, cache)`` (see models/t5.py, models/bart.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from tokenmill.generation import logits_processors as lp
from tokenmill.generation.sampler import SamplingBatch
from tokenmill.generation.sampling_params import BeamSearchParams, SamplingParams

_NEG = -1.0e9  # transformers' score for a dead beam or an empty slot of the finished pool


def generate(
    model: Any,
    input_ids: list[list[int]],
    params: SamplingParams | BeamSearchParams,
    *,
    decoder_start_token_id: int,
    eos_token_ids: list[int],
    pad_token_id: int | None = None,
    forced_bos_token_id: int | None = None,
    forced_eos_token_id: int | list[int] | None = None,
    early_stopping: bool | str = False,
    min_tokens: int = 0,
    no_repeat_ngram_size: int = 0,
    suppress_token_ids: list[int] | None = None,
    batch_size: int | None = None,
    model_defaults: dict[str, Any] | None = None,
) -> list[list[list[int]]]:
    """Generate from each input; returns, per input, its sequences of generated token ids.

    Sequences leave out the decoder start token and keep the EOS (or stop) token that ended
    them, as tokenmill's decoder-only path does (``forced_bos_token_id`` is a generated
    token, so it is the first id of every sequence).

    Args:
        input_ids: encoder inputs, special tokens included (T5's and Marian's ``</s>``...).
        params: ``SamplingParams`` (greedy when temperature is 0) returns ``n`` sequences
            per input; ``BeamSearchParams`` returns ``beam_width`` hypotheses, best first.
        decoder_start_token_id, eos_token_ids: the model's (generation_config, else config).
        pad_token_id: fills the encoder batch; any id works (padding is masked), 0 if None.
        forced_bos_token_id: the first generated token (mBART's target language).
        forced_eos_token_id: EOS id(s) forced as the last token when ``max_tokens`` is reached.
        early_stopping: beam search only, as transformers: True stops an input once it has
            ``beam_width`` finished hypotheses; False stops once no running beam can beat
            them at its current length; "never" assumes running beams may grow to
            ``max_tokens`` when ``length_penalty > 0``.
        min_tokens: beam search only (``SamplingParams`` has its own): EOS and stop ids are
            suppressed until this many tokens exist (transformers' ``min_new_tokens``).
        no_repeat_ngram_size: no n-gram of this size occurs twice in a sequence (the decoder
            start token counts, as in transformers); 0 disables.
        suppress_token_ids: never generated (Marian's ``bad_words_ids=[[pad]]``).
        batch_size: inputs encoded and decoded together (all by default).
        model_defaults: generation_config.json values that fill unset sampling fields.
    """
    if not isinstance(input_ids, (list, tuple)) or any(not isinstance(x, (list, tuple)) for x in input_ids):
        raise ValueError("input_ids must be a list of token id lists")
    if not input_ids:
        return []
    if any(len(x) == 0 for x in input_ids):
        raise ValueError("every input must hold at least one token")
    if batch_size is not None and (
        isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1
    ):
        raise ValueError(f"batch_size must be a positive integer or None, got {batch_size!r}")
    if early_stopping not in (True, False, "never"):
        raise ValueError(f"early_stopping must be True, False or 'never', got {early_stopping!r}")
    for name, value in (("min_tokens", min_tokens), ("no_repeat_ngram_size", no_repeat_ngram_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{name} must be an integer >= 0, got {value!r}")
    vocab = model.lm_head.out_features
    forced_eos = _as_list(forced_eos_token_id)
    suppress = _as_list(suppress_token_ids)
    for name, ids in (
        ("decoder_start_token_id", _as_list(decoder_start_token_id)),
        ("forced_bos_token_id", _as_list(forced_bos_token_id)),
        ("forced_eos_token_id", forced_eos),
        ("suppress_token_ids", suppress),
    ):
        if any(not 0 <= t < vocab for t in ids):
            raise ValueError(f"{name} must be token ids in [0, {vocab}), got {ids}")
    if isinstance(params, SamplingParams):
        if params.stop:
            raise ValueError(
                "stop strings are not supported by encoder-decoder generation; use stop_token_ids"
            )
        if params.logprobs is not None:
            raise ValueError("logprobs are not returned by encoder-decoder generation")
        if min_tokens:
            raise ValueError("min_tokens is a beam search argument; set SamplingParams.min_tokens instead")
        if not params._resolved:
            params = params.resolved(model_defaults or {}, vocab)
    elif not isinstance(params, BeamSearchParams):
        raise ValueError(f"params must be SamplingParams or BeamSearchParams, got {type(params).__name__}")
    max_tokens = _max_tokens(model, params.max_tokens)
    if isinstance(params, BeamSearchParams) and min_tokens > max_tokens:
        raise ValueError(f"min_tokens must be <= max_tokens, got {min_tokens} > {max_tokens}")
    limit = model.config.max_position_embeddings
    longest = max(len(x) for x in input_ids)
    if limit is not None and longest > limit:
        raise ValueError(f"an input has {longest} tokens; the model reads at most {limit}")

    device = next(model.parameters()).device
    rules = _Rules(
        start=decoder_start_token_id,
        eos=[int(t) for t in eos_token_ids],
        forced_bos=forced_bos_token_id,
        forced_eos=forced_eos,
        max_tokens=max_tokens,
        vocab=vocab,
        no_repeat=no_repeat_ngram_size,
        suppress=torch.tensor(suppress, dtype=torch.long, device=device) if suppress else None,
    )
    # Similar lengths together: less padding in each batch.
    order = sorted(range(len(input_ids)), key=lambda i: len(input_ids[i]))
    size = batch_size or len(order)
    results: list[list[list[int]]] = [[] for _ in input_ids]
    with torch.inference_mode():
        for lo in range(0, len(order), size):
            chunk = order[lo : lo + size]
            ids, mask = _pad([list(input_ids[i]) for i in chunk], pad_token_id or 0, device)
            encoded = model.encode(ids, mask)  # (B, S, C)
            cache = model.start_decoding(encoded, mask, capacity=max_tokens + 1)
            if isinstance(params, BeamSearchParams):
                out = _beam_search(
                    model, cache, len(chunk), params, early_stopping, min_tokens, rules, device
                )
            else:
                out = _sample(model, cache, len(chunk), params, rules, device)
            for i, seqs in zip(chunk, out):
                results[i] = seqs
    return results


@dataclass
class _Rules:
    """Model-level decoding rules (generation_config), applied to every row after the
    request's own processors, in transformers' order: masks first, forced tokens last."""

    start: int
    eos: list[int]
    forced_bos: int | None
    forced_eos: list[int]
    max_tokens: int
    vocab: int
    no_repeat: int
    suppress: torch.Tensor | None

    def forced(self, step: int) -> list[int] | None:
        """Token ids forced at generation step ``step`` (0-based): the BOS at the first
        step, the EOS at the step that reaches max_tokens."""
        if step == 0 and self.forced_bos is not None:
            return [self.forced_bos]
        if step == self.max_tokens - 1 and self.forced_eos:
            return self.forced_eos
        return None

    def apply(self, scores: torch.Tensor, history: torch.Tensor, step: int) -> torch.Tensor:
        """scores: (R, V) float32, never modified in place; history: (R, 1 + step) decoder
        tokens so far, start token first."""
        if self.suppress is not None:
            scores = scores.index_fill(1, self.suppress, lp.NEG_INF)
        if self.no_repeat:
            scores = _ban_repeated_ngrams(scores, history, self.no_repeat)
        forced = self.forced(step)
        return scores if forced is None else _force(scores, forced)


def _max_tokens(model: Any, max_tokens: int | None) -> int:
    limit = model.config.max_position_embeddings
    if max_tokens is None:
        if limit is None:
            raise ValueError(
                f"max_tokens must be set for {model.config.model_type}: its decoder has no length limit"
            )
        return limit - 1  # the decoder start token takes the first position
    if limit is not None and max_tokens + 1 > limit:
        raise ValueError(
            f"max_tokens must be at most {limit - 1} for this model (max_position_embeddings={limit} "
            f"includes the decoder start token), got {max_tokens}"
        )
    return max_tokens


def _pad(rows: list[list[int]], pad: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad to one (B, S) id tensor and its 0/1 attention mask."""
    S = max(len(r) for r in rows)
    ids = torch.full((len(rows), S), pad, dtype=torch.long)
    mask = torch.zeros(len(rows), S, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        mask[i, : len(r)] = 1
    return ids.to(device), mask.to(device)


def _as_list(ids: int | list[int] | None) -> list[int]:
    if ids is None:
        return []
    return [int(i) for i in ids] if isinstance(ids, (list, tuple)) else [int(ids)]


def _force(scores: torch.Tensor, tokens: list[int]) -> torch.Tensor:
    """Every token but ``tokens`` gets -inf, ``tokens`` get 0 (transformers' forced BOS/EOS)."""
    out = torch.full_like(scores, lp.NEG_INF)
    out[:, tokens] = 0.0
    return out


def _ban_repeated_ngrams(scores: torch.Tensor, history: torch.Tensor, n: int) -> torch.Tensor:
    """-inf for each token that would complete an n-gram already in the row's history."""
    cur = history.shape[1]
    if cur < n:
        return scores
    prefix = history[:, cur + 1 - n :]  # (R, n - 1): the n-gram the next token would close
    windows = history.unfold(1, n, 1)  # (R, cur - n + 1, n)
    matches = (windows[..., :-1] == prefix.unsqueeze(1)).all(dim=-1)  # (R, cur - n + 1)
    V = scores.shape[1]
    # Windows that do not match write into a spare column, so they cannot unban a token.
    banned = torch.zeros(scores.shape[0], V + 1, dtype=torch.bool, device=scores.device)
    banned.scatter_(1, torch.where(matches, windows[..., -1].clamp(max=V), V), True)
    return scores.masked_fill(banned[:, :V], lp.NEG_INF)


class _RuledSampler(SamplingBatch):
    """The shared sampler, plus the model-level rules (forced tokens, n-gram bans...) after
    the request's processors, before temperature and the top-k/top-p filters."""

    rules: _Rules
    history: torch.Tensor
    step = 0

    def process(self, logits: torch.Tensor, num_generated: list[int]) -> torch.Tensor:
        return self.rules.apply(super().process(logits, num_generated), self.history, self.step)


def _sample(
    model: Any, cache: Any, B: int, params: SamplingParams, rules: _Rules, device: torch.device
) -> list[list[list[int]]]:
    n = params.n
    if n > 1:
        cache.select_rows(torch.arange(B, device=device).repeat_interleave(n))  # (B * n) rows
    R = B * n
    generators: list[torch.Generator | None] = []
    for _ in range(B):
        for j in range(n):
            g = None
            if params.seed is not None:
                g = torch.Generator(device=device)
                g.manual_seed(params.seed + j)  # as the engine seeds the n samples of a request
            generators.append(g)
    # The decoder's "prompt" is its start token: repetition penalties see it, not the encoder input.
    sampler = _RuledSampler([params] * R, [[rules.start]] * R, rules.vocab, rules.eos, device, generators)
    sampler.rules = rules
    outputs: list[list[int]] = [[] for _ in range(R)]
    active = list(range(R))
    stop_ids = set(params.stop_token_ids or [])
    eos = set() if params.ignore_eos else set(rules.eos)
    history = torch.full((R, 1), rules.start, dtype=torch.long, device=device)  # (A, 1 + step)
    for step in range(rules.max_tokens):
        logits = model.decode(history[:, -1:], cache)[:, -1]  # (A, V)
        sampler.history, sampler.step = history, step
        result = sampler.sample(logits, [len(outputs[r]) for r in active])
        history = torch.cat([history, torch.tensor(result.tokens, device=device).unsqueeze(1)], dim=1)
        keep: list[int] = []
        for a, r in enumerate(active):
            t = result.tokens[a]
            outputs[r].append(t)
            n_out = len(outputs[r])
            stopped = n_out >= params.min_tokens and (t in eos or t in stop_ids)
            if not stopped and n_out < rules.max_tokens:
                keep.append(a)
        if not keep:
            break
        if len(keep) != len(active):
            idx = torch.tensor(keep, dtype=torch.long, device=device)
            cache.select_rows(idx)
            sampler.select_rows(keep)
            history = history.index_select(0, idx)
            active = [active[a] for a in keep]
    return [outputs[i * n : (i + 1) * n] for i in range(B)]


def _beam_search(
    model: Any,
    cache: Any,
    B: int,
    params: BeamSearchParams,
    early_stopping: bool | str,
    min_tokens: int,
    rules: _Rules,
    device: torch.device,
) -> list[list[list[int]]]:
    """transformers' beam search (``_beam_search`` in generation/utils.py), over a shrinking
    batch: an input leaves as soon as its finished pool can no longer change."""
    W, L, lpen = params.beam_width, rules.max_tokens, params.length_penalty
    stop = sorted((set() if params.ignore_eos else set(rules.eos)) | set(params.stop_token_ids or []))
    stop_t = torch.tensor(stop, dtype=torch.long, device=device)
    K = max(2, 1 + len(stop)) * W  # enough candidates that W of them keep running
    f32 = dict(dtype=torch.float32, device=device)
    cache.select_rows(torch.arange(B, device=device).repeat_interleave(W))  # (B * W) rows
    items = list(range(B))  # the inputs still in the batch
    # Running beams: all start from the start token; only the first may expand at step 0.
    run_scores = torch.zeros(B, W, **f32)
    run_scores[:, 1:] = _NEG
    run_seqs = torch.full((B, W, L + 1), rules.start, dtype=torch.long, device=device)  # start token first
    # Finished pool per input: W slots, best first.
    pool_seqs = torch.zeros(B, W, L + 1, dtype=torch.long, device=device)
    pool_scores = torch.full((B, W), _NEG, **f32)
    pool_lens = torch.zeros(B, W, dtype=torch.long, device=device)
    pool_done = torch.zeros(B, W, dtype=torch.bool, device=device)
    can_improve = torch.ones(B, dtype=torch.bool, device=device)
    top_w = torch.arange(K, device=device) < W  # only the best W candidates may finish
    results: list[list[list[int]]] = [[] for _ in range(B)]
    for step in range(L):
        A = len(items)
        gen_len = step + 1
        history = run_seqs[:, :, : step + 1].reshape(A * W, step + 1)
        logp = model.decode(history[:, -1:], cache)[:, -1].float().log_softmax(dim=-1)  # (A * W, V)
        # transformers processes log-probabilities in beam search (a forced token scores 0)
        if step < min_tokens and stop:
            logp = logp.index_fill(1, stop_t, lp.NEG_INF)
        logp = rules.apply(logp, history, step)
        V = logp.shape[-1]
        total = (logp.view(A, W, V) + run_scores.unsqueeze(2)).view(A, W * V)
        cand_scores, cand_idx = total.topk(K, dim=1)  # (A, K), best first
        cand_beam, cand_tok = cand_idx // V, cand_idx % V
        cand_seqs = run_seqs.gather(1, cand_beam[:, :, None].expand(A, K, L + 1)).clone()  # (A, K, L + 1)
        cand_seqs[:, :, step + 1] = cand_tok
        hits = torch.isin(cand_tok, stop_t) if stop else torch.zeros_like(cand_tok, dtype=torch.bool)
        if gen_len >= L:
            hits = torch.ones_like(hits)

        # The best W candidates that did not finish run on.
        alive = cand_scores + hits.float() * _NEG
        nxt = alive.topk(W, dim=1).indices  # (A, W)
        run_seqs = cand_seqs.gather(1, nxt[:, :, None].expand(A, W, L + 1))
        run_scores = alive.gather(1, nxt)
        run_beam = cand_beam.gather(1, nxt)

        # Candidates among the best W that finished may enter the pool.
        finished_now = hits & top_w
        norm = cand_scores / (gen_len**lpen)
        pool_full = pool_done.all(dim=1, keepdim=True) & (early_stopping is True)
        norm = norm + pool_full.float() * _NEG + (~can_improve).float().unsqueeze(1) * _NEG
        norm = norm + (~finished_now).float() * _NEG
        merged = torch.cat([pool_scores, norm], dim=1)  # (A, W + K)
        keep = merged.topk(W, dim=1).indices
        pool_scores = merged.gather(1, keep)
        pool_seqs = torch.cat([pool_seqs, cand_seqs], dim=1).gather(1, keep[:, :, None].expand(A, W, L + 1))
        new_lens = torch.full((A, K), gen_len, dtype=torch.long, device=device)
        pool_lens = torch.cat([pool_lens, new_lens], dim=1).gather(1, keep)
        pool_done = torch.cat([pool_done, finished_now], dim=1).gather(1, keep)

        # Could a running beam still beat the worst finished hypothesis?
        best_len = L if (early_stopping == "never" and lpen > 0.0) else gen_len
        best_running = run_scores[:, :1] / (best_len**lpen)
        worst = torch.where(pool_done, pool_scores.min(dim=1, keepdim=True).values, _NEG)
        can_improve = can_improve & (best_running > worst).any(dim=1)
        done = ~can_improve | hits.all(dim=1)
        if early_stopping is True:
            done = done | pool_done.all(dim=1)
        done_l = done.tolist() if gen_len < L else [True] * A
        for a, d in enumerate(done_l):
            if d:
                results[items[a]] = _hypotheses(pool_seqs[a], pool_lens[a], pool_done[a])
        if all(done_l):
            break
        live = [a for a, d in enumerate(done_l) if not d]
        if len(live) != A:
            sel = torch.tensor(live, dtype=torch.long, device=device)
            run_seqs, run_scores, run_beam = run_seqs[sel], run_scores[sel], run_beam[sel]
            pool_seqs, pool_scores, pool_lens, pool_done = (
                t[sel] for t in (pool_seqs, pool_scores, pool_lens, pool_done)
            )
            can_improve = can_improve[sel]
            items = [items[a] for a in live]
        # Each running beam continues the cache row of the beam it came from (rows are
        # still laid out by the inputs of this step: W rows per input).
        rows = run_beam.new_tensor(live).unsqueeze(1) * W + run_beam  # (A', W)
        cache.select_rows(rows.view(-1))
    return results


def _hypotheses(seqs: torch.Tensor, lens: torch.Tensor, done: torch.Tensor) -> list[list[int]]:
    """The finished hypotheses of one input, best first, without the start token."""
    return [s[1 : 1 + n] for s, n, d in zip(seqs.tolist(), lens.tolist(), done.tolist()) if d]
