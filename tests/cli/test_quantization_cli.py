"""--quantization on every model command, the `perplexity` subcommand, and their errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

import tiny
from tokenmill import LLM
from tokenmill.cli.main import build_parser


def _run(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    return subprocess.run(
        [sys.executable, "-m", "tokenmill.cli.main", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )


@pytest.fixture(scope="module")
def model_dir(tiny_root):
    return tiny.save_tiny_dir("llama", tiny_root)


@pytest.mark.parametrize("command", [["generate", "Hi"], ["chat"], ["serve"], ["perplexity"]])
def test_every_model_command_takes_quantization(command):
    args = build_parser().parse_args([*command, "--quantization", "int4"])
    assert args.quantization == "int4"
    assert build_parser().parse_args(command).quantization == "none"


def test_serve_passes_quantization_to_the_engine():
    from tokenmill.server.launcher import engine_config

    args = build_parser().parse_args(["serve", "--quantization", "int8"])
    assert engine_config(args).quantization == "int8"
    args = build_parser().parse_args(["serve"])
    assert engine_config(args).quantization is None


def test_bad_quantization_values_are_named():
    res = _run("generate", "Hi", "--quantization", "int3")
    assert res.returncode == 2
    assert "argument --quantization: invalid choice: 'int3' (choose from" in res.stderr
    with pytest.raises(
        ValueError,
        match=r"quantization must be one of 'int8', 'int4', 'w4a8', 'w8a8', 'gguf' or None \('none'\), got 'fp8'",
    ):
        LLM("/no/such/model", quantization="fp8")  # checked before anything loads
    from tokenmill.generation.engine import EngineConfig

    with pytest.raises(
        ValueError,
        match=r"quantization must be one of 'int8', 'int4', 'w4a8', 'w8a8', 'gguf' or None \('none'\), got 'q4'",
    ):
        EngineConfig(quantization="q4")


def test_perplexity_prints_tokens_and_perplexity(model_dir, tmp_path):
    text = tmp_path / "text.txt"
    text.write_text("The capital of France is Paris. The capital of Italy is Rome. " * 8, encoding="utf-8")
    res = _run(
        "perplexity",
        "--model",
        model_dir,
        "--dtype",
        "float32",
        "--file",
        str(text),
        "--window",
        "32",
        "--json",
    )
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert out["quantization"] == "none" and out["window"] == 32 and out["stride"] == 16
    assert out["tokens"] > 32 and 1 < out["perplexity"] < 1e4
    # the default text, int8, bounded to 64 tokens, plain output
    res = _run(
        "perplexity", "--model", model_dir, "--quantization", "int8", "--max-tokens", "64", "--window", "32"
    )
    assert res.returncode == 0, res.stderr
    assert "quantization: int8" in res.stdout and "tokens: 63" in res.stdout and "perplexity: " in res.stdout


def test_perplexity_errors_are_one_line(model_dir, tmp_path):
    res = _run("perplexity", "--model", model_dir, "--file", str(tmp_path / "missing.txt"))
    assert (
        res.returncode == 2 and "cannot be read as UTF-8 text" in res.stderr and "Traceback" not in res.stderr
    )
    res = _run("perplexity", "--model", model_dir, "--window", "100000")
    assert res.returncode == 2 and "window must be an integer in [2, 256]" in res.stderr


def test_gguf_quantization_of_a_safetensors_model_is_one_line(model_dir):
    assert build_parser().parse_args(["generate", "Hi", "--quantization", "gguf"]).quantization == "gguf"
    res = _run("generate", "Hi", "--model", model_dir, "--quantization", "gguf")
    assert res.returncode != 0 and "Traceback" not in res.stderr
    assert "holds safetensors weights, and quantization 'gguf' keeps the precision" in res.stderr
    assert "pick int8, int4, w4a8 or w8a8" in res.stderr
