"""Per-choice deltas of a stream of cumulative request snapshots.

The engine reports each choice's whole text and tokens so far; a client is sent only
what is new. ``DeltaTracker`` keeps what was sent; ``tokenmill.filters.tracker`` extends
it to hold back filtered text.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tokenmill.generation.outputs import RequestOutput


@dataclass
class Delta:
    """What one choice gained since the last chunk."""

    index: int
    text: str
    token_ids: list[int]
    logprobs: list[Any] | None
    first_token: int  # position of token_ids[0] among the choice's tokens
    finish_reason: str | None
    stop_reason: str | int | None


class DeltaTracker:
    """Turns cumulative snapshots into per-choice deltas (text and tokens not yet sent)."""

    def __init__(self, n: int) -> None:
        self.sent_chars = [0] * n
        self.sent_tokens = [0] * n
        self.done = [False] * n

    def deltas(self, out: RequestOutput, with_tokens: bool) -> list[Delta]:
        result = []
        for o in out.outputs:
            i = o.index
            if self.done[i]:
                continue
            text = o.text[self.sent_chars[i] :]
            start = self.sent_tokens[i]
            tokens = o.token_ids[start:]
            if not text and not (with_tokens and tokens) and o.finish_reason is None:
                continue
            logprobs = o.logprobs[start:] if o.logprobs is not None else None
            self.sent_chars[i] = max(self.sent_chars[i], len(o.text))
            self.sent_tokens[i] = len(o.token_ids)
            self.done[i] = o.finish_reason is not None
            result.append(Delta(i, text, tokens, logprobs, start, o.finish_reason, o.stop_reason))
        return result

    async def step(self, out: RequestOutput, with_tokens: bool) -> list[Delta]:
        """``deltas`` as the routes call it (a filtering tracker may wait for a classifier)."""
        return self.deltas(out, with_tokens)

    @property
    def all_done(self) -> bool:
        return all(self.done)

    def decisions(self) -> list[dict[str, Any]]:
        """What filters did, per choice (none here; see tokenmill.filters.tracker)."""
        return []
