"""Model resolution: Hub repo ids served from a fake local Hugging Face cache (never the network),
packaged short names, and the messages for names and paths that lead nowhere."""

from __future__ import annotations

import os
import shutil

import pytest

import tiny
from tokenmill.weights.errors import ModelLoadError
from tokenmill.weights.hub import cached_models, snapshot
from tokenmill.weights.model_loader import load_model, resolve_source
from tokenmill.weights.packaged import PACKAGED

MAIN = "a1" * 20  # commit hashes are 40 hex digits
TAGGED = "b2" * 20


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("hub-src")
    return {
        MAIN: tiny.save_tiny_dir("llama", str(root / "main")),
        TAGGED: tiny.save_tiny_dir("qwen2", str(root / "tagged")),
    }


def _fake_cache(root, tiny_dirs) -> str:
    """huggingface_hub's cache layout with plain files in the snapshots (no blobs or symlinks):
    refs/main and refs/v1 name two commits of org/name."""
    repo = root / "models--org--name"
    for commit, ref in ((MAIN, "main"), (TAGGED, "v1")):
        shutil.copytree(tiny_dirs[commit], repo / "snapshots" / commit)
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        (repo / "refs" / ref).write_text(commit)
    return os.fspath(root)


@pytest.fixture
def hub_cache(tmp_path, tiny_dirs, monkeypatch) -> str:
    """The fake cache in HF_HUB_CACHE, set after huggingface_hub was imported (it reads its
    environment at import), with HF_HUB_OFFLINE=1 so nothing can reach the network."""
    import huggingface_hub  # noqa: F401

    cache = _fake_cache(tmp_path / "hub", tiny_dirs)
    monkeypatch.setenv("HF_HUB_CACHE", cache)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache


def _snapshot_dir(cache: str, commit: str) -> str:
    return os.path.join(cache, "models--org--name", "snapshots", commit)


def test_repo_id_loads_from_cache(hub_cache):
    loaded = load_model("org/name", dtype="float32", device="cpu")
    assert os.path.samefile(loaded.source, _snapshot_dir(hub_cache, MAIN))
    assert loaded.config.architecture == "llama"


def test_revision_by_commit_hash(hub_cache):
    loaded = load_model("org/name", dtype="float32", device="cpu", revision=TAGGED)
    assert os.path.samefile(loaded.source, _snapshot_dir(hub_cache, TAGGED))
    assert loaded.config.architecture == "qwen2"


def test_revision_by_tag(hub_cache):
    assert os.path.samefile(resolve_source("org/name", "v1"), _snapshot_dir(hub_cache, TAGGED))
    assert os.path.samefile(resolve_source("org/name", "main"), _snapshot_dir(hub_cache, MAIN))


def test_explicit_cache_dir_wins_over_environment(hub_cache, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", os.fspath(tmp_path / "elsewhere"))
    assert os.path.samefile(snapshot("org/name", cache_dir=hub_cache), _snapshot_dir(hub_cache, MAIN))


def test_hf_home_locates_the_cache(tmp_path, tiny_dirs, monkeypatch):
    cache = _fake_cache(tmp_path / "home" / "hub", tiny_dirs)
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", os.fspath(tmp_path / "home"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert os.path.samefile(resolve_source("org/name"), _snapshot_dir(cache, MAIN))


def _assert_plain(msg: str) -> None:
    """One readable sentence for a person, not a Python error dump."""
    for noise in ("Traceback", "Error:", "local_files_only", "\n"):
        assert noise not in msg, msg


def test_uncached_repo_offline_says_how_to_get_it(hub_cache):
    with pytest.raises(ModelLoadError) as e:
        load_model("org/missing", dtype="float32", device="cpu")
    msg = str(e.value)
    assert msg.startswith("model org/missing is not in the local Hugging Face cache"), msg
    assert "HF_HUB_OFFLINE is set" in msg
    assert "download org/missing" in msg and "huggingface-cli download" in msg and "`hf download" in msg
    _assert_plain(msg)


def test_uncached_revision_offline_names_it(hub_cache):
    with pytest.raises(ModelLoadError) as e:
        resolve_source("org/name", "c3" * 20)
    msg = str(e.value)
    assert f"model org/name at revision {'c3' * 20!r} is not in the local Hugging Face cache" in msg
    assert f"download org/name --revision {'c3' * 20}" in msg
    _assert_plain(msg)


def test_cached_models_lists_fake_repo(hub_cache):
    models = cached_models()
    assert [name for name, _ in models] == ["org/name"]
    assert models[0][1] > 0
    assert cached_models(hub_cache) == models


def test_cached_models_without_cache_is_empty(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", os.fspath(tmp_path / "no-cache-here"))
    assert cached_models() == []


# -- short names and paths -------------------------------------------------------------------------------
@pytest.mark.real
def test_short_name_resolves_to_packaged_gguf():
    if not PACKAGED["smollm2-135m-instruct"].is_installed():
        pytest.skip(PACKAGED["smollm2-135m-instruct"].install)
    path = resolve_source("smollm2-135m-instruct")
    assert path.endswith(".gguf") and os.path.isfile(path)
    with open(path, "rb") as f:
        assert f.read(4) == b"GGUF"
    assert resolve_source(None) == path  # the default model


def test_unknown_name_lists_short_names():
    with pytest.raises(ModelLoadError) as e:
        resolve_source("no-such-model")
    msg = str(e.value)
    assert msg.startswith("unknown model 'no-such-model': give a short name ("), msg
    for name in PACKAGED:
        assert name in msg
    assert "a Hugging Face repo id like 'org/name'" in msg


def test_missing_gguf_path_does_not_exist(tmp_path):
    path = os.fspath(tmp_path / "nowhere" / "model.gguf")
    with pytest.raises(ModelLoadError, match="does not exist") as e:
        load_model(path, dtype="float32", device="cpu")
    assert str(e.value) == f"model path {path!r} does not exist"


def test_missing_bare_gguf_name_does_not_exist():
    with pytest.raises(ModelLoadError, match=r"model path 'model-q4\.gguf' does not exist"):
        resolve_source("model-q4.gguf")


def test_missing_nested_path_does_not_exist():
    with pytest.raises(ModelLoadError, match=r"model path 'models/llama/7b' does not exist"):
        resolve_source("models/llama/7b")


def test_existing_directory_wins_over_repo_id(tmp_path, tiny_dirs, monkeypatch):
    """A local directory spelled like a repo id is used as it is; the Hub is never asked."""
    monkeypatch.chdir(tmp_path)
    shutil.copytree(tiny_dirs[MAIN], tmp_path / "org" / "name")
    assert resolve_source("org/name") == "org/name"
