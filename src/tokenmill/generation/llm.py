"""The offline ``LLM``: load a model once, then generate, chat, stream and beam-search."""

from __future__ import annotations

import time
from collections.abc import Iterator
from collections.abc import Sequence as Seq
from typing import Any

import torch

from tokenmill.generation import dense_engine
from tokenmill.generation.beam_search import beam_search, to_hypotheses
from tokenmill.generation.dense_engine import Sequence, check_context, generate_batch
from tokenmill.generation.outputs import (
    BeamSearchOutput,
    CompletionOutput,
    RequestMetrics,
    RequestOutput,
)
from tokenmill.generation.runner import ModelRunner
from tokenmill.generation.sampling_params import BeamSearchParams, SamplingParams
from tokenmill.tokenization.tokenizer import Tokenizer
from tokenmill.utils.devices import peak_memory_bytes

Prompt = str | list[int]
Message = dict[str, Any]


class LLM:
    """A model ready to generate.

    Args:
        model: short name of a packaged model, a model directory, a .gguf file or a Hub
            repo id; None loads the embedded default (SmolLM2-135M-Instruct).
        dtype: "float32", "bfloat16" (default) or "float16".
        device: "cpu", "cuda" or None for the best available.
        revision: Hub revision (branch, tag or commit) for repo ids.
        max_batch_size: most sequences decoded together by ``generate``.
    """

    def __init__(
        self,
        model: str | None = None,
        *,
        dtype: str | torch.dtype | None = None,
        device: str | torch.device | None = None,
        revision: str | None = None,
        max_batch_size: int = 32,
    ) -> None:
        from tokenmill.weights.model_loader import load_model

        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        loaded = load_model(model, dtype=dtype, device=device, revision=revision)
        self.loaded = loaded
        self.config = loaded.config
        self.tokenizer = loaded.tokenizer
        param = next(loaded.model.parameters())
        self.device, self.dtype = param.device, param.dtype
        self.runner = ModelRunner(loaded.model, loaded.config, self.device, self.dtype)
        self.eos_token_ids = list(loaded.config.eos_token_ids)
        self.generation_defaults = loaded.generation_defaults
        self.max_batch_size = max_batch_size
        self._request_counter = 0

    # -- helpers ----------------------------------------------------------------------
    def get_tokenizer(self) -> Tokenizer:
        return self.tokenizer

    @property
    def max_model_len(self) -> int:
        return self.runner.max_model_len

    def _prompt_ids(self, prompt: Prompt) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            return prompt, self.tokenizer.encode(prompt)
        if isinstance(prompt, (list, tuple)) and all(
            isinstance(t, int) and not isinstance(t, bool) for t in prompt
        ):
            V = self.config.vocab_size
            bad = [t for t in prompt if not 0 <= t < V]
            if bad:
                raise ValueError(f"prompt token id {bad[0]} is outside the vocabulary [0, {V})")
            return None, list(prompt)
        raise TypeError(f"a prompt must be a string or a list of token ids, got {type(prompt).__name__}")

    def _resolve(self, params: SamplingParams | None, prompt_len: int) -> SamplingParams:
        params = SamplingParams() if params is None else params
        if not isinstance(params, SamplingParams):
            raise TypeError(f"sampling_params must be a SamplingParams, got {type(params).__name__}")
        p = params.resolved(self.generation_defaults, self.config.vocab_size)
        if p.max_tokens is None:
            p.max_tokens = max(1, self.max_model_len - prompt_len)
            if p.min_tokens > p.max_tokens:
                raise ValueError(
                    f"min_tokens is {p.min_tokens} but only {p.max_tokens} tokens fit after the "
                    f"{prompt_len}-token prompt in the model's context of {self.max_model_len}"
                )
        check_context(prompt_len, p.max_tokens, self.max_model_len)
        return p

    def _sequences(self, prompts: Seq[Prompt], params: Seq[SamplingParams | None]):
        seqs: list[Sequence] = []
        requests = []
        for i, (prompt, sp) in enumerate(zip(prompts, params)):
            text, ids = self._prompt_ids(prompt)
            p = self._resolve(sp, len(ids))
            metrics = RequestMetrics(arrival_time=time.perf_counter(), prompt_tokens=len(ids))
            requests.append((text, ids, p, metrics))
            for j in range(p.n):
                gen = None
                if p.seed is not None:
                    gen = torch.Generator(device=self.device)
                    gen.manual_seed(p.seed + j)  # each of the n samples gets its own stream
                seqs.append(Sequence(i, j, ids, p, metrics, gen))
        return seqs, requests

    def _run(self, seqs: list[Sequence]) -> Iterator[dense_engine.StepEvent]:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        for start in range(0, len(seqs), self.max_batch_size):
            yield from generate_batch(
                self.runner, self.tokenizer, self.eos_token_ids, seqs[start : start + self.max_batch_size]
            )

    # -- public API -------------------------------------------------------------------
    def generate(
        self,
        prompts: Prompt | Seq[Prompt],
        sampling_params: SamplingParams | Seq[SamplingParams] | None = None,
    ) -> list[RequestOutput]:
        """Generate for each prompt (text or token ids); returns one RequestOutput per prompt."""
        if isinstance(prompts, str) or (
            isinstance(prompts, (list, tuple)) and prompts and isinstance(prompts[0], int)
        ):
            prompts = [prompts]  # type: ignore[list-item]
        prompts = list(prompts)  # type: ignore[arg-type]
        if not prompts:
            raise ValueError("prompts is empty: give at least one prompt")
        if isinstance(sampling_params, (list, tuple)):
            if len(sampling_params) != len(prompts):
                raise ValueError(
                    f"got {len(sampling_params)} sampling_params for {len(prompts)} prompts; give one or one per prompt"
                )
            params = list(sampling_params)
        else:
            params = [sampling_params] * len(prompts)
        seqs, requests = self._sequences(prompts, params)
        for _ in self._run(seqs):
            pass
        return self._outputs(seqs, requests)

    def _outputs(self, seqs: list[Sequence], requests) -> list[RequestOutput]:
        outs = []
        peak = peak_memory_bytes(self.device)
        by_request: dict[int, list[Sequence]] = {}
        for s in seqs:
            by_request.setdefault(s.request_index, []).append(s)
        for i, (text, ids, _p, metrics) in enumerate(requests):
            mine = by_request[i]
            metrics.output_tokens = max(len(s.output_ids) for s in mine)
            metrics.finished_time = max(s.metrics.finished_time or 0.0 for s in mine)
            metrics.peak_memory_bytes = peak
            metrics.finalize()
            completions = [
                CompletionOutput(
                    index=s.sample_index,
                    text=s.text,
                    token_ids=list(s.output_ids),
                    finish_reason=s.finish_reason,
                    stop_reason=s.stop_reason,
                    cumulative_logprob=s.cumulative_logprob if s.logprobs is not None else None,
                    logprobs=s.logprobs,
                )
                for s in mine
            ]
            self._request_counter += 1
            outs.append(RequestOutput(str(self._request_counter - 1), text, ids, completions, True, metrics))
        return outs

    def stream(self, prompt: Prompt, sampling_params: SamplingParams | None = None) -> TextStream:
        """Iterate over text deltas as they are decoded; together they are exactly the final text.

        The returned stream's ``output`` holds the RequestOutput (with metrics) once it is exhausted.
        """
        seqs, requests = self._sequences([prompt], [sampling_params])
        if len(seqs) != 1:
            raise ValueError(f"stream() produces one sequence; got n={len(seqs)}, use generate() for n > 1")
        return TextStream(self, seqs, requests)

    def chat(
        self,
        messages: list[Message] | list[list[Message]],
        sampling_params: SamplingParams | None = None,
        *,
        chat_template: str | None = None,
        add_generation_prompt: bool = True,
    ) -> list[RequestOutput]:
        """Generate replies for one conversation or a list of them, formatted by the chat template."""
        conversations = messages if messages and isinstance(messages[0], list) else [messages]
        prompts = [
            self.format_chat(c, chat_template=chat_template, add_generation_prompt=add_generation_prompt)
            for c in conversations
        ]  # type: ignore[arg-type]
        return self.generate(prompts, sampling_params)

    def format_chat(
        self, messages: list[Message], *, chat_template: str | None = None, add_generation_prompt: bool = True
    ) -> list[int]:
        """Token ids of a conversation rendered by the model's chat template."""
        kwargs = {"chat_template": chat_template} if chat_template else {}
        ids = self.tokenizer.apply_chat_template(
            messages, add_generation_prompt=add_generation_prompt, tokenize=True, **kwargs
        )
        assert isinstance(ids, list)
        return ids

    def beam_search(
        self, prompts: Prompt | Seq[Prompt], params: BeamSearchParams | None = None
    ) -> list[BeamSearchOutput]:
        """Beam search for each prompt; hypotheses come back best first."""
        params = params or BeamSearchParams()
        if isinstance(prompts, str) or (
            isinstance(prompts, (list, tuple)) and prompts and isinstance(prompts[0], int)
        ):
            prompts = [prompts]  # type: ignore[list-item]
        outs = []
        for prompt in prompts:  # type: ignore[union-attr]
            text, ids = self._prompt_ids(prompt)
            check_context(len(ids), params.max_tokens, self.max_model_len)
            results = beam_search(self.runner, ids, params, self.eos_token_ids)
            outs.append(
                BeamSearchOutput(
                    text, ids, to_hypotheses(results, self.tokenizer, params.skip_special_tokens)
                )
            )
        return outs


class TextStream:
    """Text deltas of one streamed request; ``output`` is set when the stream ends."""

    def __init__(self, llm: LLM, seqs: list[Sequence], requests: list) -> None:
        self._llm, self._seqs, self._requests = llm, seqs, requests
        self._events = llm._run(seqs)
        self.output: RequestOutput | None = None

    def __iter__(self) -> TextStream:
        return self

    def __next__(self) -> str:
        for event in self._events:
            if event.delta:
                return event.delta
        if self.output is None:
            self.output = self._llm._outputs(self._seqs, self._requests)[0]
        raise StopIteration
