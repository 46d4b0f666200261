"""Request bodies of the OpenAI routes and their translation to SamplingParams.

Fields follow OpenAI's API plus the extras vLLM accepts (``top_k``, ``min_p``,
``repetition_penalty``, ``min_tokens``, ``ignore_eos``, ``stop_token_ids``,
``skip_special_tokens``, ``include_stop_str_in_output``, ``return_tokens_as_token_ids``,
and ``use_beam_search`` with ``length_penalty`` and ``early_stopping``, see server/beam.py).
Unknown fields are ignored, as OpenAI does. Types are strict (``"0.5"`` is not a number);
value ranges are checked once, by SamplingParams, whose messages name the field.
"""

from __future__ import annotations

import json
import re
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

from tokenmill.generation.sampling_params import SamplingParams
from tokenmill.server.errors import APIError, clip, from_validation_errors, invalid_param

#: OpenAI's own limit on samples per request
MAX_N = 128
_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    include_usage: bool | None = False


class _SamplingRequest(BaseModel):
    """Fields shared by completions and chat completions. ``None`` means "not given"."""

    model_config = ConfigDict(extra="ignore", strict=True)

    model: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    n: int | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    # str or list[str]; SamplingParams checks it and says so
    stop: Any = None
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    # vLLM's extras
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    min_tokens: int | None = None
    ignore_eos: bool | None = None
    stop_token_ids: list[int] | None = None
    skip_special_tokens: bool | None = None
    include_stop_str_in_output: bool | None = None
    # logprobs name tokens "token_id:N" instead of their text
    return_tokens_as_token_ids: bool | None = None
    # beam search (vLLM's extras): n beams, n hypotheses returned best first
    use_beam_search: bool | None = None
    length_penalty: float | None = None
    early_stopping: bool | None = None

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)


class CompletionRequest(_SamplingRequest):
    # a string or a list of token ids (a list holding one of those is unwrapped)
    prompt: Any
    logprobs: int | None = None
    echo: bool | None = False
    suffix: str | None = None
    best_of: int | None = None


class ChatCompletionRequest(_SamplingRequest):
    messages: list[dict[str, Any]]
    max_completion_tokens: int | None = None
    logprobs: bool | None = False
    top_logprobs: int | None = None
    tools: list[Any] | None = None
    response_format: dict[str, Any] | None = None
    add_generation_prompt: bool | None = True


def parse_body(body: bytes, model: type[BaseModel]) -> Any:
    """Parse and validate a JSON body; any failure is a 400 naming what is wrong."""
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError) as e:
        raise APIError(400, f"the request body is not valid JSON: {clip(str(e))}") from None
    if not isinstance(data, dict):
        raise APIError(400, "the request body must be a JSON object")
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise from_validation_errors(e.errors(include_url=False, include_input=False)) from None


# -- prompts -----------------------------------------------------------------------


def _is_token_list(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in value)


def completion_prompt(prompt: Any, vocab_size: int) -> str | list[int]:
    """The one prompt of a completion request: its text or its token ids."""
    if isinstance(prompt, list) and prompt and not _is_token_list(prompt):
        if len(prompt) > 1:
            raise invalid_param(
                f"prompt holds {len(prompt)} prompts; this server takes one prompt per request, "
                "so send one request for each",
                "prompt",
            )
        prompt = prompt[0]
    if isinstance(prompt, str):
        return prompt
    if _is_token_list(prompt):
        if not prompt:
            raise invalid_param("prompt must not be empty", "prompt")
        bad = [t for t in prompt if not 0 <= t < vocab_size]
        if bad:
            raise invalid_param(
                f"prompt token id {bad[0]} is outside the vocabulary [0, {vocab_size})", "prompt"
            )
        return list(prompt)
    raise invalid_param(
        f"prompt must be a string or a list of token ids, got {clip(prompt)}",
        "prompt",
    )


