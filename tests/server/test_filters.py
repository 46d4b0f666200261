"""Output filters through the real server: mask, refuse and flag on /v1/completions and
/v1/chat/completions, streamed and not; metrics; the request log; the --filters flag.

The tiny Llama's greedy continuation of PROMPT is deterministic:
" 日本語 日本語 日本語rPa..." (random weights, so random text). The filters below are
written against that text, and each expected output is worked out from it by hand.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator

import httpx
import pytest
from server_util import MODEL, make_engine, metric_value, serving, sse_events, wait_idle

from tokenmill import SamplingParams
from tokenmill.filters import ClassifierFilter, FilterSet, parse_filters

PROMPT = "Hello world"
HEAD = " 日本語 日本語 日本語rPa"
JP = {"name": "jp", "kind": "blocklist", "words": ["日本語"], "action": "mask", "mask": "[jp]"}
RPA = {"name": "rpa", "kind": "blocklist", "words": ["rPa"], "whole_word": False, "action": "refuse"}
GREEDY = {"prompt": PROMPT, "max_tokens": 40, "temperature": 0, "ignore_eos": True}


@pytest.fixture(scope="module")
def ref(ref_llm) -> str:
    out = ref_llm.generate([PROMPT], SamplingParams(temperature=0, max_tokens=40, ignore_eos=True))[0]
    text = out.outputs[0].text
    assert text.startswith(HEAD), f"the tiny model's greedy text changed: {text!r}"
    assert "日本語" not in text[len(HEAD) :] and "rPa" not in text[len(HEAD) :]
    return text


@contextlib.contextmanager
def filtered(long_dir, filters: FilterSet | dict, **app_kwargs) -> Iterator[tuple]:
    fs = filters if isinstance(filters, FilterSet) else parse_filters({"filters": [filters]})
    engine = make_engine(long_dir, max_num_seqs=4)
    with serving(engine, served_model_name=MODEL, filters=fs, **app_kwargs) as server:
        with httpx.Client(base_url=server.url, timeout=60) as client:
            yield client, engine


def _stream(client, path: str, body: dict) -> list[dict]:
    with client.stream("POST", path, json={**body, "stream": True}) as r:
        assert r.status_code == 200, r.read()
        events = list(sse_events(r.iter_lines()))
    assert events[-1] == "[DONE]"
    return events[:-1]


def _texts(events: list[dict], index: int = 0) -> list[str]:
    out = []
    for e in events:
        for c in e["choices"]:
            if c["index"] == index:
                out.append(c["text"] if "text" in c else c["delta"].get("content", ""))
    return out


def _assert_prefixes(pieces: list[str], final: str) -> None:
    """Every point of the stream showed a prefix of the final text: nothing else went out."""
    sent = ""
    for p in pieces:
        sent += p
        assert final.startswith(sent), (sent, final)
    assert sent == final


def test_mask(long_dir, ref):
    # whole words only: the third "日本語" runs into "rPa" and stays
    expected = " [jp] [jp] " + ref[len(" 日本語 日本語 ") :]
    with filtered(long_dir, JP) as (client, _):
        data = client.post("/v1/completions", json=GREEDY).json()
        (choice,) = data["choices"]
        assert choice["text"] == expected and choice["finish_reason"] == "length"
        assert data["usage"]["completion_tokens"] == 40  # every generated token is counted
        events = _stream(client, "/v1/completions", GREEDY)
        _assert_prefixes(_texts(events), expected)
        assert events[-1]["choices"][0]["finish_reason"] == "length"
        metrics = client.get("/metrics").text
    assert metric_value(metrics, "tokenmill:filter_actions_total", 'action="mask",filter="jp"') == 4


def test_refuse_ends_the_output_and_the_generation(long_dir):
    body = {**GREEDY, "max_tokens": 1000}
    with filtered(long_dir, RPA) as (client, engine):
        data = client.post("/v1/completions", json=body).json()
        (choice,) = data["choices"]
        assert choice["text"] == " 日本語 日本語 日本語" and choice["finish_reason"] == "content_filter"
        # the engine was stopped at the refusal, long before max_tokens
        assert data["usage"]["completion_tokens"] < 100
        wait_idle(engine)
        events = _stream(client, "/v1/completions", body)
        pieces = _texts(events)
        _assert_prefixes(pieces, " 日本語 日本語 日本語")
        assert not any("r" in p for p in pieces)  # not even the first letter of the span
        assert [c["choices"][0]["finish_reason"] for c in events][-1] == "content_filter"
        wait_idle(engine)
        metrics = client.get("/metrics").text
    assert metric_value(metrics, "tokenmill:filter_actions_total", 'action="refuse",filter="rpa"') == 2
    assert metric_value(metrics, "tokenmill:request_success_total", 'finished_reason="abort"') == 2


def test_refuse_in_chat(long_dir, ref_llm):
    messages = [{"role": "user", "content": "Say something."}]
    text = (
        ref_llm.chat(messages, SamplingParams(temperature=0, max_tokens=30, ignore_eos=True))[0]
        .outputs[0]
        .text
    )
    assert text.startswith(" 😀 of~"), f"the tiny model's greedy text changed: {text!r}"
    expected = " 😀 "
    spec = {"name": "w", "kind": "blocklist", "words": ["of"], "action": "refuse"}
    body = {"messages": messages, "max_tokens": 30, "temperature": 0, "ignore_eos": True}
    with filtered(long_dir, spec) as (client, _):
        data = client.post("/v1/chat/completions", json=body).json()
        (choice,) = data["choices"]
        assert choice["message"] == {"role": "assistant", "content": expected}
        assert choice["finish_reason"] == "content_filter"
        events = _stream(client, "/v1/chat/completions", body)
    assert events[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    _assert_prefixes(_texts(events), expected)
    assert events[-1]["choices"][0]["finish_reason"] == "content_filter"


def test_flag_leaves_the_text_and_counts(long_dir, ref):
    spec = {**JP, "action": "flag", "whole_word": False}
    with filtered(long_dir, spec) as (client, _):
        data = client.post("/v1/completions", json=GREEDY).json()
        assert data["choices"][0]["text"] == ref and data["choices"][0]["finish_reason"] == "length"
        assert "".join(_texts(_stream(client, "/v1/completions", GREEDY))) == ref
        metrics = client.get("/metrics").text
    assert metric_value(metrics, "tokenmill:filter_actions_total", 'action="flag",filter="jp"') == 6


def test_each_of_n_choices_is_filtered(long_dir):
    body = {**GREEDY, "n": 2, "max_tokens": 1000}
    with filtered(long_dir, RPA) as (client, engine):
        data = client.post("/v1/completions", json=body).json()
        assert [(c["index"], c["text"], c["finish_reason"]) for c in data["choices"]] == [
            (0, " 日本語 日本語 日本語", "content_filter"),
            (1, " 日本語 日本語 日本語", "content_filter"),
        ]
        events = _stream(client, "/v1/completions", body)
        for i in (0, 1):
            _assert_prefixes(_texts(events, i), " 日本語 日本語 日本語")
        wait_idle(engine)


def test_logprobs_leave_out_the_tokens_of_masked_text(long_dir, ref):
    spec = {"name": "rpa", "kind": "blocklist", "words": ["rPa"], "whole_word": False, "action": "mask"}
    body = {**GREEDY, "logprobs": 1}
    with filtered(long_dir, spec) as (client, _):
        data = client.post("/v1/completions", json=body).json()
        choice = data["choices"][0]
        assert choice["text"] == HEAD.replace("rPa", "****") + ref[len(HEAD) :]
        tokens = choice["logprobs"]["tokens"]
        assert "rPa" not in "".join(tokens) and 0 < len(tokens) < data["usage"]["completion_tokens"]
        assert len(choice["logprobs"]["token_logprobs"]) == len(tokens)
        events = _stream(client, "/v1/completions", body)
    streamed = [
        t for e in events if e["choices"][0]["logprobs"] for t in e["choices"][0]["logprobs"]["tokens"]
    ]
    # which neighbours of the span go with it depends on how the engine's snapshots fell
    assert "rPa" not in "".join(streamed) and 0 < len(streamed) < 40
    assert "".join(_texts(events)) == choice["text"]


def test_a_refusing_classifier_holds_the_stream_until_it_has_scored(long_dir):
    calls = []

    def classify(text, top_k=None, truncation=True):
        calls.append(text)
        return [{"label": "bad", "score": 0.9 if "rPa" in text else 0.1}]

    fs = FilterSet([ClassifierFilter("tox", "refuse", "bad", 0.5, classify)])
    with filtered(long_dir, fs) as (client, _):
        data = client.post("/v1/completions", json=GREEDY).json()
        assert data["choices"][0]["text"] == "" and data["choices"][0]["finish_reason"] == "content_filter"
        events = _stream(client, "/v1/completions", GREEDY)
        ok = client.post("/v1/completions", json={**GREEDY, "max_tokens": 3}).json()
    # nothing was sent before the score: one last chunk, empty, refused
    assert [(c["choices"][0]["text"], c["choices"][0]["finish_reason"]) for c in events] == [
        ("", "content_filter")
    ]
    # an output the classifier passes is sent whole
    assert ok["choices"][0]["text"] == " 日本語" and ok["choices"][0]["finish_reason"] == "length"
    assert len(calls) == 3


class FakeStore:
    """What the routes and the app need of a feedback store."""

    def __init__(self, fail: bool = False) -> None:
        self.records: list[dict] = []
        self.fail = fail

    def log_request(self, record: dict) -> None:
        if self.fail:
            raise RuntimeError("database gone")
        self.records.append(record)

    def add_failure_listener(self, fn) -> None:
        pass

    def close(self) -> None:
        pass


def test_the_request_log(long_dir, ref):
    store = FakeStore()
    expected = " [jp] [jp] " + ref[len(" 日本語 日本語 ") :]
    with filtered(long_dir, JP, store=store) as (client, _):
        data = client.post("/v1/completions", json=GREEDY).json()
        events = _stream(
            client, "/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 5}
        )
    first, second = store.records
    assert first["id"] == data["id"] and first["route"] == "completions" and first["model"] == MODEL
    assert first["prompt"] == PROMPT and first["output"] == [expected]
    assert first["params"] == {"max_tokens": 40, "temperature": 0, "ignore_eos": True}
    assert first["finish_reasons"] == ["length"]
    assert first["filter_decisions"] == [{"choice": 0, "filter": "jp", "action": "mask", "count": 2}]
    t = first["timing"]
    assert t["prompt_tokens"] == data["usage"]["prompt_tokens"] and t["completion_tokens"] == 40
    assert 0 < t["ttft_s"] <= t["total_s"]
    assert second["id"] == events[0]["id"] and second["route"] == "chat.completions"
    assert json.loads(second["prompt"]) == [{"role": "user", "content": "Hi"}]
    assert second["params"] == {"max_tokens": 5, "stream": True}
    assert second["output"] == ["".join(_texts(events))]
    assert second["finish_reasons"] == [events[-1]["choices"][0]["finish_reason"]]


def test_a_failing_request_log_does_not_fail_the_request(long_dir, ref):
    with filtered(long_dir, JP, store=FakeStore(fail=True)) as (client, _):
        r = client.post("/v1/completions", json=GREEDY)
        assert r.status_code == 200 and r.json()["choices"][0]["text"].startswith(" [jp] [jp] ")
        events = _stream(client, "/v1/completions", GREEDY)
    assert events[-1]["choices"][0]["finish_reason"] == "length"


def test_create_app_takes_a_filter_file(long_dir, tmp_path, ref):
    path = tmp_path / "f.json"
    path.write_text(json.dumps({"filters": [JP]}), encoding="utf-8")
    from tokenmill.server.app import create_app

    with serving(make_engine(long_dir), served_model_name=MODEL, filters=str(path)) as server:
        text = httpx.post(f"{server.url}/v1/completions", json=GREEDY, timeout=60).json()["choices"][0][
            "text"
        ]
    assert text.startswith(" [jp] [jp] ")

    class Engine:  # create_app reads only these before it loads the filters
        model_name = "m"

        def add_stats_listener(self, fn) -> None:
            pass

    with pytest.raises(ValueError, match="filter file .* does not exist"):
        create_app(Engine(), filters=str(tmp_path / "nope.json"))


def test_serve_flag_errors(tmp_path, capsys):
    from tokenmill.cli.main import main

    missing = tmp_path / "nope.json"
    assert main(["serve", "--filters", str(missing)]) != 0
    assert f"tokenmill serve: error: filter file '{missing}' does not exist" in capsys.readouterr().err
    bad = tmp_path / "bad.json"
    bad.write_text('{"filters": [{"name": "x", "kind": "pii", "action": "hide"}]}')
    assert main(["serve", "--filters", str(bad)]) != 0
    err = capsys.readouterr().err
    assert f"{bad}: filters[0] ('x'): action: unknown action 'hide'; use one of mask, refuse, flag" in err
