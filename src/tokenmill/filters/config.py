"""Reading a filter file (JSON, or TOML on Python 3.11+) into a FilterSet.

Every mistake is a ``FilterConfigError`` naming the file, the filter (index and name),
the field, and what is accepted there.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from typing import Any

from tokenmill.filters import pii
from tokenmill.filters.kinds import (
    ACTIONS,
    DEFAULT_MASKS,
    DEFAULT_WINDOW_CHARS,
    KINDS,
    ClassifierFilter,
    SpanFilter,
    blocklist_matcher,
    pii_matchers,
    regex_matcher,
)
from tokenmill.filters.patterns import MAX_MATCH_CHARS
from tokenmill.filters.stream import FilterSet

_COMMON = ("name", "kind", "action", "mask")
_FIELDS = {
    "blocklist": (*_COMMON, "words", "whole_word", "case_sensitive"),
    "regex": (*_COMMON, "patterns", "ignore_case"),
    "pii": (*_COMMON, "detectors"),
    "classifier": (*_COMMON, "model", "label", "threshold", "window_chars", "device"),
}


class FilterConfigError(ValueError):
    """A filter file that cannot be used; the message says where and why."""


def load_filters(
    path: str | os.PathLike, *, classifier_loader: Callable[..., Any] | None = None
) -> FilterSet:
    """Read a filter file. ``.toml`` files are TOML (Python 3.11+), anything else JSON.

    Args:
        classifier_loader: builds a classifier filter's model from ``(model, device)``;
            default ``tokenmill.pipeline("text-classification", model=..., device=...)``.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FilterConfigError(f"filter file {path!r} does not exist (or is not a file)")
    if path.endswith(".toml"):
        try:
            import tomllib
        except ImportError:
            raise FilterConfigError(
                f"{path}: TOML filter files need Python 3.11 or newer; write the file as JSON instead"
            ) from None
        try:
            with open(path, "rb") as f:
                data = tomllib.load(f)
        except tomllib.TOMLDecodeError as e:
            raise FilterConfigError(f"{path}: not valid TOML: {e}") from None
    else:
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
        except json.JSONDecodeError as e:
            raise FilterConfigError(
                f"{path}: not valid JSON: {e.msg} at line {e.lineno}, column {e.colno}"
            ) from None
        except UnicodeDecodeError as e:
            raise FilterConfigError(f"{path}: not UTF-8 text: {e}") from None
    return parse_filters(data, source=path, classifier_loader=classifier_loader)


def parse_filters(
    data: Any, *, source: str = "<filters>", classifier_loader: Callable[..., Any] | None = None
) -> FilterSet:
    """A FilterSet from the parsed file: ``{"filters": [{...}, ...]}``."""
    if not isinstance(data, dict) or set(data) != {"filters"}:
        got = sorted(data) if isinstance(data, dict) else type(data).__name__
        raise FilterConfigError(
            f"{source}: the file must hold one object with a single key 'filters' (a list of filters); got {got}"
        )
    items = data["filters"]
    if not isinstance(items, list) or not items:
        raise FilterConfigError(f"{source}: 'filters' must be a non-empty list of filter objects")
    loader = classifier_loader or _load_classifier
    filters = [_one(item, i, source, loader) for i, item in enumerate(items)]
    seen: dict[str, int] = {}
    for i, f in enumerate(filters):
        if f.name in seen:
            raise FilterConfigError(
                f"{source}: filters[{i}] ({f.name!r}): name: {f.name!r} is already the name of "
                f"filters[{seen[f.name]}]; names must be unique (they label metrics and logs)"
            )
        seen[f.name] = i
    return FilterSet(filters, source=source)


