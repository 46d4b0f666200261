"""Whisper against transformers: the log-Mel front end, the model, greedy decoding, and
CTranslate2 model.bin files written here from the same weights.

Tiny random checkpoints from tests/tiny_whisper.py, fp32 on CPU: features within 1e-4 of
``WhisperFeatureExtractor``, encoder states and decoder logits within 1e-4, cached and
uncached decoding equal, 20 greedy tokens identical to ``generate()``; the decode step on
float16 weight copies (float16 checkpoints) against the same and against the float32 path.
"""

from __future__ import annotations

import json
import os
import shutil
import struct

import numpy as np
import pytest
import torch

import tiny_whisper as tw
from tokenmill.audio import FeatureConfig, WhisperFeatureExtractor, log_mel_spectrogram, mel_filter_bank
from tokenmill.models.whisper import greedy_decode, whisper_config_from_hf
from tokenmill.utils.errors import ModelLoadError
from tokenmill.weights.ctranslate2 import open_ct2_dir, read_model_bin
from tokenmill.weights.task_loader import load_task_model

transformers = pytest.importorskip("transformers")

ATOL = 1e-4
SR = 16_000


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny models: a second thread costs more in synchronisation than it saves."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _audio(seconds: float, seed: int) -> np.ndarray:
    """A chirp with noise: energy spread over many mel bins."""
    t = np.arange(int(seconds * SR)) / SR
    rng = np.random.default_rng(seed)
    tone = 0.3 * np.sin(2 * np.pi * (200 + 300 * t) * t) * np.sin(2 * np.pi * 0.7 * t)
    return (tone + 0.02 * rng.standard_normal(t.size)).astype(np.float32)


# --------------------------------------------------------------------------- features


@pytest.mark.parametrize("n_mels", [80, 128])
def test_mel_filter_bank_equals_transformers(n_mels):
    ref = transformers.WhisperFeatureExtractor(feature_size=n_mels).mel_filters
    torch.testing.assert_close(mel_filter_bank(n_mels), torch.from_numpy(ref).float(), atol=0, rtol=0)


@pytest.mark.parametrize("n_mels", [80, 128])
def test_features_equal_transformers(n_mels):
    ref = transformers.WhisperFeatureExtractor(feature_size=n_mels)
    ours = WhisperFeatureExtractor(FeatureConfig(n_mels=n_mels))
    short, long = _audio(3.2, 0), _audio(37.5, 1)  # padded with silence / truncated to 30 s
    for batch in ([short], [long], [short, long, _audio(0.5, 2)]):
        want = ref(batch, sampling_rate=SR, return_tensors="pt").input_features
        got = ours(batch, sampling_rate=SR)
        assert got.shape == (len(batch), n_mels, 3000)
        torch.testing.assert_close(got, want, atol=ATOL, rtol=0)
    # a single 1-D array is a batch of one
    torch.testing.assert_close(ours(short), ref(short, sampling_rate=SR, return_tensors="pt").input_features)


