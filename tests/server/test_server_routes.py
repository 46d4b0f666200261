"""The OpenAI routes over real HTTP: outputs, streaming, n, logprobs, stop, seed, usage."""

from __future__ import annotations

import math

import openai
import pytest
from server_util import API_KEY, MODEL, metric_value, sse_events

from tokenmill import SamplingParams

PROMPTS = ["The capital of France", "Hello world! café", "def f(x):", "中文 日本語"]


def _stream(client, path: str, body: dict) -> list:
    with client.stream("POST", path, json={**body, "stream": True}) as r:
        assert r.status_code == 200, r.read()
        assert r.headers["content-type"].startswith("text/event-stream")
        events = list(sse_events(r.iter_lines()))
    assert events[-1] == "[DONE]"
    return events[:-1]


def test_health_and_models(client):
    r = client.get("/health")
    assert r.status_code == 200 and r.json() == {"status": "ok"}
    data = client.get("/v1/models").json()
    assert data["object"] == "list"
    (card,) = data["data"]
    assert card["id"] == MODEL and card["object"] == "model" and card["max_model_len"] == 4096
    assert client.get(f"/v1/models/{MODEL}").json()["id"] == MODEL
    r = client.get("/v1/models/other")
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"


@pytest.mark.parametrize("as_ids", [False, True])
def test_greedy_completions_equal_the_offline_api(client, ref_llm, as_ids):
    refs = ref_llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=12))
    for prompt, ref in zip(PROMPTS, refs):
        body = {"model": MODEL, "prompt": ref.prompt_token_ids if as_ids else prompt, "max_tokens": 12}
        r = client.post("/v1/completions", json={**body, "temperature": 0})
        assert r.status_code == 200, r.text
        data = r.json()
        assert data["id"].startswith("cmpl-") and data["object"] == "text_completion"
        assert data["model"] == MODEL and r.headers["x-request-id"] == data["id"]
        (choice,) = data["choices"]
        assert choice["text"] == ref.outputs[0].text
        assert choice["finish_reason"] == ref.outputs[0].finish_reason
        n_prompt, n_out = len(ref.prompt_token_ids), len(ref.outputs[0].token_ids)
        assert data["usage"] == {
            "prompt_tokens": n_prompt,
            "completion_tokens": n_out,
            "total_tokens": n_prompt + n_out,
        }


def test_completions_default_to_16_tokens(client):
    data = client.post(
        "/v1/completions", json={"prompt": "Hello", "temperature": 0, "ignore_eos": True}
    ).json()
    assert data["usage"]["completion_tokens"] == 16 and data["choices"][0]["finish_reason"] == "length"


def test_streamed_completion_equals_the_whole_one(client):
    body = {"prompt": PROMPTS[0], "max_tokens": 20, "temperature": 0, "ignore_eos": True}
    whole = client.post("/v1/completions", json=body).json()
    events = _stream(client, "/v1/completions", {**body, "stream_options": {"include_usage": True}})
    *chunks, last = events
    assert all(c["id"] == whole["id"] or c["id"].startswith("cmpl-") for c in events)
    assert len({c["id"] for c in events}) == 1
    assert all(c["object"] == "text_completion" and c["usage"] is None for c in chunks)
    assert "".join(c["choices"][0]["text"] for c in chunks) == whole["choices"][0]["text"]
    assert [c["choices"][0]["finish_reason"] for c in chunks][-1] == "length"
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])
    assert last["choices"] == [] and last["usage"] == whole["usage"]


def test_stream_without_include_usage_has_no_usage(client):
    events = _stream(client, "/v1/completions", {"prompt": "Hi", "max_tokens": 4, "temperature": 0})
    assert events and all("usage" not in e and e["choices"] for e in events)


