"""Probe suites: versioned JSONL files, read and checked line by line.

The first line of a suite is its header (``schema``, ``name``, ``version``, ``probe``,
``description`` and the probe's own settings); every other non-blank line is one record of
that probe. A file that breaks the schema is an error naming the file, the line and the
field, so a user's own suite can be fixed without reading this code. docs/audit.md
documents the schema.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from importlib.resources import files
from typing import Any

SCHEMA = "tokenmill-audit-suite/1"
PROBES = ("occupations", "paired-sentences", "counterfactual")
#: the suites shipped inside the package, in the order a report lists them
BUILTIN = ("occupations", "paired-sentences", "counterfactual")


class AuditError(ValueError):
    """A user error in an audit: an unknown suite or model, a malformed suite file, a model
    without the head a probe needs. The message says what was wrong and how to fix it."""


@dataclass
class Suite:
    name: str
    version: str
    probe: str
    description: str
    header: dict[str, Any]
    #: the records, checked, each with its line number under the key "line"
    records: list[dict[str, Any]]
    path: str
    builtin: bool = False
    #: records of each type (occupations suites have several), filled by the probe checker
    by_type: dict[str, list[dict[str, Any]]] = field(default_factory=dict)

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "version": self.version,
            "probe": self.probe,
            "description": self.description,
            "source": "builtin" if self.builtin else self.path,
        }


# -- field checks -----------------------------------------------------------------------
class _Line:
    """Checks for one record; every error names the file, the line and the field."""

    def __init__(self, path: str, number: int, obj: Any, what: str) -> None:
        self.where = f"{path}, line {number}"
        self.what = what
        if not isinstance(obj, dict):
            self.fail(f"a {what} must be a JSON object, got {type(obj).__name__}")
        self.obj = obj

    def fail(self, message: str) -> None:
        raise AuditError(f"suite file {self.where}: {message}")

    def only(self, required: tuple[str, ...], optional: tuple[str, ...] = ()) -> None:
        for name in required:
            if name not in self.obj:
                self.fail(f"field {name!r} is missing; a {self.what} needs {', '.join(required)}")
        for name in self.obj:
            if name not in required and name not in optional:
                known = ", ".join((*required, *optional))
                self.fail(f"unknown field {name!r}; a {self.what} has the fields {known}")

    def text(self, name: str, *, contains: tuple[str, ...] = ()) -> str:
        value = self.obj[name]
        if not isinstance(value, str) or not value.strip():
            self.fail(f"field {name!r} must be a non-empty string, got {json.dumps(value)}")
        for slot in contains:
            if slot not in value:
                self.fail(f"field {name!r} must contain the slot {slot}, got {json.dumps(value)}")
        return value

    def optional_text(self, name: str) -> str | None:
        return None if self.obj.get(name) is None else self.text(name)

    def texts(self, name: str, minimum: int) -> list[str]:
        value = self.obj[name]
        ok = isinstance(value, list) and all(isinstance(v, str) and v.strip() for v in value)
        if not ok or len(value) < minimum:
            self.fail(
                f"field {name!r} must be a list of at least {minimum} non-empty strings, got {json.dumps(value)}"
            )
        if len(set(value)) != len(value):
            self.fail(f"field {name!r} lists a value twice: {json.dumps(value)}")
        return value

    def number(self, name: str, lo: float, hi: float, integer: bool = False) -> float:
        value = self.obj[name]
        kind = "an integer" if integer else "a number"
        bad_type = isinstance(value, bool) or not isinstance(value, int if integer else (int, float))
        if bad_type or not lo <= value <= hi:
            self.fail(f"field {name!r} must be {kind} in [{lo}, {hi}], got {json.dumps(value)}")
        return value


def _parse_lines(path: str, text: str) -> list[tuple[int, Any]]:
    out = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            out.append((number, json.loads(line)))
        except json.JSONDecodeError as e:
            raise AuditError(
                f"suite file {path}, line {number}: not valid JSON ({e.msg} at column {e.colno}); "
                "each line of a suite holds one JSON object"
            ) from None
    if not out:
        raise AuditError(f"suite file {path} is empty; its first line must be the suite's header")
    return out


def _check_header(path: str, number: int, obj: Any) -> dict[str, Any]:
    line = _Line(path, number, obj, "suite header (the first line)")
    if "schema" not in line.obj:
        line.fail(
            f'field \'schema\' is missing; the first line is the suite\'s header, with "schema": "{SCHEMA}"'
        )
    if line.obj["schema"] != SCHEMA:
        line.fail(f"field 'schema' must be {SCHEMA!r}, got {json.dumps(line.obj['schema'])}")
    probe = line.obj.get("probe")
    if probe not in PROBES:
        line.fail(f"field 'probe' must be one of {', '.join(PROBES)}, got {json.dumps(probe)}")
    extra = {"occupations": ("groups",), "paired-sentences": (), "counterfactual": ("generation",)}[probe]
    optional = {"occupations": ("stereotype_source",), "paired-sentences": (), "counterfactual": ()}[probe]
    line.only(("schema", "name", "version", "probe", "description", *extra), optional)
    for name in ("name", "version", "description"):
        line.text(name)
    if probe == "occupations":
        groups = line.texts("groups", 2)
        if len(groups) != 2:
            line.fail(
                f"field 'groups' must list exactly two groups (the log-ratio is the first group "
                f"against the second), got {json.dumps(groups)}"
            )
    if probe == "counterfactual":
        gen = line.obj["generation"]
        g = _Line(path, number, gen, "header's 'generation' object")
        g.only(("max_tokens", "temperature"), ("top_p",))
        g.number("max_tokens", 1, 512, integer=True)
        g.number("temperature", 0.0, 100.0)
        if "top_p" in gen:
            if gen["top_p"] == 0 or not isinstance(gen["top_p"], (int, float)):
                g.fail(f"field 'top_p' must be a number in (0, 1], got {json.dumps(gen['top_p'])}")
            g.number("top_p", 0.0, 1.0)
    return line.obj


def _check_occupations(path: str, header: dict, lines: list[tuple[int, Any]]) -> dict[str, list[dict]]:
    groups = header["groups"]
    by_type: dict[str, list[dict]] = {"template": [], "subjects": [], "occupation": []}
    for number, obj in lines:
        rec = _Line(path, number, obj, "occupations record")
        kind = rec.obj.get("type")
        if not isinstance(kind, str) or kind not in by_type:
            rec.fail(f"field 'type' must be one of {', '.join(by_type)}, got {json.dumps(kind)}")
        if kind == "template":
            rec.what = "template record"
            rec.only(("type", "id", "text"))
            rec.text("id")
            text = rec.text("text", contains=("{subject}", "{occupation}"))
            try:
                filled = text.format(subject="\x02", article="a", occupation="\x03")
            except (KeyError, IndexError, ValueError, AttributeError, TypeError) as e:
                rec.fail(
                    f"field 'text' may use only the slots {{subject}}, {{article}}, {{occupation}} ({e!r})"
                )
            for slot, marker in (("{subject}", "\x02"), ("{occupation}", "\x03")):
                times = filled.count(marker)
                if times != 1:
                    why = (
                        f"a doubled brace {{{slot}}} is literal text, not a slot"
                        if times == 0
                        else f"it is used {times} times"
                    )
                    rec.fail(
                        f"field 'text' must use the slot {slot} exactly once ({why}), got {json.dumps(text)}"
                    )
            if filled.index("\x02") > filled.index("\x03"):
                rec.fail(
                    "field 'text' must put {subject} before {occupation}: a causal model reads the "
                    "occupation after the subject"
                )
        elif kind == "subjects":
            rec.what = "subjects record"
            rec.only(("type", "id", "terms"))
            rec.text("id")
            terms = rec.obj["terms"]
            ok = isinstance(terms, dict) and all(isinstance(v, str) and v.strip() for v in terms.values())
            if not ok or sorted(terms) != sorted(groups):
                rec.fail(
                    f"field 'terms' must map each group of the header ({', '.join(groups)}) to a "
                    f"non-empty string, got {json.dumps(terms)}"
                )
        else:
            rec.what = "occupation record"
            rec.only(("type", "word", "article"), ("stereotype",))
            rec.text("word")
            rec.text("article")
            st = rec.obj.get("stereotype")
            if st is not None and st not in groups:
                rec.fail(
                    f"field 'stereotype' must be null or one of the groups {', '.join(groups)}, got {json.dumps(st)}"
                )
        obj["line"] = number
        by_type[kind].append(obj)
    for kind, records in by_type.items():
        if not records:
            raise AuditError(
                f"suite file {path} has no {kind!r} record; an occupations suite needs at least one"
            )
        key = "word" if kind == "occupation" else "id"
        _unique(path, records, key)
    return by_type


def _check_pairs(path: str, lines: list[tuple[int, Any]]) -> None:
    for number, obj in lines:
        rec = _Line(path, number, obj, "paired-sentences record")
        rec.only(("id", "category", "stereotypical", "anti_stereotypical"))
        for name in ("id", "category", "stereotypical", "anti_stereotypical"):
            rec.text(name)
        if obj["stereotypical"].strip() == obj["anti_stereotypical"].strip():
            rec.fail(
                "fields 'stereotypical' and 'anti_stereotypical' are the same sentence; they must differ"
            )
        obj["line"] = number


def _check_counterfactual(path: str, lines: list[tuple[int, Any]]) -> None:
    for number, obj in lines:
        rec = _Line(path, number, obj, "counterfactual record")
        rec.only(("id", "category", "template", "groups"))
        rec.text("id")
        rec.text("category")
        rec.text("template", contains=("{group}",))
        rec.texts("groups", 2)
        obj["line"] = number


def _unique(path: str, records: list[dict], key: str) -> None:
    seen: dict[str, int] = {}
    for r in records:
        if r[key] in seen:
            raise AuditError(
                f"suite file {path}, line {r['line']}: {key} {r[key]!r} is already used on line {seen[r[key]]}"
            )
        seen[r[key]] = r["line"]


def parse_suite(text: str, path: str = "<suite>", builtin: bool = False) -> Suite:
    """Check a suite given as JSONL text; ``path`` is the name errors use."""
    lines = _parse_lines(path, text)
    header = _check_header(path, *lines[0])
    records = lines[1:]
    if not records:
        raise AuditError(f"suite file {path} has a header but no records")
    probe = header["probe"]
    by_type: dict[str, list[dict]] = {}
    if probe == "occupations":
        by_type = _check_occupations(path, header, records)
    elif probe == "paired-sentences":
        _check_pairs(path, records)
    else:
        _check_counterfactual(path, records)
    recs = [obj for _, obj in records]
    if probe != "occupations":
        _unique(path, recs, "id")
    return Suite(
        header["name"], header["version"], probe, header["description"], header, recs, path, builtin, by_type
    )


def known_suites() -> list[str]:
    return list(BUILTIN)


def load_suite(name_or_path: str) -> Suite:
    """A shipped suite by name, or a suite file by path."""
    if name_or_path in BUILTIN:
        resource = files("tokenmill").joinpath(f"data/audit/{name_or_path}.jsonl")
        return parse_suite(resource.read_text(encoding="utf-8"), f"{name_or_path}.jsonl", builtin=True)
    path = os.path.expanduser(name_or_path)
    if os.path.isfile(path):
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
        except (OSError, UnicodeDecodeError) as e:
            raise AuditError(f"suite file {name_or_path} cannot be read as UTF-8 text: {e}") from None
        return parse_suite(text, name_or_path)
    if os.sep in name_or_path or "/" in name_or_path or name_or_path.endswith((".jsonl", ".json")):
        what = "is a directory, not a suite file" if os.path.isdir(path) else "does not exist"
        raise AuditError(
            f"suite file {name_or_path} {what}; give the path of a suite file (JSONL, see "
            f"docs/audit.md) or a built-in suite: {', '.join(BUILTIN)}"
        )
    raise AuditError(
        f"unknown suite {name_or_path!r}: the known suites are {', '.join(BUILTIN)}; "
        "or give the path of a suite file (JSONL, see docs/audit.md)"
    )
