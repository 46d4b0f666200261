"""Every error a client can cause: status, OpenAI's body shape, the parameter named."""

from __future__ import annotations

import httpx
import pytest
from server_util import API_KEY, MODEL

CHAT = [{"role": "user", "content": "hi"}]


def _error(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"}
    err = body["error"]
    assert {"message", "type", "param", "code"} <= set(err)
    assert isinstance(err["message"], str) and err["message"]
    assert "Traceback" not in r.text
    return err


@pytest.mark.parametrize(
    "path, body, param",
    [
        ("/v1/completions", {"temperature": -1}, "temperature"),
        ("/v1/completions", {"top_p": 2}, "top_p"),
        ("/v1/completions", {"n": 0}, "n"),
        ("/v1/completions", {"n": 1000}, "n"),
        ("/v1/completions", {"max_tokens": -5}, "max_tokens"),
        ("/v1/completions", {"logprobs": 50}, "logprobs"),
        ("/v1/completions", {"presence_penalty": 3}, "presence_penalty"),
        ("/v1/completions", {"frequency_penalty": -2.5}, "frequency_penalty"),
        ("/v1/completions", {"top_k": -2}, "top_k"),
        ("/v1/completions", {"min_p": 1.5}, "min_p"),
        ("/v1/completions", {"repetition_penalty": 0}, "repetition_penalty"),
        ("/v1/completions", {"min_tokens": 10, "max_tokens": 5}, "min_tokens"),
        ("/v1/completions", {"stop": [""]}, "stop"),
        ("/v1/completions", {"stop": 5}, "stop"),
        ("/v1/completions", {"stop_token_ids": [-1]}, "stop_token_ids"),
        ("/v1/completions", {"stop_token_ids": [10**6]}, "stop_token_ids"),
        ("/v1/completions", {"logit_bias": {"99999": 1}}, "logit_bias"),
        ("/v1/completions", {"logit_bias": {"5": 500}}, "logit_bias"),
        ("/v1/completions", {"seed": 2**70}, "seed"),
        ("/v1/completions", {"echo": True}, "echo"),
        ("/v1/completions", {"prompt": ["a", "b"]}, "prompt"),
        ("/v1/completions", {"prompt": [1, 99999]}, "prompt"),
        ("/v1/completions", {"prompt": []}, "prompt"),
        ("/v1/completions", {"prompt": {"text": "hi"}}, "prompt"),
        ("/v1/chat/completions", {"temperature": 5e3}, "temperature"),
        ("/v1/chat/completions", {"max_completion_tokens": -1}, "max_completion_tokens"),
        ("/v1/chat/completions", {"logprobs": True, "top_logprobs": 50}, "top_logprobs"),
        ("/v1/chat/completions", {"top_logprobs": 2}, "top_logprobs"),
        ("/v1/chat/completions", {"messages": []}, "messages"),
        ("/v1/chat/completions", {"messages": [{"content": "x"}]}, "messages[0].role"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
        (
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
            "messages[0].content[0]",
        ),
        ("/v1/chat/completions", {"tools": [{"type": "function"}]}, "tools"),
        ("/v1/chat/completions", {"response_format": {"type": "json_object"}}, "response_format"),
    ],
)
def test_invalid_parameters_are_400_naming_the_parameter(client, path, body, param):
    base = {"prompt": "hi"} if path == "/v1/completions" else {"messages": CHAT}
    err = _error(client.post(path, json={**base, "max_tokens": 4, **body}), 400)
    assert err["type"] == "invalid_request_error" and err["param"] == param
    assert param.split("[")[0] in err["message"] or param in err["message"]


@pytest.mark.parametrize(
    "body, param",
    [
        ({"prompt": "hi", "max_tokens": "ten"}, "max_tokens"),
        ({"prompt": "hi", "temperature": "0.5"}, "temperature"),
        ({"prompt": "hi", "stream": "yes"}, "stream"),
        ({"prompt": "hi", "n": 1.5}, "n"),
        ({"prompt": "hi", "stream_options": {"include_usage": "no"}}, "stream_options.include_usage"),
        ({"max_tokens": 3}, "prompt"),
    ],
)
def test_wrong_types_and_missing_fields_are_400_not_422(client, body, param):
    err = _error(client.post("/v1/completions", json=body), 400)
    assert err["param"] == param and param in err["message"]


def test_missing_messages(client):
    err = _error(client.post("/v1/chat/completions", json={"model": MODEL}), 400)
    assert err["param"] == "messages" and "required" in err["message"]


@pytest.mark.parametrize("content", [b"{bad json", b"", b"[1, 2]", b'"text"', b"\xff\xfe"])
def test_malformed_bodies_are_400(client, content):
    for path in ("/v1/completions", "/v1/chat/completions"):
        r = client.post(path, content=content, headers={"Content-Type": "application/json"})
        err = _error(r, 400)
        assert err["type"] == "invalid_request_error"
        assert "JSON" in err["message"]


def test_unknown_fields_are_ignored(client):
    r = client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2, "no_such_field": {"x": 1}})
    assert r.status_code == 200