def test_greedy_chat_equals_the_offline_api(client, ref_llm):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "The capital of Italy?"},
    ]
    ref = ref_llm.chat(messages, SamplingParams(temperature=0, max_tokens=10))[0]
    body = {"model": MODEL, "messages": messages, "max_completion_tokens": 10, "temperature": 0}
    data = client.post("/v1/chat/completions", json=body).json()
    assert data["id"].startswith("chatcmpl-") and data["object"] == "chat.completion"
    (choice,) = data["choices"]
    assert choice["message"] == {"role": "assistant", "content": ref.outputs[0].text}
    assert choice["finish_reason"] == ref.outputs[0].finish_reason
    assert data["usage"]["prompt_tokens"] == len(ref.prompt_token_ids)

    events = _stream(client, "/v1/chat/completions", body)
    assert all(e["object"] == "chat.completion.chunk" for e in events)
    first, *rest = events
    assert first["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert "".join(e["choices"][0]["delta"].get("content", "") for e in rest) == ref.outputs[0].text
    assert rest[-1]["choices"][0]["finish_reason"] == ref.outputs[0].finish_reason


def test_chat_content_parts_and_developer_role(client, ref_llm):
    ref = ref_llm.chat([{"role": "system", "content": "ab"}], SamplingParams(temperature=0, max_tokens=6))[0]
    parts = [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]
    body = {"messages": [{"role": "developer", "content": parts}], "max_tokens": 6, "temperature": 0}
    data = client.post("/v1/chat/completions", json=body).json()
    assert data["choices"][0]["message"]["content"] == ref.outputs[0].text


def test_n_and_seed_are_reproducible(client):
    body = {"prompt": PROMPTS[1], "max_tokens": 8, "temperature": 1.0, "seed": 7, "n": 3, "ignore_eos": True}
    a = client.post("/v1/completions", json=body).json()
    b = client.post("/v1/completions", json=body).json()
    assert [c["index"] for c in a["choices"]] == [0, 1, 2]
    assert [c["text"] for c in a["choices"]] == [c["text"] for c in b["choices"]]
    assert a["usage"]["completion_tokens"] == 24
    events = _stream(client, "/v1/completions", body)
    streamed = [
        "".join(e["choices"][0]["text"] for e in events if e["choices"][0]["index"] == i) for i in range(3)
    ]
    assert streamed == [c["text"] for c in a["choices"]]
    finishes = [e["choices"][0] for e in events if e["choices"][0]["finish_reason"]]
    assert sorted(c["index"] for c in finishes) == [0, 1, 2]


def test_chat_n_streams_each_choice(client):
    body = {
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 5,
        "n": 2,
        "seed": 1,
        "ignore_eos": True,
    }
    whole = client.post("/v1/chat/completions", json=body).json()
    events = _stream(client, "/v1/chat/completions", body)
    for i, choice in enumerate(whole["choices"]):
        mine = [e["choices"][0] for e in events if e["choices"][0]["index"] == i]
        assert mine[0]["delta"]["role"] == "assistant"
        assert "".join(c["delta"].get("content", "") for c in mine) == choice["message"]["content"]
        assert mine[-1]["finish_reason"] == "length"


def test_completion_logprobs(client, ref_llm):
    ref = ref_llm.generate(
        PROMPTS[0], SamplingParams(temperature=0, max_tokens=6, logprobs=3, ignore_eos=True)
    )[0]
    body = {"prompt": PROMPTS[0], "max_tokens": 6, "temperature": 0, "logprobs": 3, "ignore_eos": True}
    lp = client.post("/v1/completions", json=body).json()["choices"][0]["logprobs"]
    assert set(lp) == {"tokens", "token_logprobs", "top_logprobs", "text_offset"}
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == 6
    for got, want in zip(lp["token_logprobs"], ref.outputs[0].logprobs):
        assert math.isclose(got, want.logprob, abs_tol=1e-4)
    assert all(1 <= len(top) <= 4 for top in lp["top_logprobs"])
    assert lp["text_offset"][0] == 0 and lp["text_offset"] == sorted(lp["text_offset"])
    # streamed logprobs arrive piece by piece and add up to the same
    events = _stream(client, "/v1/completions", body)
    streamed = [
        t for e in events if e["choices"][0]["logprobs"] for t in e["choices"][0]["logprobs"]["tokens"]
    ]
    assert streamed == lp["tokens"]


def test_chat_logprobs(client):
    body = {
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 5,
        "temperature": 0,
        "ignore_eos": True,
    }
    r = client.post("/v1/chat/completions", json={**body, "logprobs": True, "top_logprobs": 2})
    content = r.json()["choices"][0]["logprobs"]["content"]
    assert len(content) == 5
    for entry in content:
        assert entry["bytes"] == list(entry["token"].encode("utf-8"))
        assert len(entry["top_logprobs"]) == 2
        # greedy: the chosen token is the most likely one
        assert math.isclose(entry["logprob"], entry["top_logprobs"][0]["logprob"], abs_tol=1e-5)
    plain = client.post("/v1/chat/completions", json=body).json()["choices"][0]
    assert plain["logprobs"] is None


def test_stop_strings_match_the_offline_api(client, ref_llm):
    text = ref_llm.generate(PROMPTS[0], SamplingParams(temperature=0, max_tokens=24, ignore_eos=True))[0]
    text = text.outputs[0].text
    k = next(
        i
        for i in range(len(text) // 2, len(text) - 1)
        if text[i : i + 2].isprintable() and text[i] != "\ufffd"
    )
    stop = text[k : k + 2]
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, stop=[stop])
    ref = ref_llm.generate(PROMPTS[0], params)[0].outputs[0]
    body = {"prompt": PROMPTS[0], "max_tokens": 24, "temperature": 0, "ignore_eos": True, "stop": stop}
    choice = client.post("/v1/completions", json=body).json()["choices"][0]
    assert choice["text"] == ref.text and stop not in choice["text"]
    assert choice["finish_reason"] == ref.finish_reason == "stop" and choice["stop_reason"] == stop
    events = _stream(client, "/v1/completions", {**body, "stop": [stop, "never-seen"]})
    assert "".join(e["choices"][0]["text"] for e in events) == ref.text


def test_the_openai_client(server, ref_llm):
    c = openai.OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0)
    assert [m.id for m in c.models.list()] == [MODEL]
    ref = ref_llm.generate(PROMPTS[2], SamplingParams(temperature=0, max_tokens=8))[0].outputs[0]
    out = c.completions.create(model=MODEL, prompt=PROMPTS[2], max_tokens=8, temperature=0)
    assert out.choices[0].text == ref.text and out.usage.completion_tokens == len(ref.token_ids)

    messages = [{"role": "user", "content": "Hello"}]
    ref = ref_llm.chat(messages, SamplingParams(temperature=0, max_tokens=8))[0].outputs[0]
    chat = c.chat.completions.create(model=MODEL, messages=messages, max_tokens=8, temperature=0)
    assert chat.choices[0].message.content == ref.text and chat.choices[0].message.role == "assistant"
    stream = c.chat.completions.create(
        model=MODEL,
        messages=messages,
        max_tokens=8,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == ref.text
    assert chunks[-1].usage.completion_tokens == len(ref.token_ids)

    with pytest.raises(openai.BadRequestError) as e:
        c.completions.create(model=MODEL, prompt="x", temperature=-1)
    assert e.value.status_code == 400 and e.value.body["param"] == "temperature"
    with pytest.raises(openai.NotFoundError):
        c.completions.create(model="no-such-model", prompt="x")
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{server.url}/v1", api_key="wrong", max_retries=0).models.list()


def test_metrics_count_requests(client):
    client.post("/v1/completions", json={"prompt": "Hello", "max_tokens": 5, "ignore_eos": True})
    r = client.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    text = r.text
    for name in (
        "time_to_first_token_seconds",
        "inter_token_latency_seconds",
        "time_per_output_token_seconds",
        "e2e_request_latency_seconds",
        "request_queue_time_seconds",
    ):
        assert f"# TYPE tokenmill:{name} histogram" in text
        assert metric_value(text, f"tokenmill:{name}_count") > 0, name
    for name in ("prompt_tokens_total", "generation_tokens_total", "prefix_cache_queries_total"):
        assert metric_value(text, f"tokenmill:{name}") > 0, name
    for name in ("num_preemptions_total", "prefix_cache_hits_total"):
        assert f"# TYPE tokenmill:{name} counter" in text
    assert metric_value(text, "tokenmill:request_success_total", 'finished_reason="length"') > 0
    assert metric_value(text, "tokenmill:num_requests_running") == 0
    assert metric_value(text, "tokenmill:num_requests_waiting") == 0
    assert metric_value(text, "tokenmill:kv_cache_blocks_total") > 0
    assert "tokenmill:kv_cache_usage_perc" in text and "tokenmill:kv_cache_blocks_used" in text
    # metrics and health need no key
    assert client.get("/metrics", headers={"Authorization": ""}).status_code == 200
