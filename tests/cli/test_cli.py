"""The `tokenmill` command, run as a user runs it."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

import tiny
from tokenmill import LLM, BeamSearchParams, SamplingParams


def _run(*args: str, stdin: str | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    return subprocess.run(
        [sys.executable, "-m", "tokenmill.cli.main", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )


@pytest.fixture(scope="module")
def model_dir(tiny_root):
    return tiny.save_tiny_dir("llama", tiny_root)


def test_help_does_not_import_torch():
    code = "import sys; from tokenmill.cli.main import build_parser; build_parser(); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
    res = _run("--help")
    assert res.returncode == 0 and "generate" in res.stdout and "chat" in res.stdout


def test_generate_json_matches_the_python_api(model_dir):
    res = _run(
        "generate", "The capital", "--model", model_dir, "--dtype", "float32", "--max-tokens", "8", "--json"
    )
    assert res.returncode == 0, res.stderr
    data = json.loads(res.stdout)
    ref = LLM(model_dir, dtype="float32").generate(
        "The capital", SamplingParams(temperature=0, max_tokens=8)
    )[0]
    assert data["outputs"][0]["token_ids"] == ref.outputs[0].token_ids
    assert data["outputs"][0]["text"] == ref.outputs[0].text
    assert data["metrics"]["ttft_s"] > 0


def test_generate_streams_and_prints_stats(model_dir):
    res = _run(
        "generate", "Hello", "--model", model_dir, "--dtype", "float32", "--max-tokens", "5", "--stats"
    )
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("Hello")
    for label in ("time to first token", "time per output token", "prefill", "decode", "peak memory"):
        assert label in res.stderr


def test_generate_beams(model_dir):
    res = _run(
        "generate",
        "Hello",
        "--model",
        model_dir,
        "--dtype",
        "float32",
        "--max-tokens",
        "6",
        "--beams",
        "3",
        "--json",
    )
    assert res.returncode == 0, res.stderr
    data = json.loads(res.stdout)
    ref = LLM(model_dir, dtype="float32").beam_search("Hello", BeamSearchParams(beam_width=3, max_tokens=6))[
        0
    ]
    assert [s["token_ids"] for s in data["sequences"]] == [h.token_ids for h in ref.sequences]


def test_bad_values_give_one_clear_line(model_dir):
    res = _run("generate", "Hi", "--model", model_dir, "--top-p", "1.5")
    assert res.returncode == 2
    assert "top_p must be in (0.0, 1.0], got 1.5" in res.stderr
    assert "Traceback" not in res.stderr
    res = _run("generate", "Hi", "--model", "/no/such/model.gguf")
    assert res.returncode == 2 and "does not exist" in res.stderr and "Traceback" not in res.stderr
    res = _run("generate", "Hi", "--model", "no-such-short-name")
    assert res.returncode == 2 and "unknown model 'no-such-short-name'" in res.stderr


def test_uncached_hub_model_offline_says_how_to_get_it(tmp_path):
    env_cache = {"HF_HUB_CACHE": str(tmp_path)}
    res = subprocess.run(
        [sys.executable, "-m", "tokenmill.cli.main", "generate", "Hi", "--model", "someorg/some-model"],
        capture_output=True,
        text=True,
        timeout=120,
        env=dict(os.environ, HF_HUB_OFFLINE="1", **env_cache),
    )
    assert res.returncode == 2
    assert "not in the local Hugging Face cache" in res.stderr and "Traceback" not in res.stderr


def test_chat_keeps_the_conversation(model_dir):
    res = _run(
        "chat",
        "--model",
        model_dir,
        "--dtype",
        "float32",
        "--max-tokens",
        "4",
        "--system",
        "Be brief.",
        stdin="hi\nagain\n/exit\n",
    )
    assert res.returncode == 0, res.stderr
    replies = res.stdout.splitlines()
    llm = LLM(model_dir, dtype="float32")
    params = SamplingParams(temperature=0, max_tokens=4)
    history = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
    first = llm.generate(llm.format_chat(history), params)[0].outputs[0].text
    history += [{"role": "assistant", "content": first}, {"role": "user", "content": "again"}]
    second = llm.generate(llm.format_chat(history), params)[0].outputs[0].text
    assert "\n".join(replies) == f"{first}\n{second}"


def test_models_lists_packaged_models():
    res = _run("models", "--json")
    assert res.returncode == 0, res.stderr
    names = [m["name"] for m in json.loads(res.stdout)["packaged"]]
    assert "smollm2-135m-instruct" in names and "gemma3-270m" in names


def test_chat_survives_a_turn_that_does_not_fit(model_dir):
    too_long = " ".join(["word"] * 400)  # beyond the tiny model's 256-token context
    res = _run(
        "chat", "--model", model_dir, "--dtype", "float32", "--max-tokens", "4", stdin=f"{too_long}\nhi\n"
    )
    assert res.returncode == 0, res.stderr
    assert "beyond the model's context" in res.stderr or "context holds 256" in res.stderr
    assert "/reset" in res.stderr
    llm = LLM(model_dir, dtype="float32")
    reply = llm.generate(
        llm.format_chat([{"role": "user", "content": "hi"}]), SamplingParams(temperature=0, max_tokens=4)
    )
    assert res.stdout.strip() == reply[0].outputs[0].text.strip()


def test_beam_search_flags_are_checked(model_dir):
    res = _run("generate", "Hi", "--model", model_dir, "--beams", "0")
    assert res.returncode == 2 and "beam_width must be an integer >= 1, got 0" in res.stderr
    res = _run("generate", "Hi", "--model", model_dir, "--beams", "2", "--seed", "1", "--top-p", "0.5")
    assert res.returncode == 2 and "beam search does not use --top-p, --seed" in res.stderr
