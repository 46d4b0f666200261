"""POST /v1/inspect/tokens and /v1/inspect/attention over real HTTP, and
return_tokens_as_token_ids on the completion routes."""

from __future__ import annotations

import httpx
import pytest
import torch
from server_util import sse_events

ID = "token_id:"
PROMPT = "The capital of France is"
SAMPLING = {
    "temperature": 0.9,
    "top_k": 60,
    "top_p": 0.95,
    "min_p": 0.02,
    "repetition_penalty": 1.2,
    "seed": 11,
}


def _ids(labels: list[str]) -> list[int]:
    assert all(t.startswith(ID) for t in labels), labels
    return [int(t[len(ID) :]) for t in labels]


def _error(r: httpx.Response, status: int, param: str | None, message: str) -> None:
    assert r.status_code == status, r.text[:500]
    err = r.json()["error"]
    assert err["param"] == param and err["type"] == "invalid_request_error"
    assert message in err["message"], err["message"]


@pytest.fixture(scope="module")
def hf_eager(long_dir):
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(
        long_dir, dtype=torch.float32, attn_implementation="eager"
    ).eval()


# -- token probabilities ---------------------------------------------------------------


def _check_against_logprobs(steps: list[dict], ids: list[int], chosen: list[float], tops: list[dict]) -> None:
    assert [s["token"]["id"] for s in steps] == ids
    for s, lp, top in zip(steps, chosen, tops):
        assert s["token"]["logprob"] == pytest.approx(lp, abs=1e-4)
        alts = s["alternatives"]
        assert len(alts) == 5
        want = sorted(top.items(), key=lambda kv: kv[1], reverse=True)[:5]
        assert [a["id"] for a in alts] == _ids([k for k, _ in want])
        for a, (_, v) in zip(alts, want):
            assert a["logprob"] == pytest.approx(v, abs=1e-4)
        # The engine drew this token with these parameters: the filters kept it.
        assert s["token"]["prob_final"] > 0 and s["token"]["removed_by"] is None


def test_token_probabilities_equal_the_completion_logprobs(client):
    body = {"prompt": PROMPT, "max_tokens": 12, "ignore_eos": True, "logprobs": 5, **SAMPLING}
    r = client.post("/v1/completions", json={**body, "return_tokens_as_token_ids": True})
    lp = r.json()["choices"][0]["logprobs"]
    ids = _ids(lp["tokens"])
    r = client.post(
        "/v1/inspect/tokens", json={"prompt": PROMPT, "completion_token_ids": ids, "top_n": 5, **SAMPLING}
    )
    assert r.status_code == 200, r.text
    data = r.json()
    tok = client.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 1}).json()
    assert tok["usage"]["prompt_tokens"] == len(data["prompt_tokens"])
    assert "".join(t["text"] for t in data["prompt_tokens"]).endswith(PROMPT)
    _check_against_logprobs(data["steps"], ids, lp["token_logprobs"], lp["top_logprobs"])
    for s in data["steps"]:
        for a in s["alternatives"]:
            assert set(a) == {"id", "text", "logprob", "prob", "prob_temperature", "prob_final", "removed_by"}
            assert a["prob"] == pytest.approx(2.718281828459045 ** a["logprob"], rel=1e-5)
    assert data["params"] == {
        **SAMPLING,
        "greedy": False,
        "presence_penalty": 0.0,
        "frequency_penalty": 0.0,
        "top_n": 5,
        "max_tokens": None,
        "generated": False,
    }


def test_token_probabilities_equal_streamed_chat_logprobs(client):
    messages = [{"role": "user", "content": "Name a city."}]
    body = {"messages": messages, "max_tokens": 10, "ignore_eos": True, "logprobs": True, "top_logprobs": 5}
    with client.stream(
        "POST",
        "/v1/chat/completions",
        json={**body, **SAMPLING, "stream": True, "return_tokens_as_token_ids": True},
    ) as r:
        events = [e for e in sse_events(r.iter_lines()) if e != "[DONE]"]
    content = [c for e in events for ch in e["choices"] if ch["logprobs"] for c in ch["logprobs"]["content"]]
    ids = _ids([c["token"] for c in content])
    tops = [{t["token"]: t["logprob"] for t in c["top_logprobs"]} for c in content]
    r = client.post(
        "/v1/inspect/tokens", json={"messages": messages, "completion_token_ids": ids, "top_n": 5, **SAMPLING}
    )
    assert r.status_code == 200, r.text
    _check_against_logprobs(r.json()["steps"], ids, [c["logprob"] for c in content], tops)


