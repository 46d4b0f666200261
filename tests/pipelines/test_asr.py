"""automatic-speech-recognition against transformers, on tiny random Whisper checkpoints.

Greedy decoding is compared with transformers' ``WhisperForConditionalGeneration.generate``
(and its pipeline with ``num_beams=1``, since transformers' pipeline defaults to 5 beams):
the same text, and the same segments (start, end, tokens) as ``generate(...,
return_segments=True)``, for short audio with and without timestamps and for audio over
30 seconds (sequential long-form decoding). Language detection is compared with
``detect_language``. Random models write nonsense until the token limit, so most calls cap
``max_new_tokens``.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

import tiny_whisper as tw
from tokenmill import pipeline
from tokenmill.audio.languages import LANGUAGES
from tokenmill.pipelines.base import PipelineInputError

transformers = pytest.importorskip("transformers")
sf = pytest.importorskip("soundfile")

SR = 16_000
N = 60  # max_new_tokens for most calls


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _audio(seconds: float, seed: int) -> np.ndarray:
    """A chirp with noise: energy spread over many mel bins, different per seed."""
    t = np.arange(int(seconds * SR)) / SR
    rng = np.random.default_rng(seed)
    f0 = 150 + 50 * seed
    tone = 0.3 * np.sin(2 * np.pi * (f0 + 300 * t) * t) * np.sin(2 * np.pi * 0.7 * t)
    return (tone + 0.02 * rng.standard_normal(t.size)).astype(np.float32)


class Setup:
    def __init__(self, multilingual: bool) -> None:
        self.path = tw.whisper_dir(multilingual=multilingual)
        self.hf = transformers.WhisperForConditionalGeneration.from_pretrained(self.path).eval()
        self.processor = transformers.WhisperProcessor.from_pretrained(self.path)
        self.pipe = pipeline("automatic-speech-recognition", self.path)
        self.kwargs = {"language": "en", "task": "transcribe"} if multilingual else {}

    def features(self, audio: np.ndarray) -> dict:
        fe = self.processor.feature_extractor
        if len(audio) > 480_000:  # long-form: the whole spectrogram, as transformers' pipeline makes it
            return fe(audio, sampling_rate=SR, truncation=False, padding="longest", return_attention_mask=True,
                      return_tensors="pt")  # fmt: skip
        return fe(audio, sampling_rate=SR, return_attention_mask=True, return_tensors="pt")

    def generate(self, audio: np.ndarray, **kwargs):
        f = self.features(audio)
        with torch.no_grad():
            return self.hf.generate(
                f.input_features, attention_mask=f.attention_mask, return_segments=True, **kwargs
            )

    def reference(self, audio: np.ndarray, timestamps: bool, **kwargs) -> dict:
        """The pipeline's result written from transformers' segments: text, and one chunk per
        segment that has text."""
        out = self.generate(audio, return_timestamps=timestamps or len(audio) > 480_000, **kwargs)
        tb = self.hf.generation_config.no_timestamps_token_id + 1
        tok = self.processor.tokenizer
        pieces = []
        for s in out["segments"][0]:
            text = tok.decode([t for t in s["tokens"].tolist() if t < tb], skip_special_tokens=True)
            pieces.append(((round(float(s["start"]), 2), round(float(s["end"]), 2)), text))
        result = {"text": "".join(text for _, text in pieces)}
        if timestamps:
            result["chunks"] = [{"timestamp": ts, "text": text} for ts, text in pieces if text]
        return result


@pytest.fixture(scope="module")
def multi() -> Setup:
    return Setup(multilingual=True)


@pytest.fixture(scope="module")
def english() -> Setup:
    return Setup(multilingual=False)


# -- parity ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["multi", "english"])
@pytest.mark.parametrize("timestamps", [False, True])
def test_short_audio_equals_transformers_generate(name, timestamps, request):
    s: Setup = request.getfixturevalue(name)
    for seconds, seed in ((4.0, 1), (9.0, 2)):
        audio = _audio(seconds, seed)
        want = s.reference(audio, timestamps, max_new_tokens=N, **s.kwargs)
        got = s.pipe(audio, return_timestamps=timestamps, max_new_tokens=N, **s.kwargs)
        assert got == want
        if timestamps:
            assert len(got["chunks"]) >= 2  # the random model does write several segments


@pytest.mark.parametrize("name", ["multi", "english"])
def test_long_audio_equals_transformers_long_form(name, request):
    s: Setup = request.getfixturevalue(name)
    audio = _audio(45.3, 3)
    want = s.reference(audio, True, max_new_tokens=N, **s.kwargs)
    got = s.pipe(audio, return_timestamps=True, max_new_tokens=N, **s.kwargs)
    assert got == want
    assert got["chunks"][-1]["timestamp"][1] > 30  # the second window was decoded
    # without timestamps the text is the same: long audio decodes with them anyway
    assert s.pipe(audio, max_new_tokens=N, **s.kwargs) == {"text": want["text"]}


def test_text_equals_transformers_pipeline(english):
    """transformers' own pipeline (greedy, as ours) gives the same text."""
    ref = transformers.pipeline("automatic-speech-recognition", model=english.path)
    audio = _audio(6.0, 4)
    for timestamps in (False, True):
        want = ref(
            audio.copy(), return_timestamps=timestamps, generate_kwargs={"num_beams": 1, "max_new_tokens": N}
        )
        assert english.pipe(audio, return_timestamps=timestamps, max_new_tokens=N)["text"] == want["text"]


