"""Fixtures of the browser tests: one `tokenmill serve` for the session, one Chromium per test.

The server runs the tiny Llama (its context widened to 4096 positions so a stream can run
for seconds), tiny random text-classification and ViT image-classification pipelines, the
feedback store in a SQLite file, and an API key. Speech recognition gets a server of its
own (test_audio.py): real Whisper weights load only for the test that needs them.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator

import httpx
import pytest

import tiny
from browser_util import API_KEY, Page, Server, browser_missing, page_on

_missing = browser_missing()
if _missing:
    pytest.skip(f"browser tests need a headless Chromium: {_missing}", allow_module_level=True)


@pytest.fixture(scope="session")
def llm_dir(tmp_path_factory) -> str:
    d = tiny.save_tiny_dir("llama", str(tmp_path_factory.mktemp("browser-model")))
    path = os.path.join(d, "config.json")
    with open(path) as f:
        cfg = json.load(f)
    cfg["max_position_embeddings"] = 4096
    with open(path, "w") as f:
        json.dump(cfg, f)
    return d


@pytest.fixture(scope="session")
def served(llm_dir, tmp_path_factory) -> Iterator[dict]:
    import tiny_encoders
    import tiny_vit

    classifier = tiny_encoders.tiny_encoder_dir("bert", "sequence-classification")
    vit = tiny_vit.tiny_vit_dir()
    db = tmp_path_factory.mktemp("feedback") / "feedback.db"
    args = [
        "--model", llm_dir, "--served-model-name", "tiny-llama", "--dtype", "float32", "--device", "cpu",
        "--kv-cache-memory", "64MiB",
        "--task", f"text-classification={classifier}",
        "--task", f"image-classification={vit}",
        "--feedback-db", str(db),
    ]  # fmt: skip
    server = Server(*args, api_key=API_KEY)
    try:
        yield {"url": server.url, "db": db, "server": server, "classifier": classifier, "vit": vit}
    finally:
        server.stop()
        log = server.drain_log()
        assert "Traceback" not in log, log


@pytest.fixture
def api(served) -> Iterator[httpx.Client]:
    """The same server over plain HTTP: the reference the page is compared with."""
    with httpx.Client(
        base_url=served["url"], headers={"Authorization": f"Bearer {API_KEY}"}, timeout=120
    ) as c:
        yield c


@pytest.fixture
def page(served, tmp_path) -> Iterator[Page]:
    """A page whose tab already holds the API key (as after the user typed it once)."""
    yield from page_on(served["url"], tmp_path, api_key=API_KEY)


@pytest.fixture
def fresh_page(served, tmp_path) -> Iterator[Page]:
    """A page in a new tab: the API key has not been given yet."""
    yield from page_on(served["url"], tmp_path)


@pytest.fixture
def narrow_page(served, tmp_path) -> Iterator[Page]:
    """A phone-sized window."""
    yield from page_on(served["url"], tmp_path, api_key=API_KEY, size=(390, 844))
