"""Stop strings over streamed text: matches across token boundaries, no leaked partial match."""

from __future__ import annotations


class StopStringMatcher:
    """Accumulates generated text and finds the first stop string in it.

    ``feed`` returns the text that is safe to show now: text that could still turn into
    a stop string is held back until the next token settles it.
    """

    def __init__(self, stops: list[str] | None, include_stop: bool = False) -> None:
        self.stops = list(stops or [])
        self.include_stop = include_stop
        self.max_len = max((len(s) for s in self.stops), default=0)
        self.text = ""  # everything decoded so far
        self.emitted = 0  # characters of ``text`` already released
        self.matched: str | None = None

    def feed(self, delta: str, can_stop: bool = True) -> str:
        """Add ``delta``; return newly releasable text. Sets ``matched`` when a stop string appears."""
        if self.matched is not None:
            return ""
        start = max(0, len(self.text) - self.max_len + 1)
        self.text += delta
        if self.stops and can_stop:
            best = None
            for s in self.stops:
                i = self.text.find(s, start)
                if i != -1 and (best is None or i < best[0]):
                    best = (i, s)
            if best is not None:
                i, s = best
                self.matched = s
                self.text = self.text[: i + len(s)] if self.include_stop else self.text[:i]
                out = self.text[self.emitted :]
                self.emitted = len(self.text)
                return out
        # Hold back even while stops are off: a stop string may begin now and end once they count.
        hold = self._held_back()
        end = len(self.text) - hold
        out = self.text[self.emitted : end] if end > self.emitted else ""
        self.emitted = max(self.emitted, end)
        return out

    def _held_back(self) -> int:
        """Length of the longest suffix of the text that begins some stop string."""
        for k in range(min(self.max_len - 1, len(self.text) - self.emitted), 0, -1):
            tail = self.text[-k:]
            if any(s.startswith(tail) for s in self.stops):
                return k
        return 0

    def flush(self) -> str:
        """Release held-back text at the end of generation."""
        out = self.text[self.emitted :]
        self.emitted = len(self.text)
        return out