def _one(item: Any, i: int, source: str, loader: Callable[..., Any]) -> SpanFilter | ClassifierFilter:
    where = f"{source}: filters[{i}]"
    if not isinstance(item, dict):
        raise FilterConfigError(f"{where}: each filter must be an object, got {type(item).__name__}")
    name = item.get("name")
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", name):
        raise FilterConfigError(
            f"{where}: name: {'missing' if name is None else repr(name)}; give each filter a name of "
            "1-64 letters, digits, '_', '.' or '-' (it labels metrics and logs)"
        )
    where = f"{where} ({name!r})"
    kind = item.get("kind")
    if kind not in KINDS:
        raise FilterConfigError(
            f"{where}: kind: {'missing' if kind is None else f'unknown kind {kind!r}'}; "
            f"use one of {', '.join(KINDS)}"
        )
    unknown = sorted(set(item) - set(_FIELDS[kind]))
    if unknown:
        raise FilterConfigError(
            f"{where}: unknown field(s) {', '.join(map(repr, unknown))} for a {kind} filter; "
            f"it takes {', '.join(_FIELDS[kind])}"
        )
    action = item.get("action")
    if action not in ACTIONS:
        raise FilterConfigError(
            f"{where}: action: {'missing' if action is None else f'unknown action {action!r}'}; "
            f"use one of {', '.join(ACTIONS)}"
        )
    mask = item.get("mask", DEFAULT_MASKS[kind])
    if not isinstance(mask, str):
        raise FilterConfigError(f"{where}: mask must be a string (the text shown instead), got {mask!r}")
    get = _Getter(item, where)
    if kind == "blocklist":
        words = get.strings("words")
        blank = [j for j, w in enumerate(words) if not w.strip()]
        if blank:
            raise FilterConfigError(
                f"{where}: words[{blank[0]}] is only whitespace, which would block every space; "
                "remove it or give the word"
            )
        long = [w for w in words if len(w) > MAX_MATCH_CHARS]
        if long:
            raise FilterConfigError(
                f"{where}: words: {long[0][:40]!r}... is over {MAX_MATCH_CHARS} characters"
            )
        matcher = blocklist_matcher(
            name, words, get.flag("whole_word", True), get.flag("case_sensitive", False)
        )
        return SpanFilter(name, kind, action, [matcher], mask)
    if kind == "regex":
        ignore_case = get.flag("ignore_case", False)
        matchers = []
        for j, p in enumerate(get.strings("patterns")):
            try:
                matchers.append(regex_matcher(name, p, ignore_case))
            except re.error as e:
                raise FilterConfigError(
                    f"{where}: patterns[{j}] {p!r} is not a valid regular expression: {e}"
                ) from None
            except ValueError as e:
                raise FilterConfigError(f"{where}: patterns[{j}]: {e}") from None
        return SpanFilter(name, kind, action, matchers, mask)
    if kind == "pii":
        detectors = get.strings("detectors", default=list(pii.DETECTORS))
        bad = [d for d in detectors if d not in pii.DETECTORS]
        if bad:
            raise FilterConfigError(
                f"{where}: detectors: unknown detector {bad[0]!r}; use any of {', '.join(pii.DETECTORS)}"
            )
        return SpanFilter(name, kind, action, pii_matchers(list(dict.fromkeys(detectors))), mask)
    return _classifier(item, name, action, mask, get, where, loader)


def _classifier(
    item: dict, name: str, action: str, mask: str, get: _Getter, where: str, loader: Callable[..., Any]
) -> ClassifierFilter:
    model = get.string("model")
    label = get.string("label")
    threshold = item.get("threshold")
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0 <= threshold <= 1:
        raise FilterConfigError(
            f"{where}: threshold: {'missing' if threshold is None else repr(threshold)}; give a number "
            f"in [0, 1]: outputs whose score for {label!r} reaches it are acted on"
        )
    window = item.get("window_chars", DEFAULT_WINDOW_CHARS)
    if isinstance(window, bool) or not isinstance(window, int) or window < 16:
        raise FilterConfigError(f"{where}: window_chars must be an integer >= 16, got {window!r}")
    device = item.get("device")
    if device is not None and not isinstance(device, str):
        raise FilterConfigError(f"{where}: device must be a string such as 'cpu' or 'cuda', got {device!r}")
    try:
        classify = loader(model, device)
    except Exception as e:
        raise FilterConfigError(
            f"{where}: model: could not load {model!r} for text-classification: {e}"
        ) from None
    labels = _labels(classify)
    if labels is not None and label not in labels:
        raise FilterConfigError(
            f"{where}: label: the model {model!r} has no label {label!r}; its labels are "
            f"{', '.join(map(repr, labels))}"
        )
    return ClassifierFilter(name, action, label, float(threshold), classify, mask, window, model)


def _load_classifier(model: str, device: str | None) -> Any:
    from tokenmill.pipelines import pipeline

    return pipeline("text-classification", model=model, device=device)


def _labels(classify: Any) -> list[str] | None:
    id2label = getattr(getattr(classify, "config", None), "id2label", None)
    if isinstance(id2label, dict) and id2label:
        return [str(v) for _, v in sorted(id2label.items(), key=lambda kv: int(kv[0]))]
    return None


class _Getter:
    """Typed field access with messages naming the filter and the field."""

    def __init__(self, item: dict, where: str) -> None:
        self.item = item
        self.where = where

    def flag(self, key: str, default: bool) -> bool:
        v = self.item.get(key, default)
        if not isinstance(v, bool):
            raise FilterConfigError(f"{self.where}: {key} must be true or false, got {v!r}")
        return v

    def string(self, key: str) -> str:
        v = self.item.get(key)
        if not isinstance(v, str) or not v:
            what = "missing" if v is None else repr(v)
            raise FilterConfigError(f"{self.where}: {key}: {what}; give a non-empty string")
        return v

    def strings(self, key: str, default: list[str] | None = None) -> list[str]:
        v = self.item.get(key, default)
        if not isinstance(v, list) or not v or not all(isinstance(x, str) and x for x in v):
            what = "missing" if v is None else repr(v)[:80]
            raise FilterConfigError(
                f"{self.where}: {key}: {what}; give a non-empty list of non-empty strings"
            )
        return v
