"""Output filters: blocklists, regexes, personal data and classifiers over generated text.

    from tokenmill.filters import load_filters
    fs = load_filters("filters.json")
    fs.apply("mail me at ann@example.com").text   # 'mail me at [email]'

See docs/filters.md for the file format, the actions and how streams are held back.
"""

from tokenmill.filters.config import FilterConfigError, load_filters, parse_filters
from tokenmill.filters.kinds import ACTIONS, KINDS, ClassifierFilter, SpanFilter
from tokenmill.filters.patterns import MAX_MATCH_CHARS, PatternError
from tokenmill.filters.pii import DETECTORS
from tokenmill.filters.stream import ChoiceFilter, FilterResult, FilterSet

__all__ = [
    "ACTIONS",
    "DETECTORS",
    "KINDS",
    "MAX_MATCH_CHARS",
    "ChoiceFilter",
    "ClassifierFilter",
    "FilterConfigError",
    "FilterResult",
    "FilterSet",
    "PatternError",
    "SpanFilter",
    "load_filters",
    "parse_filters",
]
