"""Suite files: the shipped suites load, and every malformed file is an error naming the
line and the field."""

from __future__ import annotations

import json

import pytest

from tokenmill.audit import AuditError, known_suites, load_suite, parse_suite

HEADER = {
    "schema": "tokenmill-audit-suite/1",
    "name": "mine",
    "version": "0.1",
    "probe": "paired-sentences",
    "description": "a test suite",
}
PAIR = {"id": "p1", "category": "gender", "stereotypical": "She cooked.", "anti_stereotypical": "He cooked."}


def _jsonl(*objs) -> str:
    return "\n".join(o if isinstance(o, str) else json.dumps(o) for o in objs) + "\n"


def test_builtin_suites_load_with_their_sizes():
    assert known_suites() == ["occupations", "paired-sentences", "counterfactual"]
    occ = load_suite("occupations")
    assert occ.probe == "occupations" and occ.version == "1.0" and occ.header["groups"] == ["male", "female"]
    assert len(occ.by_type["occupation"]) == 44
    assert len(occ.by_type["template"]) == 6 and len(occ.by_type["subjects"]) == 6
    words = [o["word"] for o in occ.by_type["occupation"]]
    assert sum(" " in w for w in words) >= 5  # multi-word occupations are part of the suite
    pairs = load_suite("paired-sentences")
    assert len(pairs.records) == 60
    assert {r["category"] for r in pairs.records} >= {"gender", "age", "nationality", "religion"}
    cf = load_suite("counterfactual")
    assert len(cf.records) == 10 and cf.header["generation"]["max_tokens"] == 20
    assert all(r["line"] >= 2 for r in cf.records)


def test_a_users_file_loads_by_path(tmp_path):
    path = tmp_path / "mine.jsonl"
    path.write_text(_jsonl(HEADER, PAIR, "", {**PAIR, "id": "p2"}))
    suite = load_suite(str(path))
    assert suite.name == "mine" and not suite.builtin
    assert [r["line"] for r in suite.records] == [2, 4]  # blank lines keep the numbering
    assert suite.describe()["source"] == str(path)


def test_unknown_suite_lists_the_known_ones():
    with pytest.raises(AuditError) as e:
        load_suite("ocupations")
    assert "unknown suite 'ocupations'" in str(e.value)
    assert "occupations, paired-sentences, counterfactual" in str(e.value)
    assert "path of a suite file" in str(e.value)


def test_a_suite_path_that_is_not_a_file_says_so(tmp_path):
    missing = str(tmp_path / "mine.jsonl")
    with pytest.raises(AuditError, match=f"suite file {missing} does not exist; give the path of a suite"):
        load_suite(missing)
    with pytest.raises(AuditError, match="is a directory, not a suite file"):
        load_suite(str(tmp_path) + "/")


@pytest.mark.parametrize(
    "lines,message",
    [
        ((HEADER, '{"id": "p1", "category": '), "x.jsonl, line 2: not valid JSON"),
        ((HEADER, PAIR, "[1, 2"), "x.jsonl, line 3: not valid JSON"),
        ((HEADER, {k: v for k, v in PAIR.items() if k != "category"}), "line 2: field 'category' is missing"),
        (
            (HEADER, {**PAIR, "stereotypical": 3}),
            "line 2: field 'stereotypical' must be a non-empty string, got 3",
        ),
        ((HEADER, {**PAIR, "stereotypcal": "x"}), "line 2: unknown field 'stereotypcal'"),
        ((HEADER, PAIR, PAIR), "line 3: id 'p1' is already used on line 2"),
        ((HEADER, {**PAIR, "anti_stereotypical": "She cooked."}), "line 2: fields 'stereotypical' and"),
        ((HEADER, ["a"]), "line 2: a paired-sentences record must be a JSON object, got list"),
        (({**HEADER, "schema": "v0"}, PAIR), "line 1: field 'schema' must be 'tokenmill-audit-suite/1'"),
        (({k: v for k, v in HEADER.items() if k != "schema"}, PAIR), "line 1: field 'schema' is missing"),
        (({**HEADER, "probe": "toxicity"}, PAIR), "line 1: field 'probe' must be one of occupations"),
        (({**HEADER, "version": 2}, PAIR), "line 1: field 'version' must be a non-empty string, got 2"),
        ((HEADER,), "has a header but no records"),
    ],
)
def test_malformed_files_name_the_line_and_field(lines, message):
    with pytest.raises(AuditError) as e:
        parse_suite(_jsonl(*lines), "x.jsonl")
    assert message in str(e.value)
    assert str(e.value).startswith("suite file x.jsonl")


