"""The text-generation pipeline's ``filters`` option, at creation and per call."""

from __future__ import annotations

import json

import pytest

from tokenmill import pipeline
from tokenmill.filters import parse_filters

PROMPT = "Hello world"
GREEDY = {"do_sample": False, "max_new_tokens": 40}


@pytest.fixture(scope="module")
def pipe(llama_dir):
    return pipeline("text-generation", model=llama_dir, device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def plain(pipe) -> str:
    text = pipe(PROMPT, return_full_text=False, **GREEDY)[0]["generated_text"]
    assert text.startswith(" 日本語 日本語 日本語rPa"), f"the tiny model's greedy text changed: {text!r}"
    return text


def test_filters_per_call(pipe, plain):
    fs = parse_filters(
        {"filters": [{"name": "jp", "kind": "blocklist", "words": ["日本語"], "action": "mask"}]}
    )
    (row,) = pipe(PROMPT, filters=fs, **GREEDY)
    assert row["generated_text"] == PROMPT + " **** **** " + plain[len(" 日本語 日本語 ") :]
    assert row["filters"] == {
        "finish_reason": None,
        "decisions": [{"filter": "jp", "action": "mask", "count": 2}],
    }
    assert "filters" not in pipe(PROMPT, **GREEDY)[0]  # only that call was filtered


def test_filters_file_at_creation(llama_dir, tmp_path, plain):
    path = tmp_path / "f.json"
    spec = {"name": "r", "kind": "blocklist", "words": ["rPa"], "whole_word": False, "action": "refuse"}
    path.write_text(json.dumps({"filters": [spec]}))
    p = pipeline("text-generation", model=llama_dir, device="cpu", dtype="float32", filters=str(path))
    chat = [{"role": "user", "content": "Hi"}]
    rows = p([PROMPT, chat], return_full_text=False, **GREEDY)
    assert rows[0][0] == {
        "generated_text": " 日本語 日本語 日本語",
        "filters": {
            "finish_reason": "content_filter",
            "decisions": [{"filter": "r", "action": "refuse", "count": 1}],
        },
    }
    assert "filters" in rows[1][0] and isinstance(rows[1][0]["generated_text"], str)


def test_a_call_cannot_name_a_file(pipe, tmp_path):
    with pytest.raises(ValueError, match=r"filters must be a tokenmill.filters.FilterSet \(load a file with"):
        pipe(PROMPT, filters=str(tmp_path / "f.json"), **GREEDY)
