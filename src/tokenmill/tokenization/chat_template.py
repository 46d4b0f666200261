"""Rendering a model's Jinja chat template, sandboxed, the way Hugging Face templates expect."""

from __future__ import annotations

import functools
import json
from datetime import datetime
from typing import Any


def render_chat(
    template: str,
    messages: list[dict[str, Any]],
    add_generation_prompt: bool = True,
    **kwargs: Any,
) -> str:
    """Format ``messages`` with a chat template.

    Args:
        template: the Jinja source (``tokenizer.chat_template`` / ``tokenizer_config.json``).
        messages: ``[{"role": ..., "content": ...}, ...]``; content is a string or a list of
            ``{"type": "text", "text": ...}`` parts.
        add_generation_prompt: end with the header that starts the assistant's reply.
        **kwargs: more variables for the template (``bos_token``, ``tools``, ...).

    Returns:
        The prompt text. Raises ``ValueError`` for malformed messages, an invalid template, or a
        template that refuses the conversation (its ``raise_exception`` message is kept).
    """
    if not isinstance(template, str):
        raise ValueError(f"chat template must be a string, got {type(template).__name__}")
    _validate_messages(messages)
    compiled = _compile(template)
    try:
        return compiled.render(messages=messages, add_generation_prompt=add_generation_prompt, **kwargs)
    except _TemplateRaised as e:
        raise ValueError(f"chat template rejected the conversation: {e}") from None
    except Exception as e:  # jinja2 runtime errors, sandbox violations, errors from filters
        raise ValueError(f"chat template failed to render: {type(e).__name__}: {e}") from e


class _TemplateRaised(Exception):
    """The template called ``raise_exception``; kept apart from errors in the template itself."""


def _raise_exception(message: str) -> None:
    raise _TemplateRaised(message)


def _tojson(value: Any, indent: int | None = None, ensure_ascii: bool = False, **kwargs: Any) -> str:
    # Jinja's own tojson HTML-escapes <, > and & and writes non-ASCII as \u escapes; prompts want neither.
    return json.dumps(value, indent=indent, ensure_ascii=ensure_ascii, **kwargs)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


@functools.lru_cache(maxsize=1)
def _environment() -> Any:
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols, _generation_extension()]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


@functools.lru_cache(maxsize=32)
def _compile(template: str) -> Any:
    from jinja2 import TemplateSyntaxError

    try:
        return _environment().from_string(template)
    except TemplateSyntaxError as e:
        raise ValueError(f"chat template is invalid: {e.message} (line {e.lineno})") from None


def _generation_extension() -> type:
    """``{% generation %}...{% endgeneration %}`` marks assistant text for training masks; we render it as is."""
    from jinja2 import nodes
    from jinja2.ext import Extension

    class GenerationBlock(Extension):
        tags = {"generation"}

        def parse(self, parser: Any) -> Any:
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return nodes.Scope(body, lineno=lineno)

    return GenerationBlock


def _validate_messages(messages: Any) -> None:
    if not isinstance(messages, list):
        raise ValueError(f"messages must be a list of dicts, got {type(messages).__name__}")
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise ValueError(
                f"messages[{i}] must be a dict with 'role' and 'content', got {type(message).__name__}"
            )
        role = message.get("role")
        if not isinstance(role, str):
            problem = "has no 'role'" if role is None else f"has a 'role' of type {type(role).__name__}"
            raise ValueError(f"messages[{i}] {problem}; 'role' must be a string such as 'user'")
        if "content" not in message:
            raise ValueError(f"messages[{i}] has no 'content'")
        content = message["content"]
        if isinstance(content, str):
            continue
        if content is None and message.get("tool_calls"):
            continue  # an assistant turn that only calls tools (OpenAI's shape)
        if not isinstance(content, list):
            raise ValueError(
                f"messages[{i}] 'content' must be a string or a list of text parts, got {type(content).__name__}"
            )
        for j, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text":
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise ValueError(
                    f"messages[{i}] content part {j} is {kind!r}; only {{'type': 'text', 'text': ...}} "
                    "parts are supported"
                )
            if not isinstance(part.get("text"), str):
                raise ValueError(f"messages[{i}] content part {j} has no string 'text'")
