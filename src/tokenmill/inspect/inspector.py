"""The inspection service of one engine: its passes run on a thread of their own, one
at a time, never on the engine's thread and never inside an engine step."""

from __future__ import annotations

import concurrent.futures
import threading
from collections.abc import Callable
from typing import Any, TypeVar

import torch

from tokenmill.generation.sampling_params import SamplingParams
from tokenmill.inspect.forward import InspectionModel
from tokenmill.inspect.tokens import Step, token_steps

T = TypeVar("T")

#: the longest input whose attention weights are returned (layers x heads x T x T numbers)
MAX_ATTENTION_TOKENS = 256
#: most alternatives shown per step (the engine's own limit on top logprobs)
MAX_TOP_N = 20


class Inspector:
    """Token probabilities and attention weights for the model an ``LLMEngine`` serves.

    The model's parameters are shared with the engine (both only read them); each pass
    builds its own attention context and uses rope tables of its own. A lock keeps two
    inspections from running at once, and ``submit`` runs them on one worker thread, so
    PyTorch sees one extra thread at most, whatever the number of requests.
    """

    def __init__(self, engine: Any) -> None:
        """``engine``: an ``LLMEngine`` (an ``AsyncEngine``'s ``.engine``)."""
        self.model = InspectionModel(engine.runner.model)
        self.vocab_size: int = engine.model_config.vocab_size
        self.eos_token_ids: list[int] = list(engine.eos_token_ids)
        self.generation_defaults: dict[str, Any] = dict(engine.generation_defaults or {})
        self._lock = threading.Lock()
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._executor_lock = threading.Lock()

    @property
    def num_layers(self) -> int:
        return self.model.num_layers

    @property
    def num_heads(self) -> int:
        return self.model.num_heads

    def submit(self, fn: Callable[..., T], *args: Any) -> concurrent.futures.Future[T]:
        """Run ``fn(*args)`` on the inspection thread."""
        with self._executor_lock:
            if self._executor is None:
                self._executor = concurrent.futures.ThreadPoolExecutor(
                    1, thread_name_prefix="tokenmill-inspect"
                )
            return self._executor.submit(fn, *args)

    def close(self) -> None:
        with self._executor_lock:
            if self._executor is not None:
                self._executor.shutdown(wait=False, cancel_futures=True)
                self._executor = None

    def _check_ids(self, ids: list[int], what: str) -> None:
        bad = [t for t in ids if not 0 <= t < self.vocab_size]
        if bad:
            raise ValueError(f"{what}: token id {bad[0]} is outside the vocabulary [0, {self.vocab_size})")

    def token_probabilities(
        self, prompt_ids: list[int], completion_ids: list[int], params: SamplingParams, top_n: int = 10
    ) -> list[Step]:
        """Each completion token's step: its probabilities and the ``top_n`` alternatives.

        ``params`` are resolved here from the model's generation defaults, as the engine
        resolves a request's parameters.
        """
        if not prompt_ids:
            raise ValueError("prompt_ids must hold at least one token")
        if not completion_ids:
            raise ValueError("completion_ids must hold at least one token")
        if isinstance(top_n, bool) or not isinstance(top_n, int) or not 1 <= top_n <= MAX_TOP_N:
            raise ValueError(f"top_n must be an integer in [1, {MAX_TOP_N}], got {top_n!r}")
        self._check_ids(prompt_ids, "prompt_ids")
        self._check_ids(completion_ids, "completion_ids")
        resolved = params if params._resolved else params.resolved(self.generation_defaults, self.vocab_size)
        ids = list(prompt_ids) + list(completion_ids)
        with self._lock:
            logits = self.model.logits(ids[:-1], start=len(prompt_ids) - 1)  # (C, V)
            return token_steps(
                logits, list(prompt_ids), list(completion_ids), resolved, self.eos_token_ids, top_n
            )

    def attention(self, ids: list[int], layers: list[int] | None = None) -> dict[int, torch.Tensor]:
        """Attention probabilities (H, T, T), float32 on the CPU, per layer (all, or ``layers``)."""
        if not ids:
            raise ValueError("the input must hold at least one token")
        if len(ids) > MAX_ATTENTION_TOKENS:
            raise ValueError(
                f"attention inspection takes at most {MAX_ATTENTION_TOKENS} tokens, got {len(ids)}"
            )
        self._check_ids(ids, "input")
        if layers is not None:
            bad = [i for i in layers if not 0 <= i < self.num_layers]
            if bad:
                raise ValueError(
                    f"layer {bad[0]} does not exist; the model has layers 0..{self.num_layers - 1}"
                )
        with self._lock:
            weights = self.model.attention(list(ids), layers)
            return {i: w.cpu() for i, w in sorted(weights.items())}
