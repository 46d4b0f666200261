"""Built-in detectors of personal data: e-mail addresses, phone numbers, payment card
numbers (Luhn-checked), IPv4 addresses and IBANs (mod-97-checked).

Each is a bounded regular expression, so a stream holds back at most one match's worth of
text (in practice the last word or number), plus a check that turns away look-alikes: a
16-digit order number that fails the Luhn check is not a card; a date is not a phone number.
"""

from __future__ import annotations

import re
from collections.abc import Callable

from tokenmill.filters.patterns import SpanMatcher

_OCTET = r"(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)"

_PATTERNS: dict[str, tuple[str, int]] = {
    # local part, "@", up to six dot-separated domain labels and a letters-only top level
    "email": (
        r"[A-Za-z0-9._%+-]{1,64}@(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.){1,6}"
        r"[A-Za-z]{2,24}(?![A-Za-z0-9-])",
        0,
    ),
    # an optional +country code and (area code), then 2-4 digit groups with one separator each
    "phone": (
        r"(?<![\w+])(?<!\d[ .-])(?:\+\d{1,3}[ .-]?)?(?:\(\d{1,4}\)[ .-]?)?\d{2,4}(?:[ .-]?\d{2,4}){1,4}(?!\w)",
        0,
    ),
    # 13 to 19 digits, optionally grouped by single spaces or dashes
    "credit_card": (r"(?<![\d-])\d(?:[ -]?\d){12,18}(?![\d])", 0),
    "ipv4": (rf"(?<![\d.]){_OCTET}(?:\.{_OCTET}){{3}}(?!\d|\.\d)", 0),
    # country code, check digits, then 4-character groups (optionally space-separated)
    "iban": (r"(?<![A-Za-z0-9])[A-Z]{2}\d{2}(?: ?[A-Z0-9]{4}){2,7}(?: ?[A-Z0-9]{1,3})?(?![A-Za-z0-9])", 0),
}


def _digits(s: str) -> str:
    return "".join(c for c in s if c.isdigit())


def luhn_ok(number: str) -> bool:
    """The Luhn checksum of the digits of ``number`` (what card numbers carry)."""
    total = 0
    for i, c in enumerate(reversed(_digits(number))):
        d = int(c)
        if i % 2 == 1:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def _phone_ok(s: str) -> bool:
    n = len(_digits(s))
    # 9+ digits, or 7+ after a "+country" prefix: fewer are dates, times and counts more often
    return 9 <= n <= 15 or (s.startswith("+") and 7 <= n <= 15)


def _card_ok(s: str) -> bool:
    return 13 <= len(_digits(s)) <= 19 and luhn_ok(s)


def iban_ok(s: str) -> bool:
    """ISO 13616: move the first four characters to the end, letters to numbers, mod 97 == 1."""
    compact = s.replace(" ", "")
    if not 15 <= len(compact) <= 34:
        return False
    moved = compact[4:] + compact[:4]
    return int("".join(str(int(c, 36)) for c in moved)) % 97 == 1


_CHECKS: dict[str, Callable[[str], bool]] = {"phone": _phone_ok, "credit_card": _card_ok, "iban": iban_ok}

#: detector names, in the order they are tried when two match at the same place
DETECTORS = tuple(_PATTERNS)


def detector(name: str) -> SpanMatcher:
    """The matcher of one built-in detector (``name`` from ``DETECTORS``)."""
    pattern, flags = _PATTERNS[name]
    return SpanMatcher(re.compile(pattern, flags), name, _CHECKS.get(name))
