"""Each filter kind and action on whole texts, against outputs worked out by hand."""

from __future__ import annotations

import pytest

from tokenmill.filters import ClassifierFilter, FilterSet, parse_filters
from tokenmill.filters.patterns import shape
from tokenmill.filters.pii import iban_ok, luhn_ok


def _fs(*filters: dict) -> FilterSet:
    return parse_filters({"filters": list(filters)})


def _one(kind: str, action: str = "mask", **fields) -> FilterSet:
    return _fs({"name": "f", "kind": kind, "action": action, **fields})


# -- blocklist ---------------------------------------------------------------------------


def test_blocklist_whole_words_ignoring_case():
    fs = _one("blocklist", words=["darn", "bad word"])
    r = fs.apply("Darn! darned, a BAD WORD and bad words; darn")
    # "darned" and "bad words" are other words; the end of the text is a word boundary
    assert r.text == "****! darned, a **** and bad words; ****"
    assert not r.refused and r.finish_reason is None
    assert r.decisions == [{"filter": "f", "action": "mask", "count": 3}]


def test_blocklist_inside_words_and_case_sensitive():
    fs = _one("blocklist", words=["ab"], whole_word=False, case_sensitive=True, mask="_")
    assert fs.apply("abAB cab Abab").text == "_AB c_ Ab_"


def test_blocklist_longer_words_win_and_symbols_need_no_boundary():
    fs = _one("blocklist", words=["c", "c++", "bad", "badly"], mask="X")
    # "c++" ends with a symbol: it is blocked before "x" too; "badly" wins over "bad"
    assert fs.apply("c++x c badly bad").text == "Xx X X X"


# -- regex -------------------------------------------------------------------------------


def test_regex_mask_with_flags():
    fs = _one("regex", patterns=[r"sk-[a-z0-9]{4,8}", r"key=\d{2,4}"], ignore_case=True)
    assert fs.apply("use SK-ab12 or key=1234 not key=1").text == "use [redacted] or [redacted] not key=1"


def test_regex_refuse_keeps_the_text_before_the_span():
    fs = _one("regex", "refuse", patterns=[r"secret \d{1,3}"])
    r = fs.apply("the code is secret 42, keep it")
    assert r.text == "the code is " and r.refused and r.finish_reason == "content_filter"
    assert r.decisions == [{"filter": "f", "action": "refuse", "count": 1}]


def test_flag_passes_text_unchanged_and_counts():
    fs = _one("regex", "flag", patterns=[r"\d{3}"])
    r = fs.apply("123 4567 89")
    assert r.text == "123 4567 89" and not r.refused
    assert r.decisions == [{"filter": "f", "action": "flag", "count": 2}]  # "123" and "456"


def test_pattern_shapes():
    s = shape(r"(?<!\w)ab[c-e]\d{2,3}(?=xy)")
    assert (s.min_width, s.max_width, s.lookahead, s.hold) == (5, 6, 2, 9)
    assert s.chars.pattern == r"[ab c-e\dxy]".replace(" ", "")
    assert shape(r"a.b").chars is None  # "." can read anything
    assert shape(r"[^a]{2}").chars is None


# -- pii ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, expected",
    [
        ("write to ann.lee+x@mail.example.co.uk.", "write to [email]."),
        ("a@b.c is too short a domain", "a@b.c is too short a domain"),
        ("call +1 415-555-0100 now", "call [phone] now"),
        ("call (030) 1234 5678", "call [phone]"),
        ("on 2024-01-15 at 10.30", "on 2024-01-15 at 10.30"),  # dates are not phone numbers
        ("card 4111 1111 1111 1111 ok", "card [credit_card] ok"),
        ("card 4111-1111-1111-1111", "card [credit_card]"),
        ("card 4111111111111112", "card 4111111111111112"),  # fails the Luhn check
        ("host 192.168.0.12, not 1.2.3.456 or 1.2.3.4.5", "host [ipv4], not 1.2.3.456 or 1.2.3.4.5"),
        ("IBAN DE89 3704 0044 0532 0130 00 paid", "IBAN [iban] paid"),
        ("IBAN DE88 3704 0044 0532 0130 00", "IBAN DE88 3704 0044 0532 0130 00"),  # bad check digits
        # a card followed by its expiry or security code: the longer digit run fails the
        # Luhn check, the card itself does not
        ("card 4111 1111 1111 1111 12/25 thanks", "card [credit_card] 12/25 thanks"),
        ("card 4111111111111111 123 ok", "card [credit_card] 123 ok"),
        ("card 4111-1111-1111-1111 12 25", "card [credit_card] 12 25"),
        ("IBAN BE68 5390 0754 7034 2024 payment", "IBAN [iban] 2024 payment"),  # then a year
        # a date and a time, or a date and a count, are not phone numbers
        ("meet on 2024-01-15 12:30 in room 4", "meet on 2024-01-15 12:30 in room 4"),
        ("on 2024-01-15 12 people came", "on 2024-01-15 12 people came"),
        ("call 415-555-0100: ask for Ann", "call [phone]: ask for Ann"),
    ],
)
def test_pii_detectors(text, expected):
    assert _one("pii").apply(text).text == expected


def test_pii_choice_of_detectors_and_mask_template():
    fs = _one("pii", detectors=["email"], mask="<{detector} removed>")
    assert fs.apply("x@example.org 10.0.0.1").text == "<email removed> 10.0.0.1"