def test_huge_values_are_not_echoed_back(client):
    big = "x" * 1_000_000
    cases = [
        ("/v1/completions", {"prompt": "hi", "temperature": big}),
        ("/v1/completions", {"prompt": [1.5] * 200_000}),
        ("/v1/completions", {"prompt": "hi", "stop": [big, 5]}),
        ("/v1/completions", {"prompt": "hi", "model": big}),
        (
            "/v1/chat/completions",
            {"messages": [{"role": big, "content": big}], "response_format": {"type": big}},
        ),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": big}]}]}),
    ]
    for path, body in cases:
        r = client.post(path, json=body)
        assert r.status_code in (400, 404), r.text[:300]
        assert len(r.content) < 2000, (path, len(r.content))


def test_context_overflow_reports_the_token_counts(client):
    err = _error(client.post("/v1/completions", json={"prompt": [5] * 4000, "max_tokens": 200}), 400)
    assert err["code"] == "context_length_exceeded" and err["param"] == "max_tokens"
    assert (err["prompt_tokens"], err["max_tokens"], err["max_model_len"]) == (4000, 200, 4096)
    assert "4000" in err["message"] and "4096" in err["message"]
    err = _error(client.post("/v1/completions", json={"prompt": [5] * 5000, "max_tokens": 1}), 400)
    assert err["param"] == "prompt" and err["prompt_tokens"] == 5000
    body = {"messages": CHAT, "max_completion_tokens": 4096}
    err = _error(client.post("/v1/chat/completions", json=body), 400)
    assert err["code"] == "context_length_exceeded" and err["param"] == "max_completion_tokens"
    assert err["max_tokens"] == 4096 and err["prompt_tokens"] > 0


def test_api_key(server):
    body = {"prompt": "hi", "max_tokens": 2}
    for headers in (
        {},
        {"Authorization": "Bearer wrong"},
        {"Authorization": API_KEY},
        {"Authorization": "Basic x"},
    ):
        r = httpx.post(f"{server.url}/v1/completions", json=body, headers=headers)
        err = _error(r, 401)
        assert err["type"] == "authentication_error" and err["code"] == "invalid_api_key"
        assert r.headers["www-authenticate"] == "Bearer"
    assert _error(httpx.get(f"{server.url}/v1/models"), 401)
    ok = httpx.post(f"{server.url}/v1/completions", json=body, headers={"Authorization": f"Bearer {API_KEY}"})
    assert ok.status_code == 200
    assert httpx.get(f"{server.url}/health").status_code == 200
    assert httpx.get(f"{server.url}/metrics").status_code == 200


def test_unknown_model_is_404(client):
    for path, base in (("/v1/completions", {"prompt": "hi"}), ("/v1/chat/completions", {"messages": CHAT})):
        err = _error(client.post(path, json={**base, "model": "gpt-4"}), 404)
        assert err["code"] == "model_not_found" and err["param"] == "model" and "gpt-4" in err["message"]


def test_unknown_routes_and_methods(client):
    err = _error(client.get("/v1/nothing-here"), 404)
    assert err["code"] == "not_found"
    _error(client.post("/nothing"), 404)
    r = client.get("/v1/completions")
    err = _error(r, 405)
    assert err["code"] == "method_not_allowed" and "POST" in r.headers["allow"]
    _error(client.delete("/v1/chat/completions"), 405)


def test_body_over_the_limit_is_413(client):
    big = b'{"prompt": "' + b"a" * (17 * 2**20) + b'"}'
    err = _error(client.post("/v1/completions", content=big), 413)
    assert err["code"] == "request_too_large" and str(16 * 2**20) in err["message"]

    def chunked():  # no Content-Length: the limit is enforced while reading
        for _ in range(17):
            yield b"a" * 2**20

    _error(client.post("/v1/completions", content=chunked()), 413)


def test_unexpected_errors_are_500_without_details(server, client):
    async def boom():
        raise RuntimeError("secret internal detail")

    server.server.config.app.add_api_route("/v1/test-boom", boom, methods=["GET"])
    err = _error(client.get("/v1/test-boom"), 500)
    assert err["type"] == "server_error" and "secret" not in err["message"]