def test_default_length_fills_the_window(english):
    """Without max_new_tokens a window holds what fits in max_length (448) positions."""
    audio = _audio(3.0, 5)
    assert english.pipe(audio) == english.reference(audio, False)


def test_batched_calls_equal_single_calls(multi):
    clips = [_audio(3.0, 6), _audio(37.0, 7), _audio(5.0, 8)]
    opts = dict(return_timestamps=True, max_new_tokens=30, language="en")
    single = [multi.pipe(c, **opts) for c in clips]
    assert multi.pipe(clips, batch_size=2, **opts) == single
    assert multi.pipe(clips, batch_size=8, **opts) == single


@pytest.fixture(scope="module")
def detecting(multi, tmp_path_factory) -> tuple[Setup, list[np.ndarray]]:
    """The multilingual model with its language tokens pointed along the directions in which
    the decoder's state after <|startoftranscript|> varies with these clips: a random model
    otherwise detects the same language for any audio."""
    rng = np.random.default_rng(0)
    clips = [
        np.zeros(2 * SR, np.float32),
        0.5 * rng.standard_normal(3 * SR).astype(np.float32),
        np.sin(2 * np.pi * 100 * np.arange(3 * SR) / SR).astype(np.float32),
        np.sin(2 * np.pi * 3000 * np.arange(3 * SR) / SR).astype(np.float32),
        (np.arange(4 * SR) % 4000 == 0).astype(np.float32),
    ]
    hf = copy.deepcopy(multi.hf)
    sot = torch.tensor([[hf.generation_config.decoder_start_token_id]])
    with torch.no_grad():
        states = torch.stack(
            [
                hf.model(
                    input_features=multi.features(c).input_features, decoder_input_ids=sot
                ).last_hidden_state[0, -1]
                for c in clips
            ]  # fmt: skip
        )
        directions = torch.linalg.svd(states - states.mean(0), full_matrices=False).Vh
        embed = hf.model.decoder.embed_tokens.weight
        for j, i in enumerate(sorted(hf.generation_config.lang_to_id.values())):
            embed[i] = 50 * directions[j % len(directions)] * (1 if j < len(directions) else -1)
    path = tmp_path_factory.mktemp("whisper-detecting")
    hf.save_pretrained(path)
    multi.processor.save_pretrained(path)
    s = Setup.__new__(Setup)
    s.path, s.processor, s.kwargs = str(path), multi.processor, {}
    s.hf = transformers.WhisperForConditionalGeneration.from_pretrained(path).eval()
    s.pipe = pipeline("automatic-speech-recognition", str(path))
    return s, clips


def test_language_detection_equals_transformers(detecting):
    s, clips = detecting
    by_id = {i: t[2:-2] for t, i in s.hf.generation_config.lang_to_id.items()}
    detected = set()
    for audio in clips:
        with torch.no_grad():
            want_id = int(s.hf.detect_language(s.features(audio).input_features)[0])
        got = s.pipe(audio, return_language=True, max_new_tokens=20)
        assert got["chunks"][0]["language"] == LANGUAGES[by_id[want_id]]
        detected.add(want_id)
        # transcription after detection equals transformers' (which detects too)
        assert got["text"] == s.reference(audio, False, max_new_tokens=20, task="transcribe")["text"]
    assert len(detected) >= 2, "every clip is detected as one language; the test would not see a mix-up"
    # a batch detects per input
    got = s.pipe(clips, return_language=True, max_new_tokens=5)
    assert [g["chunks"][0]["language"] for g in got] == [
        s.pipe(c, return_language=True, max_new_tokens=5)["chunks"][0]["language"] for c in clips
    ]