def test_inspection_generates_what_the_engine_generates(client):
    r = client.post("/v1/inspect/tokens", json={"prompt": PROMPT, "max_tokens": 6, **SAMPLING})
    assert r.status_code == 200, r.text
    data = r.json()
    assert data["params"]["generated"] and data["params"]["max_tokens"] == 6
    body = {"prompt": PROMPT, "max_tokens": 6, "logprobs": 0, "return_tokens_as_token_ids": True, **SAMPLING}
    want = _ids(client.post("/v1/completions", json=body).json()["choices"][0]["logprobs"]["tokens"])
    assert [s["token"]["id"] for s in data["steps"]] == want
    assert len(data["steps"][0]["alternatives"]) == 10  # the default top_n


def test_greedy_inspection_puts_all_mass_on_the_argmax(client):
    r = client.post("/v1/inspect/tokens", json={"prompt": PROMPT, "max_tokens": 3, "temperature": 0})
    for s in r.json()["steps"]:
        best = s["alternatives"][0]
        assert (
            s["token"]["id"] == best["id"] and best["prob_final"] == 1.0 and best["prob_temperature"] == 1.0
        )
        assert all(a["prob_final"] == 0.0 and a["removed_by"] is None for a in s["alternatives"][1:])


# -- attention -------------------------------------------------------------------------


def test_attention_equals_transformers_output_attentions(client, hf_eager):
    r = client.post("/v1/inspect/attention", json={"prompt": PROMPT})
    assert r.status_code == 200, r.text
    data = r.json()
    ids = [t["id"] for t in data["tokens"]]
    T = len(ids)
    assert data["num_prompt_tokens"] == T and data["num_layers"] == 2 and data["num_heads"] == 4
    assert data["layers"] == [0, 1]
    got = torch.tensor(data["attention"], dtype=torch.float64)  # (L, H, T, T)
    with torch.no_grad():
        want = torch.stack(hf_eager(torch.tensor([ids]), output_attentions=True).attentions)[:, 0].double()
    assert got.shape == want.shape == (2, 4, T, T)
    # Rounded to 4 decimals: within half a unit of the last place.
    torch.testing.assert_close(got, want, atol=5e-5 + 1e-6, rtol=0)
    assert (got.triu(1) == 0).all()
    torch.testing.assert_close(got.sum(-1), torch.ones(2, 4, T, dtype=torch.float64), atol=T * 5e-5, rtol=0)


def test_attention_over_chat_messages_with_generated_tokens(client):
    messages = [{"role": "user", "content": "Hi"}]
    r = client.post("/v1/inspect/attention", json={"messages": messages, "max_tokens": 3, "temperature": 0})
    assert r.status_code == 200, r.text
    data = r.json()
    P, T = data["num_prompt_tokens"], len(data["tokens"])
    assert P < T <= P + 3 and data["params"]["max_tokens"] == 3
    prompt_text = "".join(t["text"] for t in data["tokens"][:P])
    assert prompt_text.startswith("<s>user: Hi</s>") and prompt_text.endswith("assistant:")
    greedy = client.post(
        "/v1/chat/completions",
        json={
            "messages": messages,
            "max_tokens": 3,
            "temperature": 0,
            "logprobs": True,
            "return_tokens_as_token_ids": True,
        },
    ).json()
    want = _ids([c["token"] for c in greedy["choices"][0]["logprobs"]["content"]])
    assert [t["id"] for t in data["tokens"][P:]] == want
    layer1 = client.post(
        "/v1/inspect/attention", json={"messages": messages, "completion_token_ids": want, "layers": [1]}
    ).json()
    assert layer1["layers"] == [1] and layer1["attention"] == data["attention"][1:]


