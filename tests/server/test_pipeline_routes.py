"""Task pipelines over HTTP: /v1/pipelines/{task}, /v1/embeddings (with the openai client),
batching of requests that arrive together, errors, and `tokenmill serve --task`.

The server runs the tiny encoders of tests/tiny_encoders.py and the packaged
all-MiniLM-L6-v2; references are separate pipeline objects, called directly.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time

import httpx
import openai
import pytest
from server_util import LONG_CONTEXT, ServerThread, make_engine

import tiny_encoders
from tokenmill import pipeline
from tokenmill.cli.main import main
from tokenmill.server.app import create_app
from tokenmill.server.pipelines import PipelineSet, load_pipelines

MINILM = "all-minilm-l6-v2"
TEXTS = ["I loved this film, it was wonderful.", "Terrible.", "The plot was fine but the acting was wooden."]
LONG = " ".join(["word"] * 100)  # over the tiny models' 64 tokens


def _dirs() -> dict[str, str]:
    return {
        "text-classification": tiny_encoders.tiny_encoder_dir("bert", "sequence-classification"),
        "token-classification": tiny_encoders.tiny_encoder_dir("bert", "token-classification"),
        "zero-shot-classification": tiny_encoders.tiny_encoder_dir("bert", "sequence-classification", "nli"),
        "fill-mask": tiny_encoders.tiny_encoder_dir("roberta", "masked-lm"),
        "question-answering": tiny_encoders.tiny_encoder_dir("bert", "question-answering"),
        "sentence-similarity": tiny_encoders.tiny_encoder_dir("bert", "base"),
    }


@pytest.fixture(scope="module")
def served(llama_dir):
    specs = [f"{task}={d}" for task, d in _dirs().items()]
    return load_pipelines(["feature-extraction", *specs, f"text-generation={llama_dir}"], dtype="float32")


@pytest.fixture(scope="module")
def server(served):
    s = ServerThread(create_app(None, pipelines=served)).start()
    s.app = s.server.config.app
    yield s
    s.stop()


@pytest.fixture(scope="module")
def refs(llama_dir):
    """The same pipelines, loaded again: what the routes must answer."""
    out = {task: pipeline(task, model=d) for task, d in _dirs().items()}
    out["feature-extraction"] = pipeline("feature-extraction", model=MINILM)
    out["text-generation"] = pipeline("text-generation", model=llama_dir, dtype="float32")
    return out


@pytest.fixture
def client(server):
    with httpx.Client(base_url=server.url, timeout=60) as c:
        yield c


def assert_close(got, want, path="result"):
    """Same structure, strings and ints; floats within 1e-5."""
    if isinstance(want, float):
        assert got == pytest.approx(want, abs=1e-5), path
    elif isinstance(want, (list, tuple)):
        assert isinstance(got, list) and len(got) == len(want), path
        for i, (g, w) in enumerate(zip(got, want)):
            assert_close(g, w, f"{path}[{i}]")
    elif isinstance(want, dict):
        assert isinstance(got, dict) and sorted(got) == sorted(want), path
        for k in want:
            assert_close(got[k], want[k], f"{path}.{k}")
    else:
        assert got == want, path


def _error(r: httpx.Response, status: int, param: str | None, *messages: str) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["param"] == param, err
    for m in messages:
        assert m in err["message"], err
    return err


def _counter(client, name: str, task: str) -> float:
    text = client.get("/metrics").text
    for line in text.splitlines():
        if line.startswith(f"tokenmill:{name}{{") and f'task="{task}"' in line:
            return float(line.split()[-1])
    return 0.0


# -- /v1/embeddings ----------------------------------------------------------------


def test_embeddings_with_the_openai_client(server, refs):
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
    ref = refs["feature-extraction"]
    want = ref(TEXTS, pooling="mean", normalize=True)  # MiniLM's own pooling and normalization
    # the client asks for base64 unless told otherwise, and decodes it
    for fmt in ({}, {"encoding_format": "float"}):
        res = client.embeddings.create(model=MINILM, input=TEXTS, **fmt)
        assert res.model == MINILM and res.object == "list"
        assert [d.index for d in res.data] == [0, 1, 2]
        for d, w in zip(res.data, want):
            assert len(d.embedding) == 384
            assert d.embedding == pytest.approx(w, abs=1e-5)
        tokens = sum(len(ref.encode(t).ids) for t in TEXTS)
        assert res.usage.prompt_tokens == tokens and res.usage.total_tokens == tokens
    one = client.embeddings.create(model=MINILM, input=TEXTS[1], dimensions=384)
    assert len(one.data) == 1 and one.data[0].embedding == pytest.approx(want[1], abs=1e-5)
    with pytest.raises(openai.BadRequestError) as e:
        client.embeddings.create(model=MINILM, input="x", dimensions=128)
    assert "makes 384-dimensional embeddings and cannot shorten them" in str(e.value)
    with pytest.raises(openai.NotFoundError):
        client.embeddings.create(model="text-embedding-3-small", input="x")


def test_embeddings_of_token_ids_equal_those_of_the_text(client, refs):
    ref = refs["feature-extraction"]
    ids = [ref.encode(t).ids for t in TEXTS[:2]]
    by_text = client.post("/v1/embeddings", json={"input": TEXTS[:2]}).json()  # model left out: the only one
    by_ids = client.post("/v1/embeddings", json={"input": ids, "model": MINILM}).json()
    one = client.post("/v1/embeddings", json={"input": ids[0]}).json()
    assert by_ids["usage"] == by_text["usage"]
    for a, b in zip(by_ids["data"], by_text["data"]):
        assert a["embedding"] == pytest.approx(b["embedding"], abs=1e-5)
    assert len(one["data"]) == 1 and one["data"][0]["embedding"] == pytest.approx(
        by_text["data"][0]["embedding"], abs=1e-5
    )


def test_embedding_errors_name_the_field(client):
    long = " ".join(["word"] * 600)  # MiniLM takes 512 tokens
    cases = [
        ({"input": "x", "model": "other"}, 404, "model", "the model 'other' does not exist"),
        (
            {"input": "x", "encoding_format": "hex"},
            400,
            "encoding_format",
            "encoding_format must be 'float' or 'base64'",
        ),
        ({"input": "x", "dimensions": 100}, 400, "dimensions", "makes 384-dimensional embeddings"),
        ({"input": []}, 400, "input", "input must not be an empty list"),
        ({"input": ""}, 400, "input", "input 0 is an empty string"),
        ({"input": ["a", "  "]}, 400, "input", "input 1 is an empty string"),
        ({"input": [[]]}, 400, "input", "input 0 is an empty list of token ids"),
        ({"input": [101, 99999999]}, 400, "input", "token id 99999999 is outside the vocabulary [0, 30522)"),
        ({"input": [101] * 600}, 400, "input", "input 0 is 600 tokens long, over this model's limit of 512"),
        ({"input": ["a", 5]}, 400, "input", "must be a string"),
        ({"input": 5}, 400, "input", "must be a string"),
        ({"input": {"a": 1}}, 400, "input", "must be a string"),
        ({}, 400, "input", "'input' is required"),
        ({"input": "x", "truncation": "yes"}, 400, "truncation", "invalid value for 'truncation'"),
        ({"input": ["ok", long]}, 400, "input", "input 1 is 602 tokens long, over this model's limit of 512"),
    ]
    for body, status, param, message in cases:
        _error(client.post("/v1/embeddings", json=body), status, param, message)
    r = client.post("/v1/embeddings", content=b"{not json")
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
    r = client.post("/v1/embeddings", json={"input": ["ok", long], "truncation": True})
    assert r.status_code == 200 and r.json()["usage"]["prompt_tokens"] == 3 + 512


# -- /v1/pipelines/{task} ----------------------------------------------------------

CASES = [
    ("text-classification", TEXTS[0], {}),
    ("text-classification", TEXTS, {"top_k": 2}),
    (
        "text-classification",
        {"text": "A man eats.", "text_pair": "Someone eats."},
        {"function_to_apply": "none"},
    ),
    ("sentiment-analysis", TEXTS[:2], {}),
    ("token-classification", "Angela Merkel lives in Berlin.", {}),
    ("ner", ["Angela Merkel lives in Berlin.", "Paris"], {"aggregation_strategy": "simple"}),
    ("zero-shot-classification", TEXTS[0], {"candidate_labels": ["film", "sport"]}),
    ("zero-shot-classification", TEXTS[:2], {"candidate_labels": "film,sport,music", "multi_label": True}),
    ("fill-mask", "Paris is the <mask> of France.", {"top_k": 3}),
    ("fill-mask", ["A <mask> day.", "The <mask> is <mask>."], {}),
    ("question-answering", {"question": "Where is Paris?", "context": "Paris is in France."}, {}),
    ("question-answering", [{"question": "Who?", "context": "Ann met Bob."}] * 2, {"top_k": 2}),
    ("feature-extraction", "Hello world.", {}),
    ("feature-extraction", ["Hello world.", "Hi"], {"pooling": "cls"}),
    (
        "sentence-similarity",
        {"source_sentence": "A man eats.", "sentences": ["A man is eating.", "Rain."]},
        {},
    ),
    ("text-generation", "Hello", {"max_new_tokens": 4, "do_sample": False}),
]


@pytest.mark.parametrize(("task", "inputs", "params"), CASES)
def test_pipeline_outputs_equal_direct_calls(client, refs, task, inputs, params):
    r = client.post(f"/v1/pipelines/{task}", json={"inputs": inputs, "parameters": params})
    assert r.status_code == 200, r.text
    from tokenmill.pipelines.registry import resolve_task

    assert_close(r.json(), refs[resolve_task(task)[0].name](inputs, **params))


def test_pipeline_route_errors(client):
    r = client.post("/v1/pipelines/text-clasification", json={"inputs": "x"})
    err = _error(r, 404, None, "unknown task 'text-clasification'; this server serves: ")
    assert err["code"] == "task_not_found" and "text-classification" in err["message"]
    r = client.post("/v1/pipelines/summarization", json={"inputs": "x"})
    err = _error(r, 404, None, "the task 'summarization' is not served here", "--task summarization=MODEL")
    assert err["code"] == "task_not_served"
    url = "/v1/pipelines/text-classification"
    cases = [
        ({}, 400, "inputs", "'inputs' is required"),
        ({"inputs": "x", "parameters": [1]}, 400, "parameters", "invalid value for 'parameters'"),
        (
            {"inputs": "x", "parameters": {"topk": 2}},
            400,
            "parameters",
            "text-classification got unknown option(s) 'topk'",
        ),
        ({"inputs": "x", "parameters": {"top_k": 0}}, 400, "parameters", "top_k must be a positive integer"),
        ({"inputs": 5}, 400, "inputs", "input 0 must be a string"),
        ({"inputs": []}, 400, "inputs", "empty list of inputs"),
        ({"inputs": ["ok", ""]}, 400, "inputs", "input 1 is an empty string"),
        (
            {"inputs": ["ok", LONG]},
            400,
            "inputs",
            "input 1 is 102 tokens long, over this model's limit of 64",
        ),
        ({"inputs": ["x"] * 2049}, 400, "inputs", "at most 2048 per request"),
        (
            {"inputs": "x", "parameters": {"return_tensors": True}},
            400,
            "parameters.return_tensors",
            "cannot be sent as JSON",
        ),
        (
            {"inputs": "x", "parameters": {"filters": "none"}},
            400,
            "parameters.filters",
            "set by the server operator (tokenmill serve --filters FILE)",
        ),
        (
            {"inputs": "x", "parameters": {"inputs": "y"}},
            400,
            "parameters",
            "text-classification cannot take these",
        ),
        (
            {"inputs": "x", "model": "other"},
            404,
            "model",
            "the model 'other' does not exist; task 'text-classification' is served by",
        ),
    ]
    for body, status, param, message in cases:
        _error(client.post(url, json=body), status, param, message)
    r = client.post(url, json={"inputs": ["ok", LONG], "parameters": {"truncation": True}})
    assert r.status_code == 200 and len(r.json()) == 2


ODD_INPUTS = [None, 5, 1.5, True, [], {}, [[]], [None], {"a": 1}, "", ["x", 3], [["a", "b"]], {"text": 5}]
ODD_PARAMS = [
    {"top_k": "x"},
    {"top_k": -1},
    {"truncation": "yes"},
    {"batch_size": 0},
    {"candidate_labels": 5},
    {"candidate_labels": []},
    {"aggregation_strategy": 3},
    {"pooling": "none", "normalize": "x"},
    {"max_new_tokens": -1},
    {"targets": 5},
    {"question": 3},
]


def test_odd_inputs_and_parameters_are_400_never_500(client, served):
    bad = []
    for task in served.served_tasks():
        fine = CASES[[c[0] for c in CASES].index(task)]
        for inputs in ODD_INPUTS:
            r = client.post(f"/v1/pipelines/{task}", json={"inputs": inputs, "parameters": fine[2]})
            if r.status_code not in (200, 400):
                bad.append((task, inputs, r.status_code, r.text[:200]))
        for params in ODD_PARAMS:
            r = client.post(f"/v1/pipelines/{task}", json={"inputs": fine[1], "parameters": params})
            if r.status_code not in (200, 400):
                bad.append((task, params, r.status_code, r.text[:200]))
    assert not bad, "\n".join(map(str, bad))


# -- batching ----------------------------------------------------------------------


def _together(server, client, requests: list[tuple[str, dict]]) -> list[httpx.Response]:
    """Send ``requests`` while the pipelines' worker is held, so that all of them wait, then release it."""
    ps: PipelineSet = server.app.state.pipelines
    release, held_now = threading.Event(), threading.Event()

    async def hold() -> None:
        async with ps.worker.lock:
            held_now.set()
            await asyncio.get_running_loop().run_in_executor(None, release.wait)

    held = asyncio.run_coroutine_threadsafe(hold(), server.loop)
    assert held_now.wait(10)
    end = time.monotonic() + 10
    tasks = {
        "feature-extraction" if path == "/v1/embeddings" else path.split("/")[-1] for path, _ in requests
    }
    batchers = [sp.batcher for t in tasks for sp in ps.models_for(t)[1].values()]
    with concurrent.futures.ThreadPoolExecutor(len(requests)) as pool:
        try:
            futures = [pool.submit(client.post, path, json=body) for path, body in requests]
            while sum(len(b.pending) for b in batchers) < len(requests):
                assert time.monotonic() < end, "the requests did not all arrive"
                time.sleep(0.005)
        finally:
            release.set()
        held.result(10)
        return [f.result() for f in futures]