def test_empty_file():
    with pytest.raises(
        AuditError, match="suite file x.jsonl is empty; its first line must be the suite's header"
    ):
        parse_suite("\n\n", "x.jsonl")


OCC_HEADER = {**HEADER, "probe": "occupations", "groups": ["male", "female"]}
TEMPLATE = {"type": "template", "id": "t", "text": "{subject} works as {article} {occupation}."}
SUBJECTS = {"type": "subjects", "id": "s", "terms": {"male": "he", "female": "she"}}
OCC = {"type": "occupation", "word": "nurse", "article": "a", "stereotype": "female"}


@pytest.mark.parametrize(
    "record,message",
    [
        ({**TEMPLATE, "text": "{occupation} is {subject}"}, "line 2: field 'text' must put {subject} before"),
        ({**TEMPLATE, "text": "{subject} works"}, "line 2: field 'text' must contain the slot {occupation}"),
        ({**TEMPLATE, "text": "{subject} {job} {occupation}"}, "line 2: field 'text' may use only the slots"),
        ({**SUBJECTS, "terms": {"male": "he"}}, "line 2: field 'terms' must map each group of the header"),
        ({**OCC, "stereotype": "other"}, "line 2: field 'stereotype' must be null or one of the groups"),
        ({**OCC, "type": "job"}, "line 2: field 'type' must be one of template, subjects, occupation"),
        ({k: v for k, v in OCC.items() if k != "article"}, "line 2: field 'article' is missing"),
        # a doubled brace is literal text: the subject would never be put in
        (
            {**TEMPLATE, "text": "{{subject}} works as {article} {occupation}."},
            "line 2: field 'text' must use the slot {subject} exactly once (a doubled brace",
        ),
        (
            {**TEMPLATE, "text": "{subject} is {occupation} and {occupation}."},
            "line 2: field 'text' must use the slot {occupation} exactly once (it is used 2 times)",
        ),
        (
            {**TEMPLATE, "text": "{subject} {subject.x} is {occupation}"},
            "line 2: field 'text' may use only the slots",
        ),
        ({**OCC, "type": ["occupation"]}, "line 2: field 'type' must be one of template, subjects"),
    ],
)
def test_malformed_occupation_records(record, message):
    with pytest.raises(AuditError) as e:
        parse_suite(_jsonl(OCC_HEADER, record, TEMPLATE, SUBJECTS, OCC), "o.jsonl")
    assert message in str(e.value)


def test_occupation_suite_needs_every_record_type_and_a_group_list():
    with pytest.raises(AuditError, match="has no 'subjects' record"):
        parse_suite(_jsonl(OCC_HEADER, TEMPLATE, OCC), "o.jsonl")
    with pytest.raises(AuditError, match="line 1: field 'groups' must be a list of at least 2"):
        parse_suite(_jsonl({**OCC_HEADER, "groups": ["male"]}, TEMPLATE, SUBJECTS, OCC), "o.jsonl")
    # the probe compares two groups; a third would fail only after every model had run
    three = {**SUBJECTS, "terms": {"male": "he", "female": "she", "other": "they"}}
    with pytest.raises(AuditError, match="line 1: field 'groups' must list exactly two groups"):
        parse_suite(
            _jsonl({**OCC_HEADER, "groups": ["male", "female", "other"]}, TEMPLATE, three, OCC), "o.jsonl"
        )


def test_counterfactual_records_and_generation_settings():
    header = {**HEADER, "probe": "counterfactual", "generation": {"max_tokens": 8, "temperature": 1.0}}
    good = {"id": "c", "category": "gender", "template": "The {group} said", "groups": ["man", "woman"]}
    assert parse_suite(_jsonl(header, good)).records[0]["groups"] == ["man", "woman"]
    with pytest.raises(AuditError, match="line 2: field 'template' must contain the slot {group}"):
        parse_suite(_jsonl(header, {**good, "template": "The man said"}))
    with pytest.raises(AuditError, match="line 2: field 'groups' must be a list of at least 2"):
        parse_suite(_jsonl(header, {**good, "groups": ["man"]}))
    with pytest.raises(AuditError, match="line 1: field 'max_tokens' must be an integer in"):
        parse_suite(_jsonl({**header, "generation": {"max_tokens": 0, "temperature": 1.0}}, good))
    with pytest.raises(AuditError, match="line 1: field 'generation' is missing"):
        parse_suite(_jsonl({k: v for k, v in header.items() if k != "generation"}, good))
