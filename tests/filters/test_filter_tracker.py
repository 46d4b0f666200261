"""The server's filtering delta tracker on hand-made engine snapshots, and the request record."""

from __future__ import annotations

import asyncio

from tokenmill.filters import parse_filters
from tokenmill.filters.tracker import FilteredDeltas
from tokenmill.generation.outputs import CompletionOutput, Logprob, RequestMetrics, RequestOutput
from tokenmill.server.metrics import ServerMetrics
from tokenmill.server.serving import RequestRecord, ServerState

# one "token" per piece; the blocked word "darn" is cut over three tokens
PIECES = ["oh ", "d", "ar", "n", " it", "!"]


def _snapshots(pieces: list[str], finish: str = "length") -> list[RequestOutput]:
    outs = []
    for k in range(1, len(pieces) + 1):
        ids = list(range(100, 100 + k))
        lps = [Logprob(t, -0.5) for t in ids]
        done = k == len(pieces)
        o = CompletionOutput(0, "".join(pieces[:k]), ids, finish if done else None, logprobs=lps)
        outs.append(RequestOutput("r", None, [1], [o], done, RequestMetrics()))
    return outs


def _run(tracker, outs, with_tokens=True):
    async def go():
        deltas = []
        for out in outs:
            deltas.extend(await tracker.step(out, with_tokens))
            if tracker.all_done:
                break
        return deltas

    return asyncio.run(go())


def test_masked_tokens_never_go_out_and_the_rest_follow_their_text():
    fs = parse_filters({"filters": [{"name": "w", "kind": "blocklist", "words": ["darn"], "action": "mask"}]})
    deltas = _run(FilteredDeltas(fs, 1), _snapshots(PIECES))
    assert "".join(d.text for d in deltas) == "oh **** it!"
    assert all("d" not in d.text for d in deltas)
    # tokens 101-103 produced "darn": left out; "darn" is settled once " it" shows it is a whole
    # word; each other token goes out with its own text
    sent = [(d.text, d.token_ids) for d in deltas]
    assert sent == [("oh ", [100]), ("**** it", [104]), ("!", [105])]
    assert [lp.token_id for d in deltas for lp in d.logprobs] == [100, 104, 105]
    assert deltas[-1].finish_reason == "length"


def test_refusal_ends_the_choice_with_content_filter():
    fs = parse_filters(
        {"filters": [{"name": "w", "kind": "blocklist", "words": ["darn"], "action": "refuse"}]}
    )
    tracker = FilteredDeltas(fs, 1)
    outs = _snapshots(PIECES)
    deltas = _run(tracker, outs)
    assert "".join(d.text for d in deltas) == "oh "
    assert deltas[-1].finish_reason == "content_filter" and deltas[-1].stop_reason is None
    assert [t for d in deltas for t in d.token_ids] == [100]
    assert tracker.all_done  # the route stops the generation here: the " it!" snapshots were never read
    assert tracker.decisions() == [{"choice": 0, "filter": "w", "action": "refuse", "count": 1}]


class _Store:
    def __init__(self, fail: bool = False) -> None:
        self.records: list[dict] = []
        self.fail = fail

    def log_request(self, record: dict) -> None:
        if self.fail:
            raise RuntimeError("database gone")
        self.records.append(record)


def test_the_request_record_counts_and_logs():
    fs = parse_filters({"filters": [{"name": "w", "kind": "blocklist", "words": ["darn"], "action": "mask"}]})
    store, metrics = _Store(), ServerMetrics()
    state = ServerState(None, "m", store=store, filters=fs, metrics=metrics)
    record = RequestRecord(state, "cmpl-1", "completions", "Hi", {"max_tokens": 6}, 1)
    record.prompt_tokens = 1
    tracker = FilteredDeltas(fs, 1)
    outs = _snapshots(PIECES)

    async def go():
        for out in outs:
            record.last = out
            record.sent(await tracker.step(out, True))

    asyncio.run(go())
    record.close(tracker)
    record.close(tracker)  # once only
    (r,) = store.records
    assert {k: r[k] for k in ("id", "model", "route", "prompt", "output", "params", "finish_reasons")} == {
        "id": "cmpl-1",
        "model": "m",
        "route": "completions",
        "prompt": "Hi",
        "output": ["oh **** it!"],
        "params": {"max_tokens": 6},
        "finish_reasons": ["length"],
    }
    assert r["filter_decisions"] == [{"choice": 0, "filter": "w", "action": "mask", "count": 1}]
    t = r["timing"]
    assert t["prompt_tokens"] == 1 and t["completion_tokens"] == 6
    assert 0 <= t["ttft_s"] <= t["total_s"] and isinstance(r["created"], float)
    assert metrics.filter_actions.labels(filter="w", action="mask")._value.get() == 1


def test_a_failing_store_never_fails_the_request(caplog):
    state = ServerState(None, "m", store=_Store(fail=True), metrics=ServerMetrics())
    record = RequestRecord(state, "cmpl-2", "completions", "Hi", {}, 1)
    fs = parse_filters({"filters": [{"name": "w", "kind": "blocklist", "words": ["x"], "action": "flag"}]})
    record.close(FilteredDeltas(fs, 1))  # does not raise
    assert "could not record request cmpl-2" in caplog.text


def test_a_token_that_shows_no_text_yet_waits_for_the_text_it_leads_to():
    # token 101 adds no text of its own: the first bytes of a multi-byte character, or text
    # a stop string holds back. Its text turns up with token 102 and is blocked, so neither
    # token may go out (a token string or its bytes would show the start of the word).
    fs = parse_filters({"filters": [{"name": "w", "kind": "blocklist", "words": ["darn"], "action": "mask"}]})
    deltas = _run(FilteredDeltas(fs, 1), _snapshots(["oh ", "", "darn", " it", "!"]))
    assert "".join(d.text for d in deltas) == "oh **** it!"
    assert [t for d in deltas for t in d.token_ids] == [100, 103, 104]
    assert [lp.token_id for d in deltas for lp in d.logprobs] == [100, 103, 104]


def test_a_token_without_text_before_a_refused_span_is_not_sent():
    fs = parse_filters(
        {"filters": [{"name": "w", "kind": "blocklist", "words": ["日本"], "action": "refuse"}]}
    )
    deltas = _run(FilteredDeltas(fs, 1), _snapshots(["oh ", "", "日本", " it"]))
    assert "".join(d.text for d in deltas) == "oh "
    assert [t for d in deltas for t in d.token_ids] == [100]
    assert deltas[-1].finish_reason == "content_filter"


def test_tokens_without_text_at_the_end_go_out_when_the_output_ends():
    fs = parse_filters({"filters": [{"name": "w", "kind": "blocklist", "words": ["darn"], "action": "mask"}]})
    deltas = _run(FilteredDeltas(fs, 1), _snapshots(["oh ", "ok", "", ""]))
    assert "".join(d.text for d in deltas) == "oh ok"
    assert [t for d in deltas for t in d.token_ids] == [100, 101, 102, 103]
    assert deltas[-1].finish_reason == "length"