def test_translate_and_other_languages_equal_transformers(multi):
    audio = _audio(5.0, 9)
    for kwargs in ({"language": "de", "task": "translate"}, {"language": "fr", "task": "transcribe"}):
        want = multi.reference(audio, True, max_new_tokens=N, **kwargs)
        got = multi.pipe(audio, return_timestamps=True, max_new_tokens=N, **kwargs)
        assert got == want
    # names, tokens and codes all mean the same language; generate_kwargs as transformers takes them
    a = multi.pipe(audio, language="German", max_new_tokens=10)
    assert multi.pipe(audio, language="<|de|>", max_new_tokens=10) == a
    assert multi.pipe(audio, generate_kwargs={"language": "de", "max_new_tokens": 10}) == a


def test_prompt_equals_transformers_prompt_ids(multi):
    audio = _audio(4.0, 10)
    prompt = "the quick brown fox"
    prompt_ids = multi.processor.get_prompt_ids(prompt, return_tensors="pt")
    want = multi.reference(audio, False, max_new_tokens=N, prompt_ids=prompt_ids, **multi.kwargs)
    got = multi.pipe(audio, prompt=prompt, max_new_tokens=N, **multi.kwargs)
    assert got == want
    assert got != multi.pipe(audio, max_new_tokens=N, **multi.kwargs)


def test_sampling_repeats_with_the_seed(english):
    audio = _audio(3.0, 11)
    torch.manual_seed(0)
    a = english.pipe(audio, temperature=1.0, max_new_tokens=20)
    torch.manual_seed(0)
    assert english.pipe(audio, temperature=1.0, max_new_tokens=20) == a
    assert english.pipe(audio, temperature=0, max_new_tokens=20) == english.pipe(audio, max_new_tokens=20)


# -- inputs ----------------------------------------------------------------------------


def test_input_forms_give_the_same_text(english, tmp_path):
    from scipy.signal import resample_poly

    audio = _audio(3.0, 12)
    want = english.pipe(audio, max_new_tokens=20)
    assert english.pipe(torch.from_numpy(audio), max_new_tokens=20) == want
    assert english.pipe({"array": audio, "sampling_rate": SR}, max_new_tokens=20) == want
    assert english.pipe({"raw": audio.astype(np.float64), "sampling_rate": SR}, max_new_tokens=20) == want
    # 8 kHz audio is resampled to 16 kHz with scipy's polyphase filter
    low = audio[::2].copy()
    assert english.pipe({"array": low, "sampling_rate": 8000}, max_new_tokens=20) == english.pipe(
        resample_poly(low, 2, 1).astype(np.float32), max_new_tokens=20
    )
    # a float WAV file and its bytes hold the same samples
    path = tmp_path / "clip.wav"
    sf.write(path, audio, SR, subtype="FLOAT")
    assert english.pipe(str(path), max_new_tokens=20) == want
    assert english.pipe(path.read_bytes(), max_new_tokens=20) == want
    assert english.pipe([path, audio], max_new_tokens=20) == [want, want]


def test_bad_inputs_name_the_problem(english, tmp_path):
    text_file = tmp_path / "notes.txt"
    text_file.write_text("hello")
    cases = [
        (
            b"RIFF....not audio",
            r"input 0: the bytes are not audio soundfile can read \(WAV, FLAC, OGG, MP3\)",
        ),
        (str(text_file), r"input 0: file .*notes.txt' is not audio soundfile can read"),
        (b"", "input 0 is empty bytes; give an audio file's contents"),
        (str(tmp_path / "missing.wav"), "input 0: no audio file"),
        ("https://example.com/a.wav", "tokenmill does not fetch URLs"),
        (np.zeros((2, 100), np.float32), r"audio arrays must be 1-D \(mono\), got shape \(2, 100\)"),
        (np.zeros(100, np.int16), r"audio samples must be floats in \[-1, 1\], got dtype int16"),
        (np.zeros(0, np.float32), "input 0 holds no audio samples"),
        (
            {"array": np.zeros(10, np.float32)},
            r"an audio dict needs 'array' \(or 'raw'\) and 'sampling_rate'",
        ),
        ({"array": np.zeros(10, np.float32), "sampling_rate": 0}, "sampling_rate must be a positive integer"),
        ({"array": np.zeros(10, np.float32), "sampling_rate": "16k"}, r"got '16k'"),
        (12, "input 0 must be audio: a file path, the file's bytes, a 1-D float array"),
    ]
    for bad, message in cases:
        with pytest.raises(PipelineInputError, match=message):
            english.pipe(bad)
    with pytest.raises(PipelineInputError, match="input 1: no audio file"):
        english.pipe([_audio(1.0, 0), "missing.wav"])