def test_requests_arriving_together_run_as_one_call(server, client, refs):
    url = "/v1/pipelines/text-classification"
    inputs = [
        TEXTS[0],
        TEXTS,
        TEXTS[1:],
        {"text": "A man eats.", "text_pair": "He eats."},
        "Fine.",
        ["Good."],
    ] * 2
    requests = [(url, {"inputs": x, "parameters": {"top_k": 2}}) for x in inputs]
    requests.append((url, {"inputs": ["ok", ""], "parameters": {"top_k": 2}}))  # fails its checks alone
    calls, seen = (
        _counter(client, "pipeline_batches_total", "text-classification"),
        _counter(client, "pipeline_requests_total", "text-classification"),
    )
    responses = _together(server, client, requests)
    assert _counter(client, "pipeline_batches_total", "text-classification") == calls + 1
    assert _counter(client, "pipeline_requests_total", "text-classification") == seen + len(requests)
    for x, r in zip(inputs, responses):
        assert r.status_code == 200, r.text
        assert_close(r.json(), refs["text-classification"](x, top_k=2))
    _error(responses[-1], 400, "inputs", "input 1 is an empty string")


def test_concurrent_clients_share_pipeline_calls(client, refs):
    url = "/v1/pipelines/token-classification"
    texts = [f"Angela Merkel met {name} in Berlin." for name in ("Bob", "Ann", "Joe", "Eve")] * 4
    calls = _counter(client, "pipeline_batches_total", "token-classification")
    with concurrent.futures.ThreadPoolExecutor(len(texts)) as pool:
        responses = list(pool.map(lambda t: client.post(url, json={"inputs": t}), texts))
    # typically 2 calls: the first request's, and one for all that came while it ran
    assert _counter(client, "pipeline_batches_total", "token-classification") - calls < len(texts)
    for t, r in zip(texts, responses):
        assert_close(r.json(), refs["token-classification"](t))