def test_only_checksummed_detectors_look_for_a_shorter_match():
    # a card in a longer digit run is found by its Luhn check; the phone detector, whose only
    # check is a digit count, does not mask the first digits of a number too long for a phone
    assert _one("pii", detectors=["credit_card"]).apply("4111 1111 1111 1111 12").text == "[credit_card] 12"
    assert _one("pii", detectors=["phone"]).apply("4111 1111 1111 1111").text == "4111 1111 1111 1111"


def test_checksums():
    assert luhn_ok("79927398713") and not luhn_ok("79927398710")
    assert iban_ok("GB82 WEST 1234 5698 7654 32") and not iban_ok("GB82 WEST 1234 5698 7654 33")


# -- several filters ---------------------------------------------------------------------


def test_overlapping_spans_merge_and_refuse_wins():
    fs = _fs(
        {"name": "name", "kind": "blocklist", "words": ["ann"], "action": "mask", "mask": "[name]"},
        {"name": "pii", "kind": "pii", "detectors": ["email"], "action": "mask"},
    )
    r = fs.apply("mail ann@example.org, ann")
    # the e-mail address starts with the blocked name: one span, masked once with the mask of
    # the longest match there, both filters counted
    assert r.text == "mail [email], [name]"
    assert r.decisions == [
        {"filter": "pii", "action": "mask", "count": 1},
        {"filter": "name", "action": "mask", "count": 2},
    ]
    # "x lee" is masked, and the e-mail address that begins inside it is swallowed whole
    fs = _fs(
        {"name": "a", "kind": "regex", "patterns": ["x lee"], "action": "mask", "mask": "[a]"},
        {"name": "pii", "kind": "pii", "detectors": ["email"], "action": "mask"},
    )
    assert fs.apply("mail x lee@example.org now").text == "mail [a] now"
    fs = _fs(
        {"name": "pii", "kind": "pii", "detectors": ["email"], "action": "mask"},
        {"name": "org", "kind": "blocklist", "words": ["example"], "action": "refuse"},
    )
    r = fs.apply("mail ann@example.org")
    assert r.text == "mail " and r.refused
    assert r.decisions == [{"filter": "org", "action": "refuse", "count": 1}]


# -- classifier --------------------------------------------------------------------------


class _Scores:
    """A stand-in text-classification pipeline: "toxic" scores 0.9 when "ugh" is in the text."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def __call__(self, text, top_k=None, truncation=True):
        assert top_k is None and truncation is True
        self.calls.append(text)
        toxic = 0.9 if "ugh" in text else 0.2
        return [{"label": "toxic", "score": toxic}, {"label": "ok", "score": 1 - toxic}]


@pytest.mark.parametrize(
    "action, text, shown, refused",
    [
        ("refuse", "ugh, fine", "", True),
        ("mask", "ugh, fine", "[removed]", False),
        ("flag", "ugh, fine", "ugh, fine", False),
        ("refuse", "all fine", "all fine", False),
    ],
)
def test_classifier_actions(action, text, shown, refused):
    c = ClassifierFilter("tox", action, "toxic", 0.5, _Scores())
    r = FilterSet([c]).apply(text)
    assert (r.text, r.refused) == (shown, refused)
    fired = "ugh" in text
    assert r.decisions == ([{"filter": "tox", "action": action, "count": 1}] if fired else [])


def test_classifier_scores_the_masked_text_and_long_texts_in_windows():
    scores = _Scores()
    fs = FilterSet(
        [
            *_one("blocklist", words=["ugh"]).filters,
            ClassifierFilter("tox", "refuse", "toxic", 0.5, scores, window_chars=20),
        ]
    )
    assert fs.apply("ugh, fine").text == "****, fine"  # the classifier saw the masked text
    assert scores.calls == ["****, fine"]
    scores.calls.clear()
    r = FilterSet([ClassifierFilter("tox", "flag", "toxic", 0.5, scores, window_chars=20)]).apply(
        "one two three four five six seven ugh"
    )
    assert scores.calls == ["one two three four", "five six seven ugh"]
    assert r.decisions == [{"filter": "tox", "action": "flag", "count": 1}]


def test_classifier_with_an_unknown_label_says_which_labels_exist():
    c = ClassifierFilter("tox", "flag", "rude", 0.5, _Scores())
    with pytest.raises(
        ValueError, match="the classifier gave no score for label 'rude'; its labels are 'ok', 'toxic'"
    ):
        FilterSet([c]).apply("hello")


def test_a_real_text_classification_model(tmp_path):
    """The default loader: tokenmill's own text-classification pipeline on a tiny BERT."""
    import json

    from tiny_encoders import tiny_encoder_dir
    from tokenmill import pipeline
    from tokenmill.filters import load_filters

    model = tiny_encoder_dir("bert", "sequence-classification")
    pipe = pipeline("text-classification", model=model, device="cpu")
    text = "the film was long"
    scores = {r["label"]: r["score"] for r in pipe(text, top_k=None)}
    label, score = max(scores.items(), key=lambda kv: kv[1])
    spec = {"name": "c", "kind": "classifier", "model": model, "label": label, "action": "mask"}
    path = tmp_path / "f.json"
    for threshold, shown in ((score - 1e-3, "[removed]"), (score + 1e-3, text)):
        path.write_text(json.dumps({"filters": [{**spec, "threshold": threshold}]}))
        assert load_filters(path).apply(text).text == shown
