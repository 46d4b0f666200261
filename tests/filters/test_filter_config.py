"""Filter files: what they may say, and the message for each mistake."""

from __future__ import annotations

import json
import sys

import pytest

from tokenmill.filters import FilterConfigError, FilterSet, load_filters, parse_filters


def _write(tmp_path, data, name="filters.json") -> str:
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else json.dumps(data), encoding="utf-8")
    return str(path)


def _error(tmp_path, data, name="filters.json") -> str:
    path = _write(tmp_path, data, name)
    with pytest.raises(FilterConfigError) as e:
        load_filters(path, classifier_loader=_fake_loader)
    assert str(e.value).startswith(path), "the message names the file"
    return str(e.value)


class _FakeClassifier:
    class config:
        id2label = {0: "ok", 1: "toxic"}

    def __call__(self, text, top_k=None, truncation=True):
        return [{"label": "toxic", "score": 0.9}, {"label": "ok", "score": 0.1}]


def _fake_loader(model, device):
    if model == "missing-model":
        raise OSError("no such model directory")
    return _FakeClassifier()


def test_a_full_file_loads(tmp_path):
    data = {
        "filters": [
            {"name": "words", "kind": "blocklist", "words": ["darn"], "action": "mask", "mask": "#"},
            {"name": "keys", "kind": "regex", "patterns": ["sk-[a-z0-9]{8,32}"], "action": "refuse"},
            {"name": "pii", "kind": "pii", "detectors": ["email"], "action": "flag"},
            {
                "name": "tox",
                "kind": "classifier",
                "model": "m",
                "label": "toxic",
                "threshold": 0.5,
                "action": "flag",
            },
        ]
    }
    fs = load_filters(_write(tmp_path, data), classifier_loader=_fake_loader)
    assert isinstance(fs, FilterSet) and len(fs) == 4
    assert [f.name for f in fs.acting] == ["words", "keys"]
    assert [f.name for f in fs.flagging] == ["pii"]
    assert [c.name for c in fs.classifiers] == ["tox"] and not fs.hold_all
    assert (
        fs.describe()
        == "words (blocklist, mask), keys (regex, refuse), pii (pii, flag), tox (classifier, flag)"
    )


@pytest.mark.skipif(sys.version_info < (3, 11), reason="tomllib is Python 3.11+")
def test_toml_files(tmp_path):
    text = '[[filters]]\nname = "w"\nkind = "blocklist"\nwords = ["darn"]\naction = "mask"\n'
    fs = load_filters(_write(tmp_path, text, "f.toml"))
    assert fs.apply("oh darn it").text == "oh **** it"
    msg = _error(tmp_path, "[[filters]\nname = 1", "bad.toml")
    assert "not valid TOML" in msg


def test_missing_file(tmp_path):
    with pytest.raises(FilterConfigError, match=r"filter file '.*nope\.json' does not exist"):
        load_filters(tmp_path / "nope.json")


