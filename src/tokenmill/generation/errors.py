"""Errors a caller of the engine can meet."""

from __future__ import annotations


class ContextLengthError(ValueError):
    """The prompt plus max_tokens do not fit in the model's context."""

    def __init__(self, message: str, prompt_tokens: int, max_tokens: int, max_model_len: int) -> None:
        super().__init__(message)
        self.prompt_tokens = prompt_tokens
        self.max_tokens = max_tokens
        self.max_model_len = max_model_len


class EngineDeadError(RuntimeError):
    """The engine is not running (not started, shut down, or stopped by an error)."""


class EngineOverloadedError(RuntimeError):
    """Too many requests are already waiting; try again later."""


def check_context(prompt_len: int, max_tokens: int, max_model_len: int) -> None:
    if prompt_len == 0:
        raise ValueError("the prompt is empty: give at least one token of text")
    if prompt_len >= max_model_len:
        raise ContextLengthError(
            f"the prompt has {prompt_len} tokens but the model's context holds {max_model_len}; "
            "shorten the prompt (tokenmill never truncates it silently)",
            prompt_len,
            max_tokens,
            max_model_len,
        )
    if prompt_len + max_tokens > max_model_len:
        raise ContextLengthError(
            f"the prompt has {prompt_len} tokens and max_tokens is {max_tokens}, together "
            f"{prompt_len + max_tokens}, beyond the model's context of {max_model_len} tokens; "
            f"lower max_tokens to at most {max_model_len - prompt_len}",
            prompt_len,
            max_tokens,
            max_model_len,
        )
