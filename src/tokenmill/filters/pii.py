"""Built-in detectors of personal data: e-mail addresses, phone numbers, payment card
numbers (Luhn-checked), IPv4 addresses and IBANs (mod-97-checked).

Each is a bounded regular expression, so a stream holds back at most one match's worth of
text (in practice the last word or number), plus a check that turns away look-alikes: a
16-digit order number that fails the Luhn check is not a card; a date is not a phone number.
"""

from __future__ import annotations

import functools
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
    # an optional +country code and (area code), then 2-4 digit groups with one separator
    # each; not followed by a letter or digit, nor by ":" and a digit (a time: "12:30")
    "phone": (
        r"(?<![\w+])(?<!\d[ .-])(?:\+\d{1,3}[ .-]?)?(?:\(\d{1,4}\)[ .-]?)?\d{2,4}(?:[ .-]?\d{2,4}){1,4}(?!\w)(?!:\d)",
        0,
    ),
    # 13 to 19 digits, optionally grouped by single spaces or dashes
    "credit_card": (r"(?<![\d-])\d(?:[ -]?\d){12,18}(?![\d])", 0),
    "ipv4": (rf"(?<![\d.]){_OCTET}(?:\.{_OCTET}){{3}}(?!\d|\.\d)", 0),
    # country code, check digits, then 4-character groups (optionally space-separated)
    "iban": (r"(?<![A-Za-z0-9])[A-Z]{2}\d{2}(?: ?[A-Z0-9]{4}){2,7}(?: ?[A-Z0-9]{1,3})?(?![A-Za-z0-9])", 0),
}


_NON_DIGITS = re.compile(r"\D+")


def _digits(s: str) -> str:
    return _NON_DIGITS.sub("", s)


def luhn_ok(number: str) -> bool:
    """The Luhn checksum of the digits of ``number`` (what card numbers carry)."""
    return _luhn_digits(_digits(number))


# each digit doubled, its digits summed (the Luhn step), as a translation of digit characters
_DOUBLE = str.maketrans("0123456789", "0246813579")


def _luhn_digits(digits: str) -> bool:
    """The Luhn check of a string of digits: every second digit from the right doubled."""
    if not digits.isascii():  # \d also matches other scripts' digits
        digits = "".join(str(int(c)) for c in digits)
    kept = sum(map(int, digits[-1::-2]))
    doubled = sum(map(int, digits[-2::-2].translate(_DOUBLE)))
    return (kept + doubled) % 10 == 0


_SEPARATORS = re.compile(r"[ -]")


# A stream searches the text it holds back again after each token: the same candidate
# numbers come back, so the checks remember their latest answers.
@functools.lru_cache(maxsize=4096)
def _card_prefix(s: str) -> int | None:
    """The length of the longest prefix of ``s`` (a card-like run of digit groups that failed
    the check) that ends at a group, holds 13-19 digits and passes the Luhn check; None if
    none does."""
    groups = _SEPARATORS.split(s)
    compact = "".join(groups)
    digits = chars = 0
    ends = []  # (digits, characters) at the end of each group but the last
    for g in groups[:-1]:
        digits += len(g)
        chars += len(g) + 1  # the group and the one separator after it
        ends.append((digits, chars - 1))
    for n, end in reversed(ends):
        if 13 <= n <= 19 and _luhn_digits(compact[:n]):
            return end
    return None


def _iban_prefix(s: str) -> int | None:
    """The length of the longest prefix of ``s`` (a spaced IBAN-like run that failed the
    check) that ends before one of its spaces and passes the IBAN check; None if none does."""
    for end in range(len(s) - 1, 0, -1):
        if s[end] == " " and iban_ok(s[:end]):
            return end
    return None


# an ISO date (2024-01-15) at the start: a date and a number after it, not a phone number
_ISO_DATE = re.compile(r"(?:19|20)\d\d-(?:0[1-9]|1[0-2])-(?:0[1-9]|[12]\d|3[01])(?!\d)")


def _phone_ok(s: str) -> bool:
    if _ISO_DATE.match(s):
        return False
    n = len(_digits(s))
    # 9+ digits, or 7+ after a "+country" prefix: fewer are dates, times and counts more often
    return 9 <= n <= 15 or (s.startswith("+") and 7 <= n <= 15)


@functools.lru_cache(maxsize=4096)
def _card_ok(s: str) -> bool:
    digits = _digits(s)
    return 13 <= len(digits) <= 19 and _luhn_digits(digits)


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
    # a checksum tells a card or an IBAN inside a longer run of digits and groups (a card
    # and its expiry); a phone number's digit count does not
    shorter = {"credit_card": _card_prefix, "iban": _iban_prefix}.get(name)
    return SpanMatcher(re.compile(pattern, flags), name, _CHECKS.get(name), shorter=shorter)
