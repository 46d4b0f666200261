"""Model directories of safetensors: single-file and sharded checkpoints load and agree with
transformers; every broken directory is an error whose message names what is wrong."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch

import tiny
from tokenmill.layers.attention import DenseAttention
from tokenmill.weights.errors import ModelLoadError
from tokenmill.weights.model_loader import load_model
from tokenmill.weights.safetensors_dir import INDEX, SINGLE, safetensors_files


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> str:
    """A complete tiny Llama directory; tests copy it before breaking it."""
    return tiny.save_tiny_dir("llama", str(tmp_path_factory.mktemp("st")))


@pytest.fixture
def model_dir(tiny_dir, tmp_path) -> str:
    return shutil.copytree(tiny_dir, tmp_path / "llama")


def _load(path) -> object:
    return load_model(os.fspath(path), dtype="float32", device="cpu")


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    B, T = ids.shape
    with torch.no_grad():
        return model(ids, torch.arange(T).expand(B, T), DenseAttention(None, 0, T, T - 1), None)  # (B, T, V)


IDS = torch.randint(0, tiny.VOCAB, (2, 16), generator=torch.Generator().manual_seed(1))


def test_tiny_dir_loads_and_matches_transformers(tiny_dir):
    loaded = _load(tiny_dir)
    assert loaded.source == tiny_dir
    assert loaded.config.architecture == "llama"
    assert loaded.tokenizer.encode("The capital of France", add_special_tokens=False)
    assert 1 in loaded.config.eos_token_ids  # config.json's eos id
    assert len(loaded.report.loaded) == len(tiny.hf_model("llama").state_dict())
    with torch.no_grad():
        ref = tiny.hf_model("llama")(IDS).logits
    torch.testing.assert_close(_logits(loaded.model, IDS), ref, atol=1e-4, rtol=0)


@pytest.fixture
def sharded_dir(tiny_dir, tmp_path) -> str:
    """The same model saved in shards of at most 20 KB, with model.safetensors.index.json."""
    d = shutil.copytree(tiny_dir, tmp_path / "sharded")
    os.remove(os.path.join(d, SINGLE))
    hf = tiny.hf_model("llama")
    hf.config.bos_token_id, hf.config.eos_token_id, hf.config.pad_token_id = 0, 1, 2
    hf.save_pretrained(d, max_shard_size="20KB")
    return d


def test_sharded_checkpoint_equals_unsharded(tiny_dir, sharded_dir):
    files = safetensors_files(sharded_dir)
    assert os.path.isfile(os.path.join(sharded_dir, INDEX)) and len(files) > 2
    one, many = _load(tiny_dir), _load(sharded_dir)
    assert sorted(one.report.loaded) == sorted(many.report.loaded)
    for (name, a), (_, b) in zip(one.model.state_dict().items(), many.model.state_dict().items()):
        assert torch.equal(a, b), name
    assert torch.equal(_logits(one.model, IDS), _logits(many.model, IDS))


def test_index_naming_missing_shard(sharded_dir):
    shard = os.path.basename(safetensors_files(sharded_dir)[1])
    os.remove(os.path.join(sharded_dir, shard))
    with pytest.raises(ModelLoadError, match="names shard\\(s\\) that are not in") as e:
        _load(sharded_dir)
    assert shard in str(e.value) and "download the complete checkpoint" in str(e.value)


def test_invalid_index(sharded_dir):
    with open(os.path.join(sharded_dir, INDEX), "w") as f:
        json.dump({"metadata": {}}, f)
    with pytest.raises(ModelLoadError, match="model.safetensors.index.json is not a valid safetensors index"):
        _load(sharded_dir)


@pytest.mark.parametrize("how", ["half", "header", "junk", "empty"])
def test_corrupt_safetensors_names_file(model_dir, how):
    path = os.path.join(model_dir, SINGLE)
    with open(path, "rb") as f:
        data = f.read()
    broken = {"half": data[: len(data) // 2], "header": data[:5], "junk": os.urandom(999), "empty": b""}[how]
    with open(path, "wb") as f:
        f.write(broken)
    with pytest.raises(ModelLoadError, match="is not a readable safetensors file") as e:
        _load(model_dir)
    assert path in str(e.value)


def test_corrupt_shard_names_it(sharded_dir):
    path = safetensors_files(sharded_dir)[-1]
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)
    with pytest.raises(ModelLoadError, match="is not a readable safetensors file") as e:
        _load(sharded_dir)
    assert path in str(e.value)


def test_no_weights(model_dir):
    os.remove(os.path.join(model_dir, SINGLE))
    with pytest.raises(ModelLoadError, match=r"no weights in .*expected model\.safetensors or .*index\.json"):
        _load(model_dir)


def test_missing_config(model_dir):
    os.remove(os.path.join(model_dir, "config.json"))
    with pytest.raises(ModelLoadError, match="no config.json in") as e:
        _load(model_dir)
    assert str(model_dir) in str(e.value)


def test_bad_json_config(model_dir):
    with open(os.path.join(model_dir, "config.json"), "w") as f:
        f.write('{"model_type": "llama",')
    with pytest.raises(ModelLoadError, match=r"config\.json is not valid JSON"):
        _load(model_dir)


def _edit_config(model_dir, **changes) -> None:
    path = os.path.join(model_dir, "config.json")
    with open(path) as f:
        cfg = json.load(f)
    for key, value in changes.items():
        if value is None:
            cfg.pop(key)
        else:
            cfg[key] = value
    with open(path, "w") as f:
        json.dump(cfg, f)


def test_unknown_model_type_is_named_with_supported_list(model_dir):
    _edit_config(model_dir, model_type="bert")
    with pytest.raises(ValueError) as e:
        _load(model_dir)
    msg = str(e.value)
    assert "architecture 'bert' is not supported" in msg and "config.json" in msg
    for supported in ("gemma3", "gpt2", "llama", "mistral", "qwen2", "qwen3"):
        assert supported in msg


def test_missing_model_type(model_dir):
    _edit_config(model_dir, model_type=None)
    with pytest.raises(ModelLoadError, match=r"config\.json has no model_type"):
        _load(model_dir)


def _save_state_dict(model_dir, edit) -> None:
    from safetensors.torch import save_file

    sd = {k: v.contiguous() for k, v in tiny.hf_model("llama").state_dict().items()}
    edit(sd)
    save_file(sd, os.path.join(model_dir, SINGLE), metadata={"format": "pt"})


def test_missing_tensor_is_named(model_dir):
    _save_state_dict(model_dir, lambda sd: sd.pop("model.layers.1.mlp.down_proj.weight"))
    with pytest.raises(
        ModelLoadError, match=r"missing tensor\(s\) for model\.layers\.1\.mlp\.down_proj\.weight"
    ):
        _load(model_dir)


def test_missing_fused_shard_is_named(model_dir):
    _save_state_dict(model_dir, lambda sd: sd.pop("model.layers.0.self_attn.k_proj.weight"))
    with pytest.raises(
        ModelLoadError, match=r"missing tensor\(s\) for model\.layers\.0\.self_attn\.qkv_proj\.weight"
    ):
        _load(model_dir)


def test_unexpected_tensor_is_named(model_dir):
    def edit(sd):
        sd["model.layers.0.self_attn.extra.weight"] = torch.zeros(2, 2)

    _save_state_dict(model_dir, edit)
    with pytest.raises(
        ModelLoadError, match=r"unexpected tensor 'model\.layers\.0\.self_attn\.extra\.weight'"
    ):
        _load(model_dir)


@pytest.mark.parametrize(
    "name, shape, expected",
    [
        ("model.layers.0.self_attn.v_proj.weight", (32, 48), (32, 64)),
        ("model.layers.1.self_attn.q_proj.weight", (60, 64), (64, 64)),
        ("model.norm.weight", (65,), (64,)),
    ],
)
def test_wrong_shape_names_tensor_and_both_shapes(model_dir, name, shape, expected):
    def edit(sd):
        sd[name] = torch.zeros(shape)

    _save_state_dict(model_dir, edit)
    with pytest.raises(ModelLoadError) as e:
        _load(model_dir)
    assert str(e.value).endswith(f"tensor {name!r} has shape {shape}, the model expects {expected}")


def test_rotary_cache_in_checkpoint_is_ignored(model_dir):
    def edit(sd):
        sd["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(8)

    _save_state_dict(model_dir, edit)
    loaded = _load(model_dir)
    assert loaded.report.ignored == ["model.layers.0.self_attn.rotary_emb.inv_freq"]


def test_no_tokenizer_json(model_dir):
    os.remove(os.path.join(model_dir, "tokenizer.json"))
    with pytest.raises(
        ModelLoadError, match="no tokenizer.json in .*tokenmill needs the fast-tokenizer file"
    ):
        _load(model_dir)


def test_generation_config_eos_is_merged(tiny_dir, tmp_path):
    d = tiny.save_tiny_dir(
        "llama", str(tmp_path), generation_config={"eos_token_id": [1, 7], "temperature": 0.5}
    )
    loaded = _load(d)
    assert loaded.config.eos_token_ids[:2] == [1, 7]
    assert loaded.generation_defaults["temperature"] == 0.5
