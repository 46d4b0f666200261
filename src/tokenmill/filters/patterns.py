"""Regular expressions that can be matched over a growing text without leaking a match.

A stream can release text only once no match can still begin in it. For a pattern we
know two things from its parsed form:

- ``width``: the most characters a match consumes, plus the most a lookahead peeks
  past it, plus one for ``$``/``\\b`` at the end. A match attempt starting ``width``
  characters before the end of the text has seen all it will ever look at.
- ``chars``: a character class holding every character the pattern can consume (and
  those a lookahead longer than one character can read) (None when that is "anything", e.g. ``.`` or ``[^x]``). An attempt
  that still depends on text not yet generated has read only such characters up to
  the end, so it starts inside the trailing run of them.

The text held back is the trailing run of ``chars`` (at most ``width`` characters):
for ``[\\w.+-]{1,64}@...`` that is the last word, not 500 characters.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

try:  # Python 3.11+
    import re._parser as _sre_parse  # type: ignore[import-not-found]
except ImportError:  # Python 3.10
    import sre_parse as _sre_parse  # type: ignore[no-redef]

#: the longest match a configured regex (or blocklist word) may have: what a stream may hold back
MAX_MATCH_CHARS = 256

_CATEGORIES = {
    "CATEGORY_DIGIT": r"\d",
    "CATEGORY_NOT_DIGIT": r"\D",
    "CATEGORY_SPACE": r"\s",
    "CATEGORY_NOT_SPACE": r"\S",
    "CATEGORY_WORD": r"\w",
    "CATEGORY_NOT_WORD": r"\W",
}
# far beyond any bounded pattern: what the parser reports for an unbounded repeat
_UNBOUNDED = 2**31


class PatternError(ValueError):
    """A pattern a stream cannot hold back safely; the message says why and how to fix it."""


@dataclass(frozen=True)
class Shape:
    min_width: int
    max_width: int  # characters a match consumes at most
    lookahead: int  # characters a lookahead peeks past the match at most
    chars: re.Pattern | None  # every character the pattern can read; None: any character

    @property
    def hold(self) -> int:
        """Characters an attempt may read beyond its start, end-of-text check included."""
        return self.max_width + self.lookahead + 1


class _Walk:
    def __init__(self) -> None:
        self.parts: list[str] = []
        self.any_char = False
        self.lookahead = 0
        self.ignore_case = False

    def visit(self, sub: Any) -> None:
        for op, av in sub:
            name = str(op)
            if name == "LITERAL":
                self.parts.append(re.escape(chr(av)))
            elif name in ("NOT_LITERAL", "ANY"):
                self.any_char = True
            elif name == "IN":
                self._charset(av)
            elif name in ("ASSERT", "ASSERT_NOT"):
                direction, inner = av
                # A lookbehind reads only text that exists when the attempt starts; a
                # one-character lookahead that reads the last character settles there.
                # Only a longer lookahead can read on to the end through its own characters.
                if direction == 1:
                    width = inner.getwidth()[1]
                    self.lookahead = max(self.lookahead, width)
                    if width > 1:
                        self.visit(inner)
            else:
                if name == "SUBPATTERN" and av[1] & re.IGNORECASE:
                    self.ignore_case = True
                self._nested(av)

    def _nested(self, av: Any) -> None:
        if isinstance(av, _sre_parse.SubPattern):
            self.visit(av)
        elif isinstance(av, (tuple, list)):
            for x in av:
                self._nested(x)

    def _charset(self, items: list) -> None:
        for op, av in items:
            name = str(op)
            if name == "LITERAL":
                self.parts.append(re.escape(chr(av)))
            elif name == "RANGE":
                self.parts.append(f"{re.escape(chr(av[0]))}-{re.escape(chr(av[1]))}")
            elif name == "CATEGORY" and str(av) in _CATEGORIES:
                self.parts.append(_CATEGORIES[str(av)])
            else:  # a negated set or an unusual category: treat as any character
                self.any_char = True


def shape(pattern: str, flags: int = 0) -> Shape:
    """The shape of ``pattern`` (which must already compile)."""
    tree = _sre_parse.parse(pattern, flags)
    lo, hi = tree.getwidth()
    walk = _Walk()
    walk.visit(tree)
    if walk.lookahead >= _UNBOUNDED:
        hi = _UNBOUNDED
    chars = None
    if not walk.any_char and walk.parts:
        case = re.IGNORECASE if (walk.ignore_case or tree.state.flags & re.IGNORECASE) else 0
        chars = re.compile("[" + "".join(walk.parts) + "]", case | (tree.state.flags & re.ASCII))
    return Shape(lo, hi, walk.lookahead, chars)


def check_bounded(pattern: str, s: Shape, limit: int = MAX_MATCH_CHARS) -> None:
    """Reject what a stream could not hold back: empty or unbounded (or over-long) matches."""
    if s.min_width == 0:
        raise PatternError(
            f"the pattern {pattern!r} can match empty text, which would match everywhere; "
            "make it match at least one character"
        )
    if s.max_width >= _UNBOUNDED or s.max_width + s.lookahead > limit:
        if s.max_width >= _UNBOUNDED:
            length = "unlimited length"
        else:
            length = f"up to {s.max_width + s.lookahead} characters"
        raise PatternError(
            f"the pattern {pattern!r} can match text of {length}, but a stream holds back "
            f"at most {limit}; bound every repeat (e.g. {{1,40}} instead of + or *) so that a match "
            f"and its lookahead are at most {limit} characters"
        )


@dataclass(frozen=True)
class Match:
    start: int
    end: int
    label: str  # what matched: the filter's name, or a PII detector's name


class SpanMatcher:
    """One compiled pattern, an optional check of each match, and its hold-back rule."""

    def __init__(
        self,
        regex: re.Pattern,
        label: str,
        validate: Callable[[str], bool] | None = None,
        s: Shape | None = None,
        shorter: Callable[[str], int | None] | None = None,
    ) -> None:
        self.regex = regex
        self.label = label
        self.validate = validate
        #: given a match that failed ``validate``, the length of its longest prefix that is a
        #: valid match in its own right (None: there is none)
        self.shorter = shorter
        self.shape = s or shape(regex.pattern, regex.flags)

    def search(self, text: str, pos: int) -> Match | None:
        """The first (valid) match starting at or after ``pos``; lookbehinds see text before it.

        With ``shorter``, where the longest match at a place fails the check, its longest
        valid prefix is taken: a card number followed by its expiry date ("4111 1111 1111
        1111 12/25") is a longer digit run that fails the Luhn check, while the card itself
        passes.
        """
        while pos <= len(text):
            m = self.regex.search(text, pos)
            if m is None:
                return None
            if self.validate is None or self.validate(m.group(0)):
                return Match(m.start(), m.end(), self.label)
            start = m.start()
            if self.shorter is not None:
                n = self.shorter(m.group(0))
                if n:
                    return Match(start, start + n, self.label)
            pos = start + 1
        return None

    def hold_start(self, text: str, pos: int) -> int:
        """Where the text that could still begin a match starts (``len(text)`` if nowhere)."""
        floor = max(pos, len(text) - self.shape.hold + 1)
        if self.shape.chars is None:
            return floor
        i = len(text)
        fits = self.shape.chars.match
        while i > floor and fits(text, i - 1):
            i -= 1
        return i
