"""The offline ``LLM``: load a model once, then generate, chat, stream and beam-search."""

from __future__ import annotations

from collections.abc import Iterator
from collections.abc import Sequence as Seq
from typing import Any

import torch

from tokenmill.generation.beam_search import beam_search, to_hypotheses
from tokenmill.generation.engine import EngineConfig, LLMEngine
from tokenmill.generation.errors import check_context
from tokenmill.generation.outputs import BeamSearchOutput, RequestOutput
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
        max_batch_size: most sequences the engine runs in one step.
        max_num_batched_tokens: token budget of one engine step (long prompts are
            prefilled in chunks of at most this many tokens).
        kv_cache_memory: bytes for the paged KV cache (default: from free memory).
        enable_prefix_caching: reuse the KV blocks of prompts that share a prefix.
        quantization: "int8" or "int4" to keep every linear layer's weight quantized
            (weight-only; activations stay in ``dtype``), "w4a8" or "w8a8" for int4 or int8
            weights with the activations rounded to int8 per group as each layer runs, "gguf" (GGUF files
            only) to keep each matrix at the precision its file stores it in, or None. See
            docs/quantization.md.
        enforce_eager: on CUDA, run decode steps eagerly instead of replaying the CUDA
            graphs captured at start-up (one per decode batch size up to
            ``max_batch_size``).
    """

    def __init__(
        self,
        model: str | None = None,
        *,
        dtype: str | torch.dtype | None = None,
        device: str | torch.device | None = None,
        revision: str | None = None,
        max_batch_size: int = 32,
        max_num_batched_tokens: int = 1024,
        kv_cache_memory: int | None = None,
        enable_prefix_caching: bool = True,
        quantization: str | None = None,
        enforce_eager: bool = False,
    ) -> None:
        from tokenmill.weights.model_loader import load_model

        if isinstance(max_batch_size, bool) or not isinstance(max_batch_size, int) or max_batch_size < 1:
            raise ValueError(f"max_batch_size must be an integer >= 1, got {max_batch_size!r}")
        config = EngineConfig(
            max_num_seqs=max_batch_size,
            max_num_batched_tokens=max_num_batched_tokens,
            kv_cache_memory=kv_cache_memory,
            enable_prefix_caching=enable_prefix_caching,
            quantization=quantization,
            enforce_eager=enforce_eager,
        )
        loaded = load_model(
            model, dtype=dtype, device=device, revision=revision, quantization=config.quantization
        )
        self.loaded = loaded
        self.engine = LLMEngine(loaded, config)
        self.config = loaded.config
        self.tokenizer = loaded.tokenizer
        self.device, self.dtype = self.engine.device, self.engine.dtype
        self.runner = self.engine.runner
        self.eos_token_ids = self.engine.eos_token_ids
        self.generation_defaults = loaded.generation_defaults
        self.max_batch_size = max_batch_size
        self._request_counter = 0

    # -- helpers ----------------------------------------------------------------------
    def get_tokenizer(self) -> Tokenizer:
        return self.tokenizer

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

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

    def _add(self, prompts: Seq[Prompt], params: Seq[SamplingParams | None]) -> list[str]:
        """Check every request first, then queue them all; returns their ids in order."""
        checked = []
        for prompt, sp in zip(prompts, params):
            text, ids = self._prompt_ids(prompt)
            checked.append((text, ids, self.engine.resolve_params(sp, len(ids))))
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        request_ids = []
        for text, ids, p in checked:
            request_id = str(self._request_counter)
            self._request_counter += 1
            self.engine.add_request(request_id, ids, p, prompt=text)
            request_ids.append(request_id)
        return request_ids

    def _run(self, request_ids: list[str]) -> Iterator[tuple[str, RequestOutput]]:
        """Step the engine until these requests finish, yielding each changed output."""
        pending = set(request_ids)
        try:
            while pending:
                for group in self.engine.step():
                    if group.request_id in pending:
                        out = self.engine.snapshot(group)
                        if out.finished:
                            pending.discard(group.request_id)
                            out.metrics.peak_memory_bytes = peak_memory_bytes(self.device)
                        yield group.request_id, out
        finally:
            for request_id in pending:  # an interrupted caller leaves nothing running
                self.engine.abort(request_id)

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
        request_ids = self._add(prompts, params)
        final = {rid: out for rid, out in self._run(request_ids) if out.finished}
        return [final[rid] for rid in request_ids]

    def stream(self, prompt: Prompt, sampling_params: SamplingParams | None = None) -> TextStream:
        """Iterate over text deltas as they are decoded; together they are exactly the final text.

        The returned stream's ``output`` holds the RequestOutput (with metrics) once it is exhausted.
        """
        sp = sampling_params or SamplingParams()
        if sp.n != 1:
            raise ValueError(f"stream() produces one sequence; got n={sp.n}, use generate() for n > 1")
        return TextStream(self._run(self._add([prompt], [sp])))

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

    def __init__(self, outputs: Iterator[tuple[str, RequestOutput]]) -> None:
        self._outputs = outputs
        self._sent = 0
        self.output: RequestOutput | None = None

    def __iter__(self) -> TextStream:
        return self

    def __next__(self) -> str:
        for _rid, out in self._outputs:
            text = out.outputs[0].text
            delta, self._sent = text[self._sent :], len(text)
            if out.finished:
                self.output = out
            if delta:
                return delta
        raise StopIteration

    def close(self) -> None:
        """Stop early; the request is aborted and its KV blocks freed."""
        close = getattr(self._outputs, "close", None)
        if close is not None:
            close()
