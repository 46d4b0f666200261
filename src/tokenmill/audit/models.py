"""The models an audit scores: a causal LM (log-likelihood, generation) or a masked LM
(pseudo-log-likelihood, fill-mask), found from the checkpoint, with the errors a user
meets when a model cannot run a probe."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from tokenmill.audit.suites import AuditError

CAUSAL, MASKED = "causal-lm", "masked-lm"

#: the kinds of model each probe runs on, and how the error says it
NEEDS: dict[str, tuple[tuple[str, ...], str]] = {
    "occupations": (
        (CAUSAL, MASKED),
        "a causal language model (scored by the log-likelihood of the next words) or a masked "
        "language model with its prediction head (scored at the mask)",
    ),
    "paired-sentences": (
        (CAUSAL, MASKED),
        "a causal language model (sentence log-likelihood) or a masked language model with its "
        "prediction head (pseudo-log-likelihood)",
    ),
    "counterfactual": ((CAUSAL,), "a causal language model that generates text"),
}


@dataclass
class AuditModel:
    name: str
    kind: str  # CAUSAL, MASKED, or "encoder" (no masked-LM head)
    source: str
    load_s: float
    #: CAUSAL: the LoadedModel (or the LLM, when generation is needed); MASKED: the fill-mask pipeline
    handle: Any = None
    llm: Any = None
    #: why an encoder cannot fill masks (the loader's message), for the probe error
    why: str = ""
    #: what the causal model's contexts start with, and how that was chosen
    start_ids: list[int] = field(default_factory=list)
    start_rule: str = ""

    @property
    def tokenizer(self) -> Any:
        return self.handle.tokenizer

    def check(self, probe: str) -> None:
        kinds, wording = NEEDS[probe]
        if self.kind in kinds:
            return
        if self.kind == CAUSAL:
            what = "is a causal language model"
        elif self.kind == MASKED:
            what = "is a masked language model, which does not generate text"
        else:
            what = f"is an encoder without a masked-language-model head ({self.why})"
        raise AuditError(
            f"model {self.name!r} cannot run the {probe!r} probe: the probe needs {wording}; {self.name!r} {what}"
        )

    def describe(self) -> dict[str, Any]:
        out = {"name": self.name, "kind": self.kind, "source": self.source, "load_seconds": self.load_s}
        if self.kind == CAUSAL:
            out["context_start"] = {"ids": self.start_ids, "rule": self.start_rule}
        return out


def _model_type(source: str) -> str | None:
    path = os.path.join(source, "config.json")
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f).get("model_type")
    except (OSError, json.JSONDecodeError):
        return None


def _is_decoder(model_type: str) -> bool:
    from tokenmill.models.registry import family_for

    try:
        family_for(model_type, "")
    except ValueError:
        return False
    return True


def _start(tokenizer: Any) -> tuple[list[int], str]:
    """The tokens a text's first word is predicted from, so no word goes unscored."""
    with_special = tokenizer.encode("a")
    plain = tokenizer.encode("a", add_special_tokens=False)
    added = with_special[: len(with_special) - len(plain)] if with_special[-len(plain) :] == plain else []
    if added:
        return added, "the tokens the tokenizer adds before a text (BOS)"
    if tokenizer.bos_token_id is not None:
        return [tokenizer.bos_token_id], "the BOS token (the tokenizer adds none by itself)"
    if tokenizer.eos_token_id is not None:
        return [tokenizer.eos_token_id], "the end-of-text token, which separates documents in training"
    return [], "none: the model has no BOS or EOS token, so a text's first token is not scored"


