"""Per-choice deltas with the output filters applied.

``FilteredDeltas`` takes the place of ``DeltaTracker`` when the server has filters. Each
choice's text goes through its own ``ChoiceFilter``; only what that releases is sent.
Token ids and log-probabilities travel with the text they produced: a token is sent once
all the text it produced is settled, and tokens whose text was masked or refused are
never sent (their strings would show the very text the filter removed); a token that adds
no text yet goes (or is left out) with the token whose text follows it. The engine
reports text per snapshot, so this pairing is per snapshot: when a snapshot carries
several tokens and some of its text is masked, all of that snapshot's tokens are left out.
"""

from __future__ import annotations

import asyncio
from typing import Any

from tokenmill.filters.stream import ChoiceFilter, FilterSet
from tokenmill.generation.deltas import Delta, DeltaTracker
from tokenmill.generation.outputs import CompletionOutput, RequestOutput

CONTENT_FILTER = "content_filter"


class FilteredDeltas(DeltaTracker):
    def __init__(self, filters: FilterSet, n: int) -> None:
        super().__init__(n)
        self.filters = filters
        self.choices: list[ChoiceFilter] = [filters.stream() for _ in range(n)]
        self.fed = [0] * n  # raw characters of each choice given to its filter
        #: (tokens, raw characters) after each snapshot: which text each token produced
        self.marks: list[list[tuple[int, int]]] = [[(0, 0)] for _ in range(n)]
        self.marks_sent = [0] * n  # marks whose tokens were released (or dropped)

    async def step(self, out: RequestOutput, with_tokens: bool) -> list[Delta]:
        result = []
        for o in out.outputs:
            i = o.index
            if self.done[i]:
                continue
            cf = self.choices[i]
            text = cf.feed(o.text[self.fed[i] :])
            self.fed[i] = len(o.text)
            if (len(o.token_ids), len(o.text)) != self.marks[i][-1]:
                self.marks[i].append((len(o.token_ids), len(o.text)))
            finish, stop = None, None
            if cf.refused or o.finish_reason is not None:
                text += await self._finish(cf)
                finish, stop = (CONTENT_FILTER, None) if cf.refused else (o.finish_reason, o.stop_reason)
            ids, lps, first = self._tokens(i, o, cf) if with_tokens else ([], None, 0)
            if not text and not ids and finish is None:
                continue
            self.done[i] = finish is not None
            result.append(Delta(i, text, ids, lps, first, finish, stop))
        return result

    async def _finish(self, cf: ChoiceFilter) -> str:
        if self.filters.classifiers:  # a model call: off the event loop
            return await asyncio.to_thread(cf.finish)
        return cf.finish()

    def _tokens(
        self, i: int, o: CompletionOutput, cf: ChoiceFilter
    ) -> tuple[list[int], list[Any] | None, int]:
        """The tokens (and logprobs) whose text is now released, minus those of cut text."""
        released = cf.released_raw
        marks = self.marks[i]
        j = self.marks_sent[i]
        ids: list[int] = []
        lps: list[Any] | None = [] if o.logprobs is not None else None
        first = marks[j][0]
        while j + 1 < len(marks):
            # Tokens that add no text yet (a character's first bytes, text a stop string
            # holds back) belong to the text that follows them: they go, or are cut, with
            # the next snapshot that adds text. Only when the output has ended without more
            # text do they go on their own.
            j1 = j + 1
            while j1 + 1 < len(marks) and marks[j1][1] == marks[j][1]:
                j1 += 1
            (k0, c0), (k1, c1) = marks[j], marks[j1]
            if c1 > released or (c1 == c0 and not cf.finished):
                break
            cut = any(s < c1 and e > c0 for s, e in cf.cuts) or (c1 == c0 and cf.refused)
            if not cut:
                if not ids:
                    first = k0
                ids.extend(o.token_ids[k0:k1])
                if lps is not None and o.logprobs is not None:
                    lps.extend(o.logprobs[k0:k1])
            j = j1
        self.marks_sent[i] = j
        return ids, lps, first

    def decisions(self) -> list[dict[str, Any]]:
        return [{"choice": i, **d} for i, cf in enumerate(self.choices) for d in cf.decisions()]