def chat_messages(messages: list[dict[str, Any]]) -> list[dict[str, str]]:
    """Messages for the chat template: role and text content; text parts are joined."""
    if not messages:
        raise invalid_param("messages must hold at least one message", "messages")
    out = []
    for i, m in enumerate(messages):
        role = m.get("role")
        if not isinstance(role, str):
            raise invalid_param(
                f"messages[{i}].role must be a string, got {clip(role)}", f"messages[{i}].role"
            )
        content = m.get("content")
        if content is None:
            text = ""
        elif isinstance(content, str):
            text = content
        elif isinstance(content, list):
            parts = []
            for j, part in enumerate(content):
                if not (
                    isinstance(part, dict)
                    and part.get("type") == "text"
                    and isinstance(part.get("text"), str)
                ):
                    kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                    raise invalid_param(
                        f"messages[{i}].content[{j}] is a {clip(kind)!s} part; only text parts are supported",
                        f"messages[{i}].content[{j}]",
                    )
                parts.append(part["text"])
            text = "".join(parts)
        else:
            raise invalid_param(
                f"messages[{i}].content must be a string or a list of text parts, got {clip(content)}",
                f"messages[{i}].content",
            )
        # Many chat templates predate OpenAI's "developer" role; it means "system".
        out.append({"role": "system" if role == "developer" else role, "content": text})
    return out


# -- sampling ----------------------------------------------------------------------


def _check_token_ids(ids: Any, vocab_size: int, param: str) -> None:
    for t in ids:
        tok = int(t)
        if not 0 <= tok < vocab_size:
            raise invalid_param(f"{param}: token id {tok} is outside the vocabulary [0, {vocab_size})", param)


def _first_word(message: str) -> str:
    m = re.match(r"[a-z_]+", message)
    return m.group(0) if m else ""


def sampling_params(
    req: _SamplingRequest,
    *,
    max_tokens: int | None,
    logprobs: int | None,
    vocab_size: int,
    names: dict[str, str] | None = None,
) -> SamplingParams:
    """SamplingParams for ``req``; a bad value is a 400 whose ``param`` is the request field.

    Args:
        max_tokens: the request's token limit (None: the room left in the context).
        logprobs: top log-probabilities to return per token (None: none).
        names: SamplingParams field -> request field, where they differ.
    """
    names = names or {}
    if req.n is not None and req.n > MAX_N:
        raise invalid_param(f"n must be in [1, {MAX_N}], got {req.n}", "n")
    if req.seed is not None and not _INT64_MIN <= req.seed <= _INT64_MAX:
        raise invalid_param(f"seed must be a 64-bit signed integer, got {clip(req.seed)}", "seed")
    if req.logit_bias:
        try:
            _check_token_ids(req.logit_bias, vocab_size, "logit_bias")
        except ValueError:
            raise invalid_param("logit_bias keys must be token ids", "logit_bias") from None
    if req.stop_token_ids:
        _check_token_ids(req.stop_token_ids, vocab_size, "stop_token_ids")
    kwargs = {
        "n": 1 if req.n is None else req.n,
        "max_tokens": max_tokens,
        "min_tokens": req.min_tokens or 0,
        "temperature": req.temperature,
        "top_k": req.top_k,
        "top_p": req.top_p,
        "min_p": req.min_p,
        "repetition_penalty": req.repetition_penalty,
        "presence_penalty": req.presence_penalty or 0.0,
        "frequency_penalty": req.frequency_penalty or 0.0,
        "logit_bias": req.logit_bias or None,
        "seed": req.seed,
        "stop": req.stop,
        "stop_token_ids": req.stop_token_ids,
        "ignore_eos": bool(req.ignore_eos),
        "logprobs": logprobs,
        "skip_special_tokens": True if req.skip_special_tokens is None else req.skip_special_tokens,
        "include_stop_str_in_output": bool(req.include_stop_str_in_output),
    }
    try:
        return SamplingParams(**kwargs)
    except ValueError as e:
        raise invalid_param_from(e, names) from None


def invalid_param_from(error: ValueError, names: dict[str, str]) -> APIError:
    """A 400 for a SamplingParams error; its message starts with the field's name."""
    message = str(error)
    # "<field> must be ..., got <value>": the value may be huge; quote only its start
    head, sep, value = message.partition(", got ")
    message = head + sep + clip(value) if sep else message
    field = _first_word(message)
    if field not in SamplingParams.__dataclass_fields__:
        field = ""
    param = names.get(field, field) or None
    if param and param != field:
        message = f"{param} ({field}): {message}"
    return invalid_param(message, param)