def test_only_requests_with_the_same_parameters_merge(server, client, refs):
    url = "/v1/pipelines/text-classification"
    requests = [(url, {"inputs": TEXTS[k % 3], "parameters": {"top_k": 1 + k % 2}}) for k in range(8)]
    requests += [("/v1/embeddings", {"input": TEXTS[k % 3]}) for k in range(4)]
    calls = _counter(client, "pipeline_batches_total", "text-classification")
    embed_calls = _counter(client, "pipeline_batches_total", "feature-extraction")
    responses = _together(server, client, requests)
    assert _counter(client, "pipeline_batches_total", "text-classification") == calls + 2
    assert _counter(client, "pipeline_batches_total", "feature-extraction") == embed_calls + 1
    for (_, body), r in zip(requests[:8], responses):
        assert_close(r.json(), refs["text-classification"](body["inputs"], **body["parameters"]))
    want = refs["feature-extraction"](TEXTS, pooling="mean", normalize=True)
    for k, r in enumerate(responses[8:]):
        assert r.json()["data"][0]["embedding"] == pytest.approx(want[k % 3], abs=1e-5)


def test_one_input_too_long_fails_only_its_request(server, client, refs):
    url = "/v1/pipelines/zero-shot-classification"
    params = {"candidate_labels": ["film", "sport"]}
    inputs = [TEXTS[0], [TEXTS[1], LONG], TEXTS[2:], TEXTS[1]]
    responses = _together(server, client, [(url, {"inputs": x, "parameters": params}) for x in inputs])
    _error(responses[1], 400, "inputs", "input 1 is")  # counted within its own request
    for k in (0, 2, 3):
        assert responses[k].status_code == 200, responses[k].text
        assert_close(responses[k].json(), refs["zero-shot-classification"](inputs[k], **params))


