"""Fixtures of the server tests: the tiny Llama served by a real uvicorn on 127.0.0.1.

The served model is the tiny Llama with its context widened to 4096 positions (same
weights; rotary embeddings need no table), so that a request can run for seconds and
a test can leave in the middle of it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator

import httpx
import pytest
from server_util import API_KEY, LONG_CONTEXT, MODEL, ServerThread, make_engine, serving

import tiny


@pytest.fixture(scope="session")
def long_dir(tmp_path_factory) -> str:
    d = tiny.save_tiny_dir("llama", str(tmp_path_factory.mktemp("server-model")))
    path = os.path.join(d, "config.json")
    with open(path) as f:
        cfg = json.load(f)
    cfg["max_position_embeddings"] = LONG_CONTEXT
    with open(path, "w") as f:
        json.dump(cfg, f)
    return d


@pytest.fixture(scope="session")
def server_engine(long_dir):
    return make_engine(long_dir, max_num_seqs=16)


@pytest.fixture(scope="session")
def server(server_engine) -> Iterator[ServerThread]:
    with serving(server_engine, served_model_name=MODEL, api_key=API_KEY) as s:
        yield s


@pytest.fixture
def client(server) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60) as c:
        yield c


@pytest.fixture(scope="session")
def ref_llm(long_dir):
    """The offline API on the same model: the reference for greedy outputs."""
    from tokenmill import LLM

    return LLM(long_dir, dtype="float32", device="cpu")
