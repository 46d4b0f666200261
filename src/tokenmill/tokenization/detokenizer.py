"""Incremental detokenization that never emits half a UTF-8 character.

Each step decodes a short window of recent tokens twice (with and without the newest)
and emits the difference. Decoding a window rather than single tokens keeps the
tokenizer's context (leading spaces of SentencePiece, multi-token UTF-8 sequences);
a window whose text ends in U+FFFD is an incomplete character, so nothing is emitted
until the next token completes it.
"""

from __future__ import annotations

from tokenmill.tokenization.tokenizer import Tokenizer

# Prompt tokens kept as left context for the first generated tokens.
_CONTEXT = 5


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Tokenizer, prompt_ids: list[int], skip_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.skip = skip_special_tokens
        self.ids: list[int] = list(prompt_ids[-_CONTEXT:])
        self.prefix_offset = 0
        self.read_offset = len(self.ids)

    def step(self, token_id: int) -> str:
        """Add one token; return the text it completes (possibly empty)."""
        self.ids.append(token_id)
        decode = self.tokenizer.decode
        prefix = decode(self.ids[self.prefix_offset : self.read_offset], skip_special_tokens=self.skip)
        full = decode(self.ids[self.prefix_offset :], skip_special_tokens=self.skip)
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            delta = full[len(prefix) :]
            self.prefix_offset = self.read_offset
            self.read_offset = len(self.ids)
            return delta
        return ""

    def flush(self) -> str:
        """Text still held back at the end (an unfinished character decodes as U+FFFD)."""
        if self.read_offset >= len(self.ids):
            return ""
        decode = self.tokenizer.decode
        prefix = decode(self.ids[self.prefix_offset : self.read_offset], skip_special_tokens=self.skip)
        full = decode(self.ids[self.prefix_offset :], skip_special_tokens=self.skip)
        self.read_offset = len(self.ids)
        return full[len(prefix) :]