# -- the server's other routes with pipelines ------------------------------------------


def test_models_health_and_routes_of_a_pipelines_only_server(client, served):
    assert client.get("/health").json() == {"status": "ok"}
    cards = {c["id"]: c for c in client.get("/v1/models").json()["data"]}
    assert cards[MINILM]["tasks"] == ["feature-extraction"]
    assert len(cards) == len(served.served_tasks())
    assert client.get(f"/v1/models/{MINILM}").json()["tasks"] == ["feature-extraction"]
    _error(client.get("/v1/models/other"), 404, "model", "the model 'other' does not exist")
    r = client.post("/v1/completions", json={"prompt": "Hi"})
    _error(r, 404, "model", "this server serves no text-generation model; start it with --model MODEL")


def test_a_server_with_an_engine_and_pipelines(long_dir, refs):
    ps = PipelineSet([("text-classification", "cls", refs["text-classification"])])
    app = create_app(make_engine(long_dir), pipelines=ps, served_model_name="tiny-llama")
    s = ServerThread(app).start()
    try:
        with httpx.Client(base_url=s.url, timeout=60) as c:
            cards = c.get("/v1/models").json()["data"]
            assert [card["id"] for card in cards] == ["tiny-llama", "cls"]
            assert cards[0]["max_model_len"] == LONG_CONTEXT and cards[1]["tasks"] == ["text-classification"]
            r = c.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 3})
            assert r.status_code == 200 and r.json()["model"] == "tiny-llama"
            r = c.post("/v1/pipelines/text-classification", json={"inputs": "Good."})
            assert r.status_code == 200
            assert_close(r.json(), refs["text-classification"]("Good."))
            r = c.post("/v1/embeddings", json={"input": "x"})
            _error(
                r, 404, "model", "serves no embedding model; start it with --task feature-extraction=MODEL"
            )
            text = c.get("/metrics").text
            assert "tokenmill:pipeline_batches_total" in text and "tokenmill:generation_tokens_total" in text
    finally:
        s.stop()