def open_model(
    name: str, *, generate: bool, dtype: str | None = None, device: str | None = None, batch_size: int = 32
) -> AuditModel:
    """Load ``name`` as whatever kind it is; ``generate`` loads a causal LM's engine too."""
    from tokenmill.models.task_registry import TASK_FAMILIES
    from tokenmill.utils.errors import ModelLoadError
    from tokenmill.weights.model_loader import resolve_source

    t0 = time.perf_counter()
    try:
        source = resolve_source(name)
    except ModelLoadError as e:
        raise AuditError(f"unknown model {name!r}: {e}") from None
    model_type = _model_type(source) if os.path.isdir(source) else None
    if model_type in TASK_FAMILIES and not _is_decoder(model_type):
        return _open_encoder(name, source, t0, dtype, device, batch_size)
    if generate:
        from tokenmill import LLM

        llm = LLM(source, dtype=dtype or "float32", device=device)
        loaded = llm.loaded
    else:
        from tokenmill import load_model

        llm, loaded = None, load_model(source, dtype=dtype or "float32", device=device)
    start_ids, rule = _start(loaded.tokenizer)
    return AuditModel(name, CAUSAL, source, time.perf_counter() - t0, loaded, llm, "", start_ids, rule)


def _open_encoder(
    name: str, source: str, t0: float, dtype: str | None, device: str | None, batch: int
) -> AuditModel:
    from tokenmill import pipeline
    from tokenmill.weights.task_loader import MissingHeadError

    try:
        pipe = pipeline("fill-mask", model=source, dtype=dtype, device=device, batch_size=batch)
    except MissingHeadError as e:
        return AuditModel(name, "encoder", source, time.perf_counter() - t0, why=str(e))
    return AuditModel(name, MASKED, source, time.perf_counter() - t0, pipe)


# -- scoring ------------------------------------------------------------------------------
Progress = Callable[[int], None]


def causal_continuations(
    model: AuditModel, pairs: Sequence[tuple[str, str]], batch_size: int, progress: Progress | None = None
) -> list[list[float]]:
    """log p of each token of ``continuation`` after ``context`` (texts); the context starts
    with the model's start tokens."""
    from tokenmill.eval.loglik import continuation_logprobs

    tok = model.tokenizer
    requests = []
    for context, continuation in pairs:
        ctx = model.start_ids + tok.encode(context, add_special_tokens=False)
        requests.append((ctx, tok.encode(continuation, add_special_tokens=False)))
    return continuation_logprobs(model.handle, requests, batch_size=batch_size, progress=progress)


def causal_sentences(
    model: AuditModel, texts: Sequence[str], batch_size: int, progress: Progress | None = None
) -> list[list[float]]:
    """log p of every token of each text, each given the start tokens and the tokens before it."""
    from tokenmill.eval.loglik import continuation_logprobs

    tok = model.tokenizer
    requests = []
    for text in texts:
        ids = tok.encode(text, add_special_tokens=False)
        # Without start tokens the first token has no context and stays unscored.
        requests.append((model.start_ids, ids) if model.start_ids else (ids[:1], ids[1:]))
    return continuation_logprobs(model.handle, requests, batch_size=batch_size, progress=progress)


def masked_spans(
    model: AuditModel,
    items: Sequence[tuple[str, tuple[int, int] | None]],
    batch_size: int,
    progress: Progress | None = None,
) -> list[list[float]]:
    """Pseudo-log-probabilities of the tokens of each text inside a character span (None:
    every token but the special ones), each token masked on its own."""
    from tokenmill.eval.loglik import pseudo_logprobs

    pipe = model.handle
    sequences, positions = [], []
    for k, (text, span) in enumerate(items):
        enc = pipe.encode(text, index=k)
        chosen = [
            p
            for p, ((a, b), special) in enumerate(zip(enc.offsets, enc.special_tokens_mask))
            if not special and b > a and (span is None or (a < span[1] and b > span[0]))
        ]
        if not chosen:
            raise AuditError(f"{text!r} has no token to score with {model.name!r}")
        sequences.append(list(enc.ids))
        positions.append(chosen)
    return pseudo_logprobs(pipe, sequences, positions, batch_size=batch_size, progress=progress)
