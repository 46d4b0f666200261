"""The filter kinds: span filters (blocklist, regex, pii) find spans of text; classifier
filters score a whole output with a text-classification model."""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from tokenmill.filters import pii
from tokenmill.filters.patterns import MAX_MATCH_CHARS, Match, SpanMatcher, check_bounded, shape

ACTIONS = ("mask", "refuse", "flag")
KINDS = ("blocklist", "regex", "pii", "classifier")

#: the default mask per kind; in a pii mask "{detector}" becomes the detector's name
DEFAULT_MASKS = {"blocklist": "****", "regex": "[redacted]", "pii": "[{detector}]", "classifier": "[removed]"}

#: characters of output a classifier scores at once; a longer output is scored in windows
DEFAULT_WINDOW_CHARS = 1000


@dataclass(eq=False)  # compared (and hashed) by identity
class SpanFilter:
    """Finds spans of text; ``action`` says what happens to each span found."""

    name: str
    kind: str
    action: str
    matchers: list[SpanMatcher]
    mask: str

    def search(self, text: str, pos: int) -> Match | None:
        """The earliest match at or after ``pos`` (the longest of those starting there)."""
        best = None
        for m in self.matchers:
            hit = m.search(text, pos)
            if hit is not None and (best is None or (hit.start, -hit.end) < (best.start, -best.end)):
                best = hit
        return best

    def hold_start(self, text: str, pos: int) -> int:
        return min(m.hold_start(text, pos) for m in self.matchers)

    def mask_for(self, match: Match) -> str:
        return self.mask.replace("{detector}", match.label)


@dataclass(eq=False)
class ClassifierFilter:
    """Scores whole outputs with a text-classification pipeline.

    ``classify`` is called as ``classify(text, top_k=None, truncation=True)`` and returns
    ``[{"label", "score"}, ...]`` (what tokenmill's text-classification pipeline returns).
    A text longer than ``window_chars`` is scored in windows split at whitespace; the
    highest score of ``label`` counts.
    """

    name: str
    action: str
    label: str
    threshold: float
    classify: Callable[..., Any]
    mask: str = DEFAULT_MASKS["classifier"]
    window_chars: int = DEFAULT_WINDOW_CHARS
    model: str | None = None
    kind: str = field(default="classifier", init=False)

    def score(self, text: str) -> float:
        best = 0.0
        for window in windows(text, self.window_chars):
            result = self.classify(window, top_k=None, truncation=True)
            scores = {r["label"]: float(r["score"]) for r in result}
            if self.label not in scores:
                raise ValueError(
                    f"filter {self.name!r}: the classifier gave no score for label {self.label!r}; "
                    f"its labels are {', '.join(map(repr, sorted(scores)))}"
                )
            best = max(best, scores[self.label])
        return best


def windows(text: str, size: int) -> list[str]:
    """``text`` cut into pieces of at most ``size`` characters, at whitespace where possible."""
    out = []
    rest = text
    while len(rest) > size:
        cut = rest.rfind(" ", size // 2, size)
        cut = size if cut <= 0 else cut
        out.append(rest[:cut])
        rest = rest[cut:].lstrip()
    if rest.strip():
        out.append(rest)
    return out


# -- building span filters -----------------------------------------------------------


def blocklist_matcher(name: str, words: Sequence[str], whole_word: bool, case_sensitive: bool) -> SpanMatcher:
    """One regex for all ``words``; longer words first, so "bad word" wins over "bad"."""
    alts = []
    for w in sorted(set(words), key=len, reverse=True):
        body = re.escape(w)
        if whole_word:
            # only where the word itself starts/ends with a word character does a boundary mean anything
            body = ("(?<!\\w)" if re.match(r"\w", w[0]) else "") + body
            body += "(?!\\w)" if re.match(r"\w", w[-1]) else ""
        alts.append(body)
    regex = re.compile("|".join(alts), 0 if case_sensitive else re.IGNORECASE)
    return SpanMatcher(regex, name)


def regex_matcher(name: str, pattern: str, ignore_case: bool) -> SpanMatcher:
    """A user's pattern; raises ``re.error`` or ``PatternError`` (both ValueErrors) with the reason."""
    flags = re.IGNORECASE if ignore_case else 0
    regex = re.compile(pattern, flags)
    s = shape(pattern, flags)
    check_bounded(pattern, s, MAX_MATCH_CHARS)
    return SpanMatcher(regex, name, s=s)


def pii_matchers(detectors: Sequence[str]) -> list[SpanMatcher]:
    return [pii.detector(d) for d in detectors]
