"""text-generation on tokenmill's engine: prompts or chats in, transformers' output shape out.

Defaults follow transformers' pipeline: a model's generation_config wins; otherwise
sampling at temperature 0.7 for up to 256 new tokens. Prompts are encoded with the
tokenizer's special tokens (BOS), as transformers 5 does; ``add_special_tokens=False`` leaves them out.
"""

from __future__ import annotations

from typing import Any

import torch

from tokenmill.generation.sampling_params import BeamSearchParams, SamplingParams
from tokenmill.pipelines.base import PipelineInputError

_OPTIONS = frozenset(
    {
        "max_new_tokens",
        "do_sample",
        "temperature",
        "top_k",
        "top_p",
        "min_p",
        "repetition_penalty",
        "num_return_sequences",
        "num_beams",
        "length_penalty",
        "return_full_text",
        "stop_sequence",
        "seed",
        "add_special_tokens",
        "skip_special_tokens",
        "batch_size",
        "filters",
    }
)


def _is_chat(x: Any) -> bool:
    return isinstance(x, list) and bool(x) and all(isinstance(m, dict) for m in x)


class TextGenerationPipeline:
    """``pipe(prompt | chat | list of them, **options)`` -> ``[{"generated_text": ...}, ...]`` per input."""

    task = "text-generation"

    def __init__(
        self,
        model: str,
        *,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
        revision: str | None = None,
        batch_size: int = 8,
        **defaults: Any,
    ) -> None:
        from tokenmill.generation.llm import LLM

        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        self.defaults = self._check(defaults)
        if "filters" in self.defaults:  # a file is read (and its classifiers loaded) once, here
            self.defaults["filters"] = _filters(self.defaults["filters"], allow_path=True)
        self.llm = LLM(
            model, dtype=dtype, device=device, revision=revision, max_batch_size=max(batch_size, 8)
        )
        self.tokenizer = self.llm.tokenizer

    @staticmethod
    def _check(options: dict[str, Any]) -> dict[str, Any]:
        unknown = sorted(set(options) - _OPTIONS)
        if unknown:
            raise ValueError(
                f"text-generation got unknown option(s) {', '.join(map(repr, unknown))}; "
                f"it accepts {', '.join(sorted(_OPTIONS))}"
            )
        for name in ("do_sample", "return_full_text", "add_special_tokens", "skip_special_tokens"):
            if name in options and not isinstance(options[name], bool):
                raise ValueError(f"{name} must be True or False, got {options[name]!r}")
        return dict(options)

    def _params(self, o: dict[str, Any]) -> SamplingParams | BeamSearchParams:
        gen = self.llm.generation_defaults
        max_new = o.get("max_new_tokens", gen.get("max_new_tokens", 256))
        beams = o.get("num_beams", gen.get("num_beams", 1))
        n = o.get("num_return_sequences", 1)
        stop = o.get("stop_sequence")
        skip = o.get("skip_special_tokens", True)
        if isinstance(beams, bool) or not isinstance(beams, int) or beams < 1:
            raise ValueError(f"num_beams must be a positive integer, got {beams!r}")
        if beams > 1:
            if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= beams:
                raise ValueError(f"num_return_sequences must be between 1 and num_beams={beams}, got {n!r}")
            return BeamSearchParams(
                beam_width=beams,
                max_tokens=max_new,
                length_penalty=o.get("length_penalty", gen.get("length_penalty", 1.0)),
                skip_special_tokens=skip,
            )
        do_sample = o.get("do_sample", gen.get("do_sample", True))
        temperature = o.get("temperature", gen.get("temperature", 0.7)) if do_sample else 0.0
        return SamplingParams(
            n=n,
            max_tokens=max_new,
            temperature=temperature,
            top_k=o.get("top_k", gen.get("top_k")) if do_sample else None,
            top_p=o.get("top_p", gen.get("top_p")) if do_sample else None,
            min_p=o.get("min_p") if do_sample else None,
            repetition_penalty=o.get("repetition_penalty", gen.get("repetition_penalty")),
            seed=o.get("seed"),
            stop=stop,
            skip_special_tokens=skip,
        )

    def _prompt(self, item: Any, i: int, o: dict[str, Any]) -> list[int]:
        if _is_chat(item):
            for m in item:
                if "role" not in m or "content" not in m:
                    raise PipelineInputError(f"input {i}: every chat message needs 'role' and 'content'")
            return self.llm.format_chat(item)
        if not isinstance(item, str):
            raise PipelineInputError(
                f"input {i} must be a string or a chat (a list of {{'role', 'content'}} dicts), "
                f"got {type(item).__name__}"
            )
        if not item:
            raise PipelineInputError(f"input {i} is an empty string; give a prompt")
        return self.tokenizer.encode(item, add_special_tokens=o.get("add_special_tokens", True))

    def __call__(self, inputs: Any, **options: Any) -> Any:
        options = self._check(options)
        if "filters" in options:
            options["filters"] = _filters(options["filters"], allow_path=False)
        o = {**self.defaults, **options}
        single = isinstance(inputs, str) or _is_chat(inputs)
        items = [inputs] if single else inputs
        if not isinstance(items, list) or not items:
            raise PipelineInputError("text-generation needs a prompt, a chat, or a non-empty list of them")
        prompts = [self._prompt(x, i, o) for i, x in enumerate(items)]
        params = self._params(o)
        if isinstance(params, BeamSearchParams):
            n = o.get("num_return_sequences", 1)
            texts = [[h.text for h in out.sequences[:n]] for out in self.llm.beam_search(prompts, params)]
        else:
            texts = [[c.text for c in out.outputs] for out in self.llm.generate(prompts, params)]
        full = o.get("return_full_text", True)
        filters = o.get("filters")
        results = []
        for item, outs in zip(items, texts):
            rows = []
            for t in outs:
                verdict = filters.apply(t) if filters is not None else None
                if verdict is not None:
                    t = verdict.text
                if _is_chat(item):
                    row: dict[str, Any] = {
                        "generated_text": [*item, {"role": "assistant", "content": t}] if full else t
                    }
                else:
                    row = {"generated_text": item + t if full else t}
                if verdict is not None:
                    row["filters"] = {"finish_reason": verdict.finish_reason, "decisions": verdict.decisions}
                rows.append(row)
            results.append(rows)
        return results[0] if single else results


def _filters(value: Any, allow_path: bool) -> Any:
    """A FilterSet from the ``filters`` option: a FilterSet or, when the pipeline is made, the
    path of a filter file. A call cannot name a file: a call's options may come from a
    client (the server's pipeline route), which must not make the server read files."""
    import os

    from tokenmill.filters import FilterSet, load_filters

    if isinstance(value, FilterSet):
        return value
    if allow_path and isinstance(value, (str, os.PathLike)):
        return load_filters(value)
    accepted = (
        "a tokenmill.filters.FilterSet or the path of a filter file"
        if allow_path
        else (
            "a tokenmill.filters.FilterSet (load a file with tokenmill.filters.load_filters, or pass "
            "its path when making the pipeline)"
        )
    )
    raise ValueError(f"filters must be {accepted}; got {type(value).__name__}")
