"""Streams: a blocked span never goes out, however the text is cut into tokens.

The property checked at every step: what has been released so far is a prefix of the
final filtered text. The final text does not hold the blocked span, so no piece of it
was ever sent, whatever the split.
"""

from __future__ import annotations

import itertools
import random

import pytest

from tokenmill.filters import ClassifierFilter, FilterSet, parse_filters

SECRET = "ann.lee@example.org"

CASES = [
    # (filters, text, final text, refused)
    (
        [{"name": "w", "kind": "blocklist", "words": ["darn it"], "action": "mask"}],
        "oh darn it, darn itch",
        "oh ****, darn itch",
        False,
    ),
    (
        [{"name": "pii", "kind": "pii", "detectors": ["email"], "action": "mask"}],
        f"mail {SECRET}. ok",
        "mail [email]. ok",
        False,
    ),
    (
        [{"name": "pii", "kind": "pii", "detectors": ["email"], "action": "refuse"}],
        f"mail {SECRET}. ok",
        "mail ",
        True,
    ),
    (
        [{"name": "k", "kind": "regex", "patterns": [r"key \d{2,6}"], "action": "mask"}],
        "a key 123456 b key 1",
        "a [redacted] b key 1",
        False,
    ),
]


def _run(fs: FilterSet, pieces: list[str]) -> tuple[list[str], str, bool]:
    c = fs.stream()
    out = []
    final = fs.apply("".join(pieces)).text
    sent = ""
    for p in pieces:
        chunk = c.feed(p)
        sent += chunk
        assert final.startswith(sent), (pieces, sent)
        out.append(chunk)
    out.append(c.finish())
    return out, "".join(out), c.refused


@pytest.mark.parametrize("filters, text, expected, refused", CASES)
def test_every_split_into_three_pieces(filters, text, expected, refused):
    fs = parse_filters({"filters": filters})
    assert fs.apply(text).text == expected
    for i, j in itertools.combinations(range(len(text) + 1), 2):
        pieces = [text[:i], text[i:j], text[j:]]
        chunks, whole, was_refused = _run(fs, pieces)
        assert whole == expected and was_refused == refused, pieces
        # ("darn it," is the blocked occurrence; "darn itch" is another word)
        assert not any(SECRET in c or "darn it," in c or "123456" in c for c in chunks)


@pytest.mark.parametrize("filters, text, expected, refused", CASES)
def test_character_by_character(filters, text, expected, refused):
    chunks, whole, was_refused = _run(parse_filters({"filters": filters}), list(text))
    assert whole == expected and was_refused == refused


def test_refused_output_reveals_no_prefix_of_the_span():
    fs = parse_filters({"filters": CASES[2][0]})
    for cut in range(len("mail "), len(f"mail {SECRET}. ok")):
        text = f"mail {SECRET}. ok"
        chunks, whole, _ = _run(fs, [text[:cut], text[cut:]])
        # not even "a" (the address's first letter) goes out before the refusal
        assert whole == "mail "


def test_text_that_cannot_start_a_match_is_not_held_back():
    fs = parse_filters(
        {
            "filters": [
                {"name": "pii", "kind": "pii", "action": "mask"},
                {"name": "w", "kind": "blocklist", "words": ["darn"], "action": "mask"},
            ]
        }
    )
    c = fs.stream()
    # held: the last word (it may become an e-mail address or "darn")
    assert c.feed("Hello there, how are yo") == "Hello there, how are "
    assert c.feed("u? Fine") == "you? "
    assert c.feed("! ") == "Fine!"  # a space may begin a phone number or a card: " 555..."
    assert c.feed("Call 555 12") == " Call"  # " 555 12" may become a phone number
    assert c.feed("3 4567 now.") == " [phone] "  # "now." may become "now.ann@example.org"
    assert c.finish() == "now."


def test_hold_back_is_bounded():
    # a run of digits is never a match (no separators in 40 digits of a card) but could start one:
    # what is held is at most a match's length plus its lookahead and end check
    fs = parse_filters(
        {"filters": [{"name": "pii", "kind": "pii", "detectors": ["credit_card"], "action": "mask"}]}
    )
    hold = fs.acting[0].matchers[0].shape.hold
    assert hold == 19 + 18 + 1 + 1
    c = fs.stream()
    digits = "1234567890" * 20
    sent = ""
    for i in range(0, len(digits), 7):
        sent += c.feed(digits[i : i + 7])
        assert len(c.text) - c.pos <= hold - 1
    assert sent + c.finish() == digits


def test_random_token_splits_of_a_long_text():
    fs = parse_filters({"filters": [{"name": "pii", "kind": "pii", "action": "mask"}]})
    text = (
        "Reach Ann at ann.lee@example.org or +44 20 7946 0958; card 4111 1111 1111 1111, "
        "server 10.20.30.40, IBAN GB82 WEST 1234 5698 7654 32. Thanks!"
    )
    expected = "Reach Ann at [email] or [phone]; card [credit_card], server [ipv4], IBAN [iban]. Thanks!"
    rng = random.Random(0)
    for _ in range(200):
        cuts = sorted(rng.sample(range(1, len(text)), rng.randint(1, 40)))
        pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]
        chunks, whole, _ = _run(fs, pieces)
        assert whole == expected
        for secret in ("ann.lee", "7946", "4111", "10.20", "GB82"):
            assert all(secret not in c for c in chunks)


def test_a_refusing_classifier_holds_the_whole_output():
    def classify(text, top_k=None, truncation=True):
        return [{"label": "bad", "score": 1.0 if "ugh" in text else 0.0}]

    fs = FilterSet([ClassifierFilter("c", "refuse", "bad", 0.5, classify)])
    assert fs.hold_all
    c = fs.stream()
    assert c.feed("fine so far, ") == "" and c.feed("ugh") == ""
    assert c.released_raw == 0
    assert c.finish() == "" and c.refused
    c = fs.stream()
    assert c.feed("fine so far") == "" and c.finish() == "fine so far" and not c.refused
    # a flag-only classifier holds nothing back
    fs = FilterSet([ClassifierFilter("c", "flag", "bad", 0.5, classify)])
    c = fs.stream()
    assert c.feed("ugh") == "ugh" and c.finish() == ""
    assert c.decisions() == [{"filter": "c", "action": "flag", "count": 1}]


def test_a_card_followed_by_its_expiry_is_masked_in_a_stream():
    fs = parse_filters({"filters": [{"name": "pii", "kind": "pii", "action": "mask"}]})
    text = "card 4111 1111 1111 1111 12/25 thanks"
    for pieces in (list(text), [text[:12], text[12:27], text[27:]]):
        chunks, whole, _ = _run(fs, pieces)
        assert whole == fs.apply(text).text == "card [credit_card] 12/25 thanks"
        assert not any("4111" in c or "1111" in c for c in chunks)