def test_bad_options_name_the_problem(english, multi):
    audio = _audio(1.0, 0)
    cases = [
        (english, {"return_timestamps": "word"}, "word-level timestamps are not supported"),
        (english, {"task": "translate"}, "task 'translate' needs a multilingual Whisper"),
        (english, {"language": "de"}, "this model is English-only"),
        (
            multi,
            {"language": "klingon"},
            "language 'klingon' is not one of this model's languages: de, en, es, fr",
        ),
        (multi, {"language": "ja"}, "language 'ja' is not one of this model's languages"),
        (multi, {"task": "summarize"}, "task must be 'transcribe' or 'translate'"),
        (multi, {"chunk_length_s": 30}, "sequential long-form method"),
        (multi, {"generate_kwargs": {"num_beams": 5}}, "num_beams must be 1"),
        (multi, {"generate_kwargs": {"top_k": 5}}, "generate_kwargs got unsupported key"),
        (multi, {"language": "en", "generate_kwargs": {"language": "de"}}, "language is given twice"),
        (multi, {"max_new_tokens": 0}, "max_new_tokens must be a positive integer, got 0"),
        (multi, {"temperature": -1}, r"temperature must be a number in \[0, 2\]"),
        (multi, {"prompt": "  "}, "prompt must be a non-empty string"),
        (multi, {"prompt": "fox " * 300}, "Whisper takes at most 223 tokens of prompt"),
        (multi, {"truncation": True}, "unknown option.*'truncation'"),
        (multi, {"no_speech_threshold": 1.5}, r"no_speech_threshold must be a probability between 0 and 1"),
        (
            multi,
            {"no_speech_threshold": 0.6, "logprob_threshold": 0.5},
            "logprob_threshold must be a log-prob",
        ),
        (multi, {"logprob_threshold": -1.0}, "only acts together with no_speech_threshold; give both"),
    ]
    for s, options, message in cases:
        with pytest.raises(ValueError, match=message):
            s.pipe(audio, **options)
    with pytest.raises(ValueError, match="max_new_tokens must be at most 444"):
        multi.pipe(audio, max_new_tokens=1000, language="en")
    # English is fine on an English-only model, and so is transcribing
    assert english.pipe(audio, language="english", task="transcribe", max_new_tokens=5) == english.pipe(
        audio, max_new_tokens=5
    )


def _no_speech_prob(s: Setup, audio: np.ndarray) -> float:
    """P(<|nospeech|>) after <|startoftranscript|> for one window, computed here by hand."""
    pipe = s.pipe
    f = pipe.features(audio)
    f = f if f.dim() == 2 else f[0]
    window = torch.nn.functional.pad(f, (0, 3000 - f.shape[-1]))[None]
    with torch.inference_mode():
        cache = pipe.model.start_decoding(pipe.model.encode(window), capacity=2)
        logits = pipe.model.decode(torch.tensor([[pipe.tokens.sot]]), cache)[0, 0].float()
    return logits.softmax(-1)[pipe.tokens.no_speech].item()


def test_no_speech_threshold_drops_silent_windows(english):
    audio = _audio(10.0, 4)  # one window: without timestamps short audio is decoded once
    kept = english.pipe(audio, max_new_tokens=N)
    assert kept["text"]
    p = _no_speech_prob(english, audio)
    # just above the window's no-speech probability: it is speech, nothing changes
    assert english.pipe(audio, max_new_tokens=N, no_speech_threshold=p * 1.01) == kept
    # just below: the window is silence and gives no text
    assert english.pipe(audio, max_new_tokens=N, no_speech_threshold=p * 0.99) == {"text": ""}
    # with a log-probability threshold the text must also be unlikely to be dropped
    assert english.pipe(audio, max_new_tokens=N, no_speech_threshold=p * 0.99, logprob_threshold=-1e9) == kept
    # long audio: every window over the threshold is skipped whole, and the call ends
    long = _audio(45.3, 3)
    assert english.pipe(long, return_timestamps=True, max_new_tokens=N, no_speech_threshold=1e-12) == {
        "text": "",
        "chunks": [],
    }
