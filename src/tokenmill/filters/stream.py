"""Filtering one output as it is generated: release only text no filter can still act on.

Text arrives in pieces (tokens). ``ChoiceFilter.feed`` returns the part that is settled:
no mask or refuse filter can still match a span that starts in it. The rest is held
back, as stop strings are, until the next pieces settle it or the output ends
(``finish``). A span to mask is replaced once its full extent is known; a span to refuse
ends the output before it, so the span itself is never released. Flag filters never hold
anything back: they count their matches on the whole output at the end.

Classifier filters score the whole output at the end. One whose action is ``mask`` or
``refuse`` makes the output wait, whole, for its score: a stream cannot take back text.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from tokenmill.filters.kinds import ClassifierFilter, SpanFilter
from tokenmill.filters.patterns import Match

Filter = SpanFilter | ClassifierFilter


@dataclass
class FilterResult:
    """A whole text after the filters: what to show, whether it was refused, what happened."""

    text: str
    refused: bool
    decisions: list[dict[str, Any]] = field(default_factory=list)

    @property
    def finish_reason(self) -> str | None:
        return "content_filter" if self.refused else None


class FilterSet:
    """The configured filters, in file order (which breaks ties between overlapping spans)."""

    def __init__(self, filters: Sequence[Filter], source: str | None = None) -> None:
        names = [f.name for f in filters]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"filter names must be unique; {', '.join(map(repr, dup))} appear twice")
        self.filters = list(filters)
        self.source = source
        spans = [f for f in self.filters if isinstance(f, SpanFilter)]
        self.acting = [f for f in spans if f.action != "flag"]
        self.flagging = [f for f in spans if f.action == "flag"]
        self.classifiers = [f for f in self.filters if isinstance(f, ClassifierFilter)]
        #: whether a stream must hold each output back until a classifier has scored it
        self.hold_all = any(c.action != "flag" for c in self.classifiers)

    def __len__(self) -> int:
        return len(self.filters)

    def describe(self) -> str:
        return ", ".join(f"{f.name} ({f.kind}, {f.action})" for f in self.filters)

    def stream(self) -> ChoiceFilter:
        """A filter for one output generated piece by piece."""
        return ChoiceFilter(self)

    def apply(self, text: str) -> FilterResult:
        """Filter a whole text at once."""
        c = self.stream()
        shown = c.feed(text) + c.finish()
        return FilterResult(shown, c.refused, c.decisions())


class ChoiceFilter:
    """The filter state of one output (one choice of a request)."""

    def __init__(self, filters: FilterSet) -> None:
        self.fs = filters
        self.text = ""  # the raw output so far
        self.pos = 0  # raw characters already decided: released, masked or refused at
        self.refused = False
        self.finished = False
        #: raw spans replaced by a mask (what produced them must not be shown, logprobs included)
        self.cuts: list[tuple[int, int]] = []
        self._shown: list[str] = []  # what feed/finish returned (or hold for the classifiers)
        self._held: list[str] = []  # settled text waiting for the classifiers' score
        self._events: Counter[tuple[str, str]] = Counter()
        #: pattern -> (text length, searched from, first match there)
        self._next: dict[int, tuple[int, int, Match | None]] = {}

    @property
    def released_raw(self) -> int:
        """Raw characters whose fate has been shown to the client."""
        if self.fs.hold_all and not self.finished:
            return 0
        return self.pos

    def feed(self, delta: str) -> str:
        """Add newly generated text; return the filtered text that may be shown now."""
        if self.refused or self.finished:
            return ""
        self.text += delta
        return self._release(self._advance(final=False))

    def finish(self) -> str:
        """The output ended: settle what was held back and run the classifiers. Returns the
        rest of the text to show (all of it when the classifiers held it)."""
        if self.finished:
            return ""
        tail = self._advance(final=True) if not self.refused else ""
        self.finished = True
        self._count_flags()
        if self.fs.hold_all:
            self._held.append(tail)
            return self._classify("".join(self._held))
        self._shown.append(tail)
        self._classify("".join(self._shown))
        return tail

    def decisions(self) -> list[dict[str, Any]]:
        """``[{"filter", "action", "count"}]`` in the order the filters first acted."""
        return [{"filter": f, "action": a, "count": n} for (f, a), n in self._events.items()]

    # -- internals -------------------------------------------------------------------

    def _release(self, text: str) -> str:
        if self.fs.hold_all:
            self._held.append(text)
            return ""
        self._shown.append(text)
        return text

    def _advance(self, final: bool) -> str:
        out: list[str] = []
        acting = self.fs.acting
        text = self.text
        while not self.refused:
            if final or not acting:
                limit = len(text)
            else:
                limit = min(f.hold_start(text, self.pos) for f in acting)
            first = self._earliest(self.pos)
            if first is None or first[1].start >= limit:
                if limit > self.pos:
                    out.append(text[self.pos : limit])
                    self.pos = limit
                return "".join(out)
            start, end, hits = self._merge(first)
            out.append(text[self.pos : start])
            self.pos = start
            if end > limit:  # a longer or overlapping match may still grow over it: wait
                return "".join(out)
            refusing = [f for f, _ in hits if f.action == "refuse"]
            if refusing:
                self.refused = True
                for f in dict.fromkeys(refusing):
                    self._events[(f.name, "refuse")] += 1
                return "".join(out)
            f0, m0 = hits[0]
            out.append(f0.mask_for(m0))
            self.cuts.append((start, end))
            for f in dict.fromkeys(f for f, _ in hits):  # one decision per filter per span
                self._events[(f.name, "mask")] += 1
            self.pos = end
        return "".join(out)

    def _earliest(self, pos: int) -> tuple[SpanFilter, Match] | None:
        best = None
        for f in self.fs.acting:
            m = self._search(f, pos)
            if m is not None and (best is None or (m.start, -m.end) < (best[1].start, -best[1].end)):
                best = (f, m)
        return best

    def _search(self, f: SpanFilter, pos: int) -> Match | None:
        """``f.search`` from ``pos``, each pattern's last answer reused while the text is
        unchanged: a pattern with no match left would otherwise scan to the end of the
        text again after every match of another."""
        best = None
        for matcher in f.matchers:
            cached = self._next.get(id(matcher))
            if cached is not None and cached[0] == len(self.text) and cached[1] <= pos:
                m = cached[2]
                if m is not None and m.start < pos:
                    m = matcher.search(self.text, pos)
                    self._next[id(matcher)] = (len(self.text), pos, m)
            else:
                m = matcher.search(self.text, pos)
                self._next[id(matcher)] = (len(self.text), pos, m)
            if m is not None and (best is None or (m.start, -m.end) < (best.start, -best.end)):
                best = m
        return best

    def _merge(self, first: tuple[SpanFilter, Match]) -> tuple[int, int, list[tuple[SpanFilter, Match]]]:
        """Grow ``first``'s span over every acting match overlapping it, so no part of an
        overlapping sensitive span slips out between two masks."""
        start, end = first[1].start, first[1].end
        hits = [first]
        seen = {(id(first[0]), start, end)}
        grown = True
        while grown:
            grown = False
            for f in self.fs.acting:
                p = start
                while (m := self._search(f, p)) is not None and m.start < end:
                    key = (id(f), m.start, m.end)
                    if key not in seen:
                        seen.add(key)
                        hits.append((f, m))
                        if m.end > end:
                            end, grown = m.end, True
                    p = m.start + 1
        return start, end, hits

    def _count_flags(self) -> None:
        end = self.pos if self.refused else len(self.text)
        for f in self.fs.flagging:
            p = 0
            while (m := self._search(f, p)) is not None and m.end <= end:
                self._events[(f.name, "flag")] += 1
                p = m.end

    def _classify(self, shown: str) -> str:
        """Score ``shown`` with each classifier; returns what to show instead (or ``shown``)."""
        # An output refused at a span is still scored: the text before the span is shown.
        if not self.fs.classifiers or not shown.strip():
            return shown
        fired = [c for c in self.fs.classifiers if c.score(shown) >= c.threshold]
        for c in fired:
            if c.action == "flag":
                self._events[(c.name, "flag")] += 1
        refusing = [c for c in fired if c.action == "refuse"]
        masking = [c for c in fired if c.action == "mask"]
        if refusing:
            self.refused = True
            self.pos = 0  # nothing of this output is shown
            self.cuts = []
            for c in refusing:
                self._events[(c.name, "refuse")] += 1
            return ""
        if masking:
            self.cuts = [(0, len(self.text))]
            for c in masking:
                self._events[(c.name, "mask")] += 1
            return masking[0].mask
        return shown