# -- errors ----------------------------------------------------------------------------


def test_inspection_without_a_language_model():
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from tokenmill.server.errors import install_handlers
    from tokenmill.server.inspect import install_inspection
    from tokenmill.server.serving import ServerState

    app = FastAPI()
    install_handlers(app)
    install_inspection(app, ServerState(None, ""))
    with TestClient(app) as c:
        for path in ("/v1/inspect/tokens", "/v1/inspect/attention"):
            r = c.post(path, json={"prompt": "Hi"})
            assert r.status_code == 404
            err = r.json()["error"]
            assert err["code"] == "model_not_found" and err["param"] == "model"
            assert err["message"] == (
                "inspection needs a text-generation model and this server serves none; "
                "start it with --model MODEL for this route"
            )


@pytest.mark.parametrize("path", ["/v1/inspect/tokens", "/v1/inspect/attention"])
def test_prompt_errors(client, path):
    msgs = [{"role": "user", "content": "Hi"}]
    both = client.post(path, json={"prompt": "Hi", "messages": msgs})
    _error(
        both,
        400,
        "prompt",
        "give exactly one of 'prompt' (a text or a list of token ids) and 'messages' "
        "(chat messages); both were given",
    )
    _error(client.post(path, json={}), 400, "prompt", "; neither was given")
    _error(
        client.post(path, json={"prompt": [5, 512]}),
        400,
        "prompt",
        "prompt token id 512 is outside the vocabulary [0, 512)",
    )
    _error(
        client.post(path, json={"messages": []}), 400, "messages", "messages must hold at least one message"
    )
    _error(
        client.post(path, json={"prompt": "Hi", "completion_token_ids": [3, -1]}),
        400,
        "completion_token_ids",
        "completion_token_ids: token id -1 is outside the vocabulary [0, 512)",
    )
    _error(
        client.post(path, json={"prompt": "Hi", "completion_token_ids": []}),
        400,
        "completion_token_ids",
        "completion_token_ids must hold at least one token id; leave it out to have the model generate",
    )
    _error(
        client.post(path, json={"prompt": "Hi", "max_tokens": 2, "temperature": 500}),
        400,
        "temperature",
        "temperature must be in [0.0, 100.0], got 500.0",
    )
    _error(client.post(path, json={"prompt": "Hi", "top_k": "5"}), 400, "top_k", "invalid value for 'top_k'")
    r = client.post(path, json={"prompt": "Hi", "model": "other"})
    assert r.status_code == 404 and "the model 'other' does not exist" in r.json()["error"]["message"]
    r = httpx.post(client.base_url.join(path), json={"prompt": "Hi"})
    assert r.status_code == 401


def test_token_inspection_errors(client):
    for bad in (0, 21):
        _error(
            client.post("/v1/inspect/tokens", json={"prompt": "Hi", "top_n": bad}),
            400,
            "top_n",
            f"top_n must be an integer in [1, 20], got {bad}",
        )
    too_many = [5] * 4095
    _error(
        client.post("/v1/inspect/tokens", json={"prompt": [5, 6], "completion_token_ids": too_many}),
        400,
        "completion_token_ids",
        "this model's context is 4096 tokens, but the prompt (2 tokens) and "
        "completion_token_ids (4095) make 4097; send fewer tokens",
    )
    r = client.post("/v1/inspect/tokens", json={"prompt": [5] * 4090, "max_tokens": 10})
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"