def test_log_mel_of_any_length_equals_transformers_unpadded():
    audio = _audio(45.3, 3)
    ref = transformers.WhisperFeatureExtractor(feature_size=80)
    want = ref(
        audio, sampling_rate=SR, padding="longest", truncation=False, return_tensors="pt"
    ).input_features
    got = log_mel_spectrogram(torch.from_numpy(audio), 80)
    assert got.shape == (80, len(audio) // 160)
    torch.testing.assert_close(got, want[0], atol=ATOL, rtol=0)
    # OpenAI's long-form front end pads a window of silence first
    padded = WhisperFeatureExtractor().log_mel(audio, padding=480_000)
    assert padded.shape == (80, (len(audio) + 480_000) // 160)


def test_feature_errors_name_the_problem():
    fe = WhisperFeatureExtractor()
    with pytest.raises(ValueError, match="sampled at 44100 Hz; the model reads 16000 Hz: resample it first"):
        fe(_audio(1, 0), sampling_rate=44_100)
    with pytest.raises(ValueError, match=r"audio must be mono.*got shape \(1, 2, 100\)"):
        fe(np.zeros((1, 2, 100), dtype=np.float32))
    with pytest.raises(ValueError, match="audio is empty"):
        fe([])
    with pytest.raises(ValueError, match="audio must be an array of samples"):
        fe("speech.wav")
    with pytest.raises(ValueError, match="feature config field n_mels must be a positive integer, got 0"):
        FeatureConfig(n_mels=0)


# --------------------------------------------------------------------------- model


class Pair:
    def __init__(self, path: str) -> None:
        self.path = path
        self.hf = transformers.WhisperForConditionalGeneration.from_pretrained(
            path, dtype=torch.float32
        ).eval()
        self.loaded = load_task_model(path, "speech-seq2seq")
        self.ours = self.loaded.model
        self.gen = self.loaded.generation_defaults
        n_mels = self.ours.config.num_mel_bins
        fe = transformers.WhisperFeatureExtractor(feature_size=n_mels)
        batch = [_audio(4.0, 10), _audio(9.0, 11), _audio(1.5, 12)]
        self.features = fe(batch, sampling_rate=SR, return_tensors="pt").input_features


@pytest.fixture(scope="module")
def multi() -> Pair:
    return Pair(tw.whisper_dir(multilingual=True))


@pytest.fixture(scope="module")
def english() -> Pair:
    return Pair(tw.whisper_dir(multilingual=False))


@pytest.fixture(scope="module")
def mels128() -> Pair:
    return Pair(tw.whisper_dir(multilingual=True, num_mel_bins=128))


def _prompt(pair: Pair, language: str | None = "en") -> list[int]:
    g = pair.gen
    if language is None:
        return [g["decoder_start_token_id"], g["no_timestamps_token_id"]]
    return [
        g["decoder_start_token_id"],
        g["lang_to_id"][f"<|{language}|>"],
        g["task_to_id"]["transcribe"],
        g["no_timestamps_token_id"],
    ]


@pytest.mark.parametrize("name", ["multi", "mels128"])
def test_encoder_and_logits_match(name, request):
    pair: Pair = request.getfixturevalue(name)
    ids = torch.tensor([_prompt(pair) + [300, 301, 7, 8]] * 3)
    with torch.no_grad():
        ref = pair.hf(input_features=pair.features, decoder_input_ids=ids)
        enc = pair.ours.encode(pair.features)
        torch.testing.assert_close(enc, ref.encoder_last_hidden_state, atol=ATOL, rtol=0)
        torch.testing.assert_close(pair.ours(pair.features, ids), ref.logits, atol=ATOL, rtol=0)


def test_cached_decoding_equals_uncached(multi):
    ids = torch.tensor([_prompt(multi) + [300, 301, 7, 8, 9]] * 3)
    with torch.no_grad():
        full = multi.ours(multi.features, ids)
        cache = multi.ours.start_decoding(multi.ours.encode(multi.features), capacity=4)  # grows past 4
        steps = [multi.ours.decode(ids[:, :4], cache)]
        steps += [multi.ours.decode(ids[:, t : t + 1], cache) for t in range(4, ids.shape[1])]
    assert cache.length == ids.shape[1]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=ATOL, rtol=0)


def test_select_rows_follows_beams(multi):
    """Rows dropped, repeated and reordered mid-decode continue as their source rows."""
    ids = torch.tensor([_prompt(multi) + [300, 301]] * 3)
    nxt = torch.tensor([[7], [8], [9]])
    with torch.no_grad():
        full = multi.ours(multi.features, torch.cat([ids, nxt], dim=1))[:, -1]
        cache = multi.ours.start_decoding(multi.ours.encode(multi.features))
        multi.ours.decode(ids, cache)
        rows = torch.tensor([2, 0, 0])
        cache.select_rows(rows)
        got = multi.ours.decode(nxt[rows], cache)[:, -1]
    torch.testing.assert_close(got, full[rows], atol=ATOL, rtol=0)


def _hf_greedy(pair: Pair, n: int, **kwargs) -> list[list[int]]:
    """transformers' Whisper generate; the first window's first ``n`` tokens, padding cut."""
    out = pair.hf.generate(pair.features, max_new_tokens=n, **kwargs)
    eos = pair.gen["eos_token_id"]
    rows = []
    for row in out[:, :n].tolist():
        rows.append(row[: row.index(eos) + 1] if eos in row else row)
    return rows


def test_greedy_equals_transformers_generate(multi, english):
    for pair, lang, kwargs in ((multi, "en", dict(language="en", task="transcribe")), (english, None, {})):
        want = _hf_greedy(pair, 20, **kwargs)
        got = greedy_decode(
            pair.ours,
            pair.features,
            _prompt(pair, lang),
            max_new_tokens=20,
            suppress_tokens=pair.gen["suppress_tokens"],
            begin_suppress_tokens=pair.gen["begin_suppress_tokens"],
        )
        assert got == want


def test_model_errors_name_the_problem(multi):
    with pytest.raises(ValueError, match=r"reads features of shape \(batch, 80, 3000\).*got \(1, 80, 2000\)"):
        multi.ours.encode(torch.zeros(1, 80, 2000))
    with pytest.raises(ValueError, match=r"max_new_tokens must be in \[1, 8\] \(prompt of 440 tokens"):
        greedy_decode(multi.ours, multi.features[:1], [1] * 440, max_new_tokens=9)
    cache = multi.ours.start_decoding(multi.ours.encode(multi.features[:1]))
    with pytest.raises(ValueError, match="longer than Whisper's max_target_positions \\(448\\)"):
        multi.ours.decode(torch.ones(1, 449, dtype=torch.long), cache)
    with pytest.raises(
        ValueError, match="config field d_model \\(30\\) must be a multiple of encoder_attention_heads"
    ):
        whisper_config_from_hf({**multi.hf.config.to_dict(), "d_model": 30})
    with pytest.raises(ValueError, match="reads model_type 'whisper', got 'bart'"):
        whisper_config_from_hf({**multi.hf.config.to_dict(), "model_type": "bart"})


# --------------------------------------------------------------------------- CTranslate2

_FP = {torch.float32: 0, torch.int8: 1, torch.int16: 2, torch.float16: 4}


def _ct2_variables(sd: dict[str, torch.Tensor], cfg, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The variables CTranslate2's Whisper converter writes, from a transformers state dict
    (written out here independently of tokenmill's table)."""
    C = cfg.d_model
    v: dict[str, torch.Tensor] = {}
    zeros = torch.zeros(C)

    def norm(dst: str, src: str) -> None:
        v[f"{dst}/gamma"], v[f"{dst}/beta"] = sd[f"{src}.weight"], sd[f"{src}.bias"]

    def linear(dst: str, src: str) -> None:
        v[f"{dst}/weight"], v[f"{dst}/bias"] = sd[f"{src}.weight"], sd[f"{src}.bias"]

    for stack, n in (("encoder", cfg.encoder_layers), ("decoder", cfg.decoder_layers)):
        for i in range(n):
            src, dst = f"model.{stack}.layers.{i}", f"{stack}/layer_{i}"
            a = f"{src}.self_attn"
            norm(f"{dst}/self_attention/layer_norm", f"{src}.self_attn_layer_norm")
            v[f"{dst}/self_attention/linear_0/weight"] = torch.cat(
                [sd[f"{a}.q_proj.weight"], sd[f"{a}.k_proj.weight"], sd[f"{a}.v_proj.weight"]]
            )
            v[f"{dst}/self_attention/linear_0/bias"] = torch.cat(
                [sd[f"{a}.q_proj.bias"], zeros, sd[f"{a}.v_proj.bias"]]
            )
            linear(f"{dst}/self_attention/linear_1", f"{a}.out_proj")
            norm(f"{dst}/ffn/layer_norm", f"{src}.final_layer_norm")
            linear(f"{dst}/ffn/linear_0", f"{src}.fc1")
            linear(f"{dst}/ffn/linear_1", f"{src}.fc2")
            if stack == "decoder":
                x = f"{src}.encoder_attn"
                norm(f"{dst}/attention/layer_norm", f"{src}.encoder_attn_layer_norm")
                linear(f"{dst}/attention/linear_0", f"{x}.q_proj")
                v[f"{dst}/attention/linear_1/weight"] = torch.cat(
                    [sd[f"{x}.k_proj.weight"], sd[f"{x}.v_proj.weight"]]
                )
                v[f"{dst}/attention/linear_1/bias"] = torch.cat([zeros, sd[f"{x}.v_proj.bias"]])
                linear(f"{dst}/attention/linear_2", f"{x}.out_proj")
    for name in ("conv1", "conv2"):
        linear(f"encoder/{name}", f"model.encoder.{name}")
    v["encoder/position_encodings/encodings"] = sd["model.encoder.embed_positions.weight"]
    norm("encoder/layer_norm", "model.encoder.layer_norm")
    v["decoder/embeddings/weight"] = sd["model.decoder.embed_tokens.weight"]
    v["decoder/position_encodings/encodings"] = sd["model.decoder.embed_positions.weight"]
    norm("decoder/layer_norm", "model.decoder.layer_norm")
    v = {k: t.to(dtype) for k, t in v.items()}
    v["encoder/num_heads"] = torch.tensor(cfg.encoder_attention_heads, dtype=torch.int16)
    v["decoder/num_heads"] = torch.tensor(cfg.decoder_attention_heads, dtype=torch.int16)
    v["decoder/activation"] = torch.tensor(3, dtype=torch.int8)  # GELU
    v["decoder/pre_norm"] = torch.tensor(1, dtype=torch.int8)
    v["decoder/alibi"] = torch.tensor(0, dtype=torch.int8)
    v["decoder/scale_embeddings"] = torch.tensor(0, dtype=torch.int8)
    return v


def _write_model_bin(
    path: str, variables: dict[str, torch.Tensor], aliases: dict[str, str], version: int = 6
) -> None:
    def string(s: str) -> bytes:
        raw = s.encode() + b"\0"
        return struct.pack("<H", len(raw)) + raw

    with open(path, "wb") as f:
        f.write(struct.pack("<I", version) + string("WhisperSpec") + struct.pack("<I", 3))
        f.write(struct.pack("<I", len(variables)))
        for name in sorted(variables):
            t = variables[name].contiguous()
            data = t.numpy().tobytes()
            f.write(string(name) + struct.pack("<B", t.dim()) + struct.pack(f"<{t.dim()}I", *t.shape))
            f.write(struct.pack("<BI", _FP[t.dtype], len(data)) + data)
        f.write(struct.pack("<I", len(aliases)))
        for alias, target in aliases.items():
            f.write(string(alias) + string(target))


def _ct2_dir(pair: Pair, tmp_path, dtype: torch.dtype, int8: bool = False) -> str:
    """A faster-whisper style directory: model.bin, CTranslate2's config.json, tokenizer.json."""
    out = str(tmp_path / f"ct2-{str(dtype)[6:]}{'-int8' if int8 else ''}")
    os.makedirs(out)
    variables = _ct2_variables(pair.hf.state_dict(), pair.hf.config, dtype)
    if int8:  # CTranslate2's int8: round(w * 127 / max|row|), scale per row
        for name in [n for n in variables if n.endswith("linear_0/weight") or n.endswith("linear_1/weight")]:
            w = variables[name].float()
            scale = 127.0 / w.abs().amax(dim=1).clamp(min=1e-12)
            variables[name] = torch.round(w * scale[:, None]).to(torch.int8)
            variables[name + "_scale"] = scale
    _write_model_bin(
        os.path.join(out, "model.bin"), variables, {"decoder/projection/weight": "decoder/embeddings/weight"}
    )
    g = pair.gen
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(
            {
                "alignment_heads": g["alignment_heads"],
                "lang_ids": sorted(g.get("lang_to_id", {}).values()),
                "suppress_ids": g["suppress_tokens"],
                "suppress_ids_begin": g["begin_suppress_tokens"],
            },
            f,
        )
    shutil.copy(os.path.join(pair.path, "tokenizer.json"), out)
    return out


def test_ct2_round_trip_float32_loads_exactly(multi, tmp_path):
    d = _ct2_dir(multi, tmp_path, torch.float32)
    loaded = load_task_model(d, "speech-seq2seq")
    hf_cfg = multi.hf.config
    for key in (
        "vocab_size",
        "d_model",
        "encoder_layers",
        "decoder_layers",
        "encoder_ffn_dim",
        "num_mel_bins",
    ):
        assert loaded.hf_config[key] == getattr(hf_cfg, key), key
    assert loaded.hf_config["decoder_start_token_id"] == hf_cfg.decoder_start_token_id
    assert loaded.hf_config["eos_token_id"] == hf_cfg.eos_token_id
    assert loaded.generation_defaults["no_timestamps_token_id"] == multi.gen["no_timestamps_token_id"]
    assert loaded.tokenizer is not None
    for name, p in multi.ours.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[name], p), name
    ids = torch.tensor([_prompt(multi) + [300, 301]] * 3)
    with torch.no_grad():
        torch.testing.assert_close(
            loaded.model(multi.features, ids),
            multi.hf(input_features=multi.features, decoder_input_ids=ids).logits,
            atol=ATOL,
            rtol=0,
        )


def test_ct2_float16_and_int8_weights(multi, tmp_path):
    sd = multi.hf.state_dict()
    d16 = _ct2_dir(multi, tmp_path, torch.float16)
    m16 = load_task_model(d16, "speech-seq2seq").model
    assert torch.equal(m16.model.encoder.conv1.weight, sd["model.encoder.conv1.weight"].half().float())
    q = sd["model.decoder.layers.1.self_attn.q_proj.weight"]
    assert torch.equal(m16.model.decoder.layers[1].self_attn.q_proj.weight, q.half().float())
    assert m16.proj_out.weight is m16.model.decoder.embed_tokens.weight

    d8 = _ct2_dir(multi, tmp_path, torch.float32, int8=True)
    m8 = load_task_model(d8, "speech-seq2seq").model
    fc1 = sd["model.encoder.layers.0.fc1.weight"]
    err = (m8.model.encoder.layers[0].fc1.weight - fc1).abs().amax(dim=1)
    assert bool((err <= fc1.abs().amax(dim=1) / 127 / 2 + 1e-6).all())  # half a quantization step


def test_ct2_errors_name_the_problem(multi, tmp_path):
    d = _ct2_dir(multi, tmp_path, torch.float32)
    path = os.path.join(d, "model.bin")
    ct2 = read_model_bin(path)
    assert ct2.spec == "WhisperSpec" and ct2.version == 6 and ct2.aliases

    bad = str(tmp_path / "v2.bin")
    _write_model_bin(bad, {"x": torch.zeros(2)}, {}, version=2)
    with pytest.raises(ModelLoadError, match="binary format version 2 is not supported"):
        read_model_bin(bad)

    with open(path, "rb") as f:
        head = f.read(5000)
    cut = str(tmp_path / "cut.bin")
    with open(cut, "wb") as f:
        f.write(head)
    with pytest.raises(ModelLoadError, match="is truncated"):
        read_model_bin(cut)

    extra = str(tmp_path / "extra")
    shutil.copytree(d, extra)
    variables = _ct2_variables(multi.hf.state_dict(), multi.hf.config, torch.float32)
    variables["decoder/layer_0/mystery/weight"] = torch.zeros(3, 3)
    _write_model_bin(os.path.join(extra, "model.bin"), variables, {})
    with pytest.raises(ModelLoadError, match="unexpected variable 'decoder/layer_0/mystery/weight'"):
        load_task_model(extra, "speech-seq2seq")

    missing = str(tmp_path / "missing")
    shutil.copytree(d, missing)
    del variables["decoder/layer_0/mystery/weight"]
    del variables["decoder/layer_1/ffn/linear_1/bias"]
    _write_model_bin(os.path.join(missing, "model.bin"), variables, {})
    with pytest.raises(ModelLoadError, match="missing tensor.*model.decoder.layers.1.fc2.bias"):
        load_task_model(missing, "speech-seq2seq")

    assert open_ct2_dir(d).hf_config["model_type"] == "whisper"


# --------------------------------------------------------------------------- float16 weights


def test_float16_weights_decode_on_half_copies(multi, tmp_path, monkeypatch):
    """A float16 checkpoint decodes on float16 weight copies with float32 arithmetic: the
    logits of transformers' float32 model on the same values within 1e-4, the same greedy
    tokens, and the float32 path's logits when the copies are turned off."""
    from tokenmill.layers.half_linear import half_linear_available
    from tokenmill.models import whisper as whisper_module

    if not half_linear_available():
        pytest.skip("no float16-weight kernel on this machine (needs a C compiler and AVX-512)")
    model = load_task_model(_ct2_dir(multi, tmp_path, torch.float16), "speech-seq2seq").model
    hf = transformers.WhisperForConditionalGeneration(multi.hf.config).eval()
    hf.load_state_dict({k: v.half().float() for k, v in multi.hf.state_dict().items()})
    hf.generation_config = multi.hf.generation_config
    calls = []
    real_step = whisper_module.decode_step
    monkeypatch.setattr(whisper_module, "decode_step", lambda *a: calls.append(a[2].shape) or real_step(*a))

    prompt = _prompt(multi) + [300, 301, 7]  # 7 tokens x 3 rows: over MAX_ROWS, the float32 path
    ids = torch.tensor([prompt + [8, 9, 10]] * 3)
    with torch.no_grad():
        want = hf(input_features=multi.features, decoder_input_ids=ids).logits

        def cached(rows: torch.Tensor | None = None) -> torch.Tensor:
            cache = model.start_decoding(model.encode(multi.features))
            out = [model.decode(ids[:, :7], cache)]
            out += [model.decode(ids[:, t : t + 1], cache) for t in range(7, ids.shape[1])]
            return torch.cat(out, dim=1)

        got = cached()
        assert model.half_decoder() is not None
        assert calls == [(3, 1)] * 3  # the single-token steps ran on the copies
        torch.testing.assert_close(got, want, atol=ATOL, rtol=0)
        model.use_half_weights = False
        torch.testing.assert_close(cached(), got, atol=ATOL, rtol=0)
        assert len(calls) == 3
        model.use_half_weights = True

    greedy = greedy_decode(
        model,
        multi.features,
        _prompt(multi),
        max_new_tokens=20,
        suppress_tokens=multi.gen["suppress_tokens"],
        begin_suppress_tokens=multi.gen["begin_suppress_tokens"],
    )
    assert len(calls) > 3
    assert greedy == _hf_greedy(_with(multi, hf), 20, language="en", task="transcribe")


def _with(pair: Pair, hf) -> Pair:
    """``pair`` with another transformers model (same features and generation defaults)."""
    other = Pair.__new__(Pair)
    other.__dict__.update(pair.__dict__, hf=hf)
    return other


def test_half_copies_only_for_exact_float16_weights(multi, tmp_path):
    from tokenmill.layers.half_linear import half_linear_available

    if not half_linear_available():
        pytest.skip("no float16-weight kernel on this machine (needs a C compiler and AVX-512)")
    with torch.no_grad():
        assert multi.ours.half_decoder() is None  # random float32 weights: the copies would round them
        model = load_task_model(_ct2_dir(multi, tmp_path, torch.float16), "speech-seq2seq").model
        assert model.half_decoder() is not None
        # a weight written in place afterwards is seen at the next start_decoding
        fc2 = model.model.decoder.layers[0].fc2.weight
        fc2[0, 0] += 1e-4
        model.start_decoding(model.encode(multi.features[:1]))
        assert model.half_decoder() is None
        fc2[0, 0] = fc2[0, 0].half().float()
        assert model.half_decoder() is not None