# -- tokenmill serve --task ----------------------------------------------------------


def test_bad_task_flags_exit_2_with_one_line(capsys):
    cases = [
        (["--task", "nosuch"], "--task 'nosuch': unknown task 'nosuch'"),
        (
            ["--task", "fill-mask"],
            "--task 'fill-mask': fill-mask has no default model in tokenmill; use --task fill-mask=MODEL",
        ),
        (["--task", "ner="], "--task 'ner=': give a model after '='"),
        (["--task", "feature-extraction", "--task", f"feature-extraction={MINILM}"], "is given twice"),
        (
            ["--task", "feature-extraction", "--served-model-name", "x"],
            "--served-model-name names the --model's model",
        ),
        (["--task", "fill-mask=/no/such/dir"], "model path '/no/such/dir' does not exist"),
    ]
    for args, message in cases:
        assert main(["serve", *args, "--port", "0"]) == 2
        err = capsys.readouterr().err
        assert err.startswith("tokenmill serve: error: ") and message in err, err


def test_serve_task_as_a_process():
    d = tiny_encoders.tiny_encoder_dir("bert", "base")
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    env.pop("TOKENMILL_API_KEY", None)
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tokenmill.cli.main",
            "serve",
            "--task",
            f"feature-extraction={d}",
            "--port",
            "0",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(x) for x in proc.stderr], daemon=True).start()
    try:
        url, end = None, time.monotonic() + 60
        while url is None:
            line = lines.get(timeout=max(0.1, end - time.monotonic()))
            m = re.search(r"tokenmill serving pipelines feature-extraction=(\S+) at (http://\S+)", line)
            url = m and m.group(2)
        r = httpx.post(f"{url}/v1/embeddings", json={"input": ["Hello world."], "model": d})
        assert r.status_code == 200, r.text
        want = pipeline("feature-extraction", model=d)("Hello world.", pooling="mean")
        assert r.json()["data"][0]["embedding"] == pytest.approx(want, abs=1e-5)  # no pooling config: mean
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