@pytest.mark.parametrize(
    "data, expected",
    [
        ('{"filters": [', "not valid JSON: Expecting value at line 1, column 14"),
        ("[]", "one object with a single key 'filters'"),
        ({"filter": []}, "one object with a single key 'filters' (a list of filters); got ['filter']"),
        ({"filters": []}, "'filters' must be a non-empty list"),
        ({"filters": ["x"]}, "filters[0]: each filter must be an object, got str"),
        (
            {"filters": [{"kind": "pii", "action": "mask"}]},
            "filters[0]: name: missing; give each filter a name",
        ),
        ({"filters": [{"name": "a b", "kind": "pii", "action": "mask"}]}, "filters[0]: name: 'a b'"),
        (
            {"filters": [{"name": "w", "kind": "blocklist", "words": ["darn", " "], "action": "mask"}]},
            "filters[0] ('w'): words[1] is only whitespace, which would block every space",
        ),
        (
            {"filters": [{"name": "x", "kind": "words", "action": "mask"}]},
            "filters[0] ('x'): kind: unknown kind 'words'; use one of blocklist, regex, pii, classifier",
        ),
        (
            {"filters": [{"name": "x", "kind": "pii"}]},
            "filters[0] ('x'): action: missing; use one of mask, refuse, flag",
        ),
        (
            {"filters": [{"name": "x", "kind": "pii", "action": "block"}]},
            "filters[0] ('x'): action: unknown action 'block'; use one of mask, refuse, flag",
        ),
        (
            {"filters": [{"name": "x", "kind": "pii", "action": "mask", "word": ["a"]}]},
            "filters[0] ('x'): unknown field(s) 'word' for a pii filter; it takes name, kind, action, mask, detectors",
        ),
        (
            {"filters": [{"name": "x", "kind": "blocklist", "action": "mask"}]},
            "filters[0] ('x'): words: missing; give a non-empty list of non-empty strings",
        ),
        (
            {"filters": [{"name": "x", "kind": "blocklist", "words": ["a", ""], "action": "mask"}]},
            "filters[0] ('x'): words: ['a', '']; give a non-empty list of non-empty strings",
        ),
        (
            {
                "filters": [
                    {"name": "x", "kind": "blocklist", "words": ["a"], "action": "mask", "whole_word": 1}
                ]
            },
            "filters[0] ('x'): whole_word must be true or false, got 1",
        ),
        (
            {"filters": [{"name": "x", "kind": "blocklist", "words": ["a"], "action": "mask", "mask": 0}]},
            "filters[0] ('x'): mask must be a string",
        ),
        (
            {"filters": [{"name": "x", "kind": "regex", "patterns": ["ok", "(ab"], "action": "mask"}]},
            "filters[0] ('x'): patterns[1] '(ab' is not a valid regular expression: "
            "missing ), unterminated subpattern at position 0",
        ),
        (
            {"filters": [{"name": "x", "kind": "regex", "patterns": ["sk-\\w+"], "action": "refuse"}]},
            "filters[0] ('x'): patterns[0]: the pattern 'sk-\\\\w+' can match text of unlimited length, "
            "but a stream holds back at most 256; bound every repeat (e.g. {1,40} instead of + or *)",
        ),
        (
            {"filters": [{"name": "x", "kind": "regex", "patterns": ["a{300}"], "action": "mask"}]},
            "the pattern 'a{300}' can match text of up to 300 characters, but a stream holds back at most 256",
        ),
        (
            {"filters": [{"name": "x", "kind": "regex", "patterns": ["a?"], "action": "mask"}]},
            "filters[0] ('x'): patterns[0]: the pattern 'a?' can match empty text",
        ),
        (
            {"filters": [{"name": "x", "kind": "pii", "detectors": ["ssn"], "action": "mask"}]},
            "filters[0] ('x'): detectors: unknown detector 'ssn'; use any of email, phone, credit_card, ipv4, iban",
        ),
        (
            {
                "filters": [
                    {"name": "x", "kind": "pii", "action": "mask"},
                    {"name": "x", "kind": "pii", "action": "flag"},
                ]
            },
            "filters[1] ('x'): name: 'x' is already the name of filters[0]; names must be unique",
        ),
        (
            {
                "filters": [
                    {"name": "c", "kind": "classifier", "label": "toxic", "threshold": 0.5, "action": "flag"}
                ]
            },
            "filters[0] ('c'): model: missing; give a non-empty string",
        ),
        (
            {
                "filters": [
                    {"name": "c", "kind": "classifier", "model": "m", "label": "toxic", "action": "flag"}
                ]
            },
            "filters[0] ('c'): threshold: missing; give a number in [0, 1]",
        ),
        (
            {
                "filters": [
                    {
                        "name": "c",
                        "kind": "classifier",
                        "model": "m",
                        "label": "toxic",
                        "threshold": 2,
                        "action": "flag",
                    }
                ]
            },
            "filters[0] ('c'): threshold: 2; give a number in [0, 1]",
        ),
        (
            {
                "filters": [
                    {
                        "name": "c",
                        "kind": "classifier",
                        "model": "m",
                        "label": "rude",
                        "threshold": 0.5,
                        "action": "flag",
                    }
                ]
            },
            "filters[0] ('c'): label: the model 'm' has no label 'rude'; its labels are 'ok', 'toxic'",
        ),
        (
            {
                "filters": [
                    {
                        "name": "c",
                        "kind": "classifier",
                        "model": "missing-model",
                        "label": "toxic",
                        "threshold": 0.5,
                        "action": "flag",
                    }
                ]
            },
            "filters[0] ('c'): model: could not load 'missing-model' for text-classification: no such model directory",
        ),
    ],
)
def test_bad_files_say_what_is_wrong(tmp_path, data, expected):
    assert expected in _error(tmp_path, data)


def test_parse_without_a_file_names_its_source():
    with pytest.raises(FilterConfigError, match=r"^<filters>: filters\[0\] \('x'\): action"):
        parse_filters({"filters": [{"name": "x", "kind": "pii", "action": "nope"}]})


def test_filter_set_names_are_unique():
    a = parse_filters({"filters": [{"name": "x", "kind": "pii", "action": "mask"}]}).filters[0]
    with pytest.raises(ValueError, match="filter names must be unique; 'x' appear twice"):
        FilterSet([a, a])