def test_attention_inspection_errors(client):
    path = "/v1/inspect/attention"
    _error(
        client.post(path, json={"prompt": [5] * 257}),
        400,
        "prompt",
        "attention inspection takes at most 256 tokens, but the prompt has 257 tokens (257 in all); "
        "shorten the input",
    )
    _error(
        client.post(path, json={"prompt": [5] * 250, "max_tokens": 7}),
        400,
        "max_tokens",
        "attention inspection takes at most 256 tokens, but the prompt has 250 tokens and max_tokens "
        "asks for 7 more (257 in all)",
    )
    _error(
        client.post(path, json={"prompt": [5] * 250, "completion_token_ids": [6] * 7}),
        400,
        "prompt",
        "but the prompt has 250 tokens and completion_token_ids 7 (257 in all)",
    )
    _error(
        client.post(path, json={"prompt": "Hi", "max_tokens": -1}),
        400,
        "max_tokens",
        "max_tokens must be an integer >= 0, got -1",
    )
    _error(
        client.post(path, json={"prompt": "Hi", "layers": [0, 2]}),
        400,
        "layers",
        "layers must list layer indices in [0, 1]; layer 2 does not exist",
    )
    _error(client.post(path, json={"prompt": "Hi", "layers": []}), 400, "layers", "the list is empty")
    assert client.post(path, json={"prompt": [5] * 256}).status_code == 200


# -- return_tokens_as_token_ids ----------------------------------------------------------


@pytest.mark.parametrize("stream", [False, True])
def test_completion_logprobs_name_token_ids(client, server_engine, stream):
    body = {"prompt": PROMPT, "max_tokens": 8, "temperature": 0, "logprobs": 3, "ignore_eos": True}

    def run(extra: dict) -> tuple[str, dict]:
        if not stream:
            ch = client.post("/v1/completions", json={**body, **extra}).json()["choices"][0]
            return ch["text"], ch["logprobs"]
        with client.stream("POST", "/v1/completions", json={**body, **extra, "stream": True}) as r:
            chunks = [e["choices"][0] for e in sse_events(r.iter_lines()) if e != "[DONE]"]
        lps = [c["logprobs"] for c in chunks if c["logprobs"]]
        merged = {
            k: [v for lp in lps for v in lp[k]]
            for k in ("tokens", "token_logprobs", "top_logprobs", "text_offset")
        }
        return "".join(c["text"] for c in chunks), merged

    text, plain = run({})
    text_ids, lp = run({"return_tokens_as_token_ids": True})
    assert text_ids == text
    ids = _ids(lp["tokens"])
    decode = server_engine.tokenizer.decode
    assert [decode([i], skip_special_tokens=False) for i in ids] == plain["tokens"]
    assert (
        lp["token_logprobs"] == pytest.approx(plain["token_logprobs"], abs=1e-5)
        and lp["text_offset"] == plain["text_offset"]
    )
    for top, top_plain in zip(lp["top_logprobs"], plain["top_logprobs"]):
        assert all(k.startswith(ID) for k in top) and len(top) >= 3
        assert {
            decode([i], skip_special_tokens=False): v for i, v in zip(_ids(list(top)), top.values())
        } == pytest.approx(top_plain, abs=1e-5)


@pytest.mark.parametrize("stream", [False, True])
def test_chat_logprobs_name_token_ids(client, server_engine, stream):
    body = {
        "messages": [{"role": "user", "content": "Hello"}],
        "max_tokens": 6,
        "temperature": 0,
        "logprobs": True,
        "top_logprobs": 2,
        "ignore_eos": True,
    }

    def run(extra: dict) -> list[dict]:
        if not stream:
            return client.post("/v1/chat/completions", json={**body, **extra}).json()["choices"][0][
                "logprobs"
            ]["content"]
        with client.stream("POST", "/v1/chat/completions", json={**body, **extra, "stream": True}) as r:
            events = [e for e in sse_events(r.iter_lines()) if e != "[DONE]"]
        return [c for e in events for ch in e["choices"] if ch["logprobs"] for c in ch["logprobs"]["content"]]

    plain, as_ids = run({}), run({"return_tokens_as_token_ids": True})
    assert len(plain) == len(as_ids) == 6
    decode = server_engine.tokenizer.decode
    for p, q in zip(plain, as_ids):
        (i,) = _ids([q["token"]])
        assert decode([i], skip_special_tokens=False) == p["token"]
        assert q["bytes"] == p["bytes"] and q["logprob"] == pytest.approx(
            p["logprob"], abs=1e-5
        )  # bytes stay the token's text
        assert [
            decode([j], skip_special_tokens=False) for j in _ids([t["token"] for t in q["top_logprobs"]])
        ] == [t["token"] for t in p["top_logprobs"]]
