"""Errors raised while finding or reading model files.

The class lives in ``utils`` so the tokenizer layer, below ``weights``, can raise it too.
"""

from tokenmill.utils.errors import ModelLoadError

__all__ = ["ModelLoadError"]
