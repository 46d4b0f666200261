"""tokenmill.audio.io: audio files, bytes and arrays to mono float32 at 16 kHz.

Files are written here with soundfile in each format; what is read back is compared with
the samples written (exactly for float WAV, within the codec's error for the others) and
resampling with scipy's ``resample_poly`` directly.
"""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

from tokenmill.audio import AudioDecoderError, AudioInputError, load_audio, read_audio, resample

sf = pytest.importorskip("soundfile")
signal = pytest.importorskip("scipy.signal")

SR = 16_000


def _tone(seconds: float = 0.5, rate: int = SR, freq: float = 440.0) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    return (0.4 * np.sin(2 * np.pi * freq * t)).astype(np.float32)


@pytest.mark.parametrize(
    ("suffix", "fmt", "subtype", "atol"),
    [
        ("wav", "WAV", "FLOAT", 0.0),
        ("wav", "WAV", "PCM_16", 1 / 32768),
        ("flac", "FLAC", "PCM_16", 1 / 32768),
        ("ogg", "OGG", "VORBIS", 0.05),
    ],
)
def test_files_and_their_bytes_read_back(tmp_path, suffix, fmt, subtype, atol):
    audio = _tone()
    path = tmp_path / f"clip.{suffix}"
    sf.write(path, audio, SR, format=fmt, subtype=subtype)
    got = load_audio(str(path))
    assert got.dtype == np.float32 and got.shape == audio.shape
    np.testing.assert_allclose(got, audio, atol=atol + 1e-7)
    np.testing.assert_array_equal(load_audio(path.read_bytes()), got)
    np.testing.assert_array_equal(load_audio(path), got)  # a pathlib.Path


def test_mp3_where_libsndfile_decodes_it(tmp_path):
    if "MP3" not in sf.available_formats():
        pytest.skip(f"libsndfile {sf.__libsndfile_version__} has no MP3 support")
    audio = _tone(1.0)
    path = tmp_path / "clip.mp3"
    sf.write(path, audio, SR, format="MP3")
    got = load_audio(str(path))
    # an MP3 decoder adds a little delay and padding; the tone is there
    assert abs(len(got) - len(audio)) < 0.1 * SR
    assert abs(np.sqrt(np.mean(got**2)) - np.sqrt(np.mean(audio**2))) < 0.03


def test_mp3_without_a_decoder_says_what_to_install(tmp_path, monkeypatch):
    path = tmp_path / "clip.mp3"
    path.write_bytes(b"ID3\x04\x00" + bytes(200))
    monkeypatch.setattr(sf, "available_formats", lambda: {"WAV": "WAV"})
    with pytest.raises(
        AudioDecoderError, match=r"input 0: file .*clip.mp3' is MP3, and this libsndfile .* has no MP3"
    ):
        load_audio(str(path))


def test_stereo_files_are_averaged_to_mono(tmp_path):
    left, right = _tone(freq=300), _tone(freq=500)
    path = tmp_path / "stereo.wav"
    sf.write(path, np.stack([left, right], axis=1), SR, subtype="FLOAT")
    np.testing.assert_allclose(load_audio(str(path)), (left + right) / 2, atol=1e-7)


@pytest.mark.parametrize("rate", [8_000, 22_050, 44_100, 48_000])
def test_other_rates_are_resampled_like_scipy(tmp_path, rate):
    audio = _tone(rate=rate)
    from math import gcd

    g = gcd(rate, SR)
    want = signal.resample_poly(audio, SR // g, rate // g).astype(np.float32)
    np.testing.assert_array_equal(load_audio({"array": audio, "sampling_rate": rate}), want)
    path = tmp_path / "clip.wav"
    sf.write(path, audio, rate, subtype="FLOAT")
    np.testing.assert_array_equal(load_audio(str(path)), want)
    assert abs(len(want) - len(audio) * SR / rate) <= 1
    # to another target rate too
    np.testing.assert_array_equal(resample(audio, rate, rate), audio)


def test_arrays_and_tensors():
    audio = _tone()
    np.testing.assert_array_equal(load_audio(audio), audio)  # a bare array is at the target rate
    np.testing.assert_array_equal(load_audio(audio.astype(np.float64)), audio)
    np.testing.assert_array_equal(load_audio(torch.from_numpy(audio)), audio)
    np.testing.assert_array_equal(load_audio({"raw": audio, "sampling_rate": np.int64(SR)}), audio)
    samples, rate = read_audio(audio)
    assert rate is None  # a bare array has no rate of its own: the caller's is used
    np.testing.assert_array_equal(samples, audio)


@pytest.mark.parametrize(
    ("item", "message"),
    [
        (
            b"RIFF....not audio",
            r"input 0: the bytes are not audio soundfile can read \(WAV, FLAC, OGG, MP3\)",
        ),
        (b"", "input 0 is empty bytes; give an audio file's contents"),
        ("", "input 0 is an empty string; give an audio file's path"),
        ("nowhere/clip.wav", "input 0: no audio file 'nowhere/clip.wav'"),
        ("https://example.com/clip.wav", "input 0 is a URL; tokenmill does not fetch URLs"),
        (np.zeros((100, 2), np.float32), r"audio arrays must be 1-D \(mono\), got shape \(100, 2\); average"),
        (
            np.zeros(100, np.int16),
            r"audio samples must be floats in \[-1, 1\], got dtype int16; for 16-bit PCM",
        ),
        (np.zeros(0, np.float32), "input 0 holds no audio samples"),
        (np.array([0.0, np.nan], np.float32), "input 0 holds NaN or infinite samples"),
        (
            {"array": np.zeros(10, np.float32)},
            r"an audio dict needs 'array' \(or 'raw'\) and 'sampling_rate'",
        ),
        ({"sampling_rate": SR}, r"an audio dict needs 'array'"),
        (
            {"array": [0.0, 0.1], "sampling_rate": SR},
            "audio samples must be a 1-D numpy array or torch tensor, got list",
        ),
        ({"array": np.zeros(10, np.float32), "sampling_rate": 0}, "sampling_rate must be a positive integer"),
        (
            {"array": np.zeros(10, np.float32), "sampling_rate": 16.0},
            r"at least 1000, e.g. 16000 or 44100\), got 16.0",
        ),
        ({"array": np.zeros(10, np.float32), "sampling_rate": 16}, "got 16$"),
        ({"array": np.zeros(10, np.float32), "sampling_rate": True}, "got True"),
        (12, "input 0 must be audio: a file path, the file's bytes, a 1-D float array"),
        ([0.1, 0.2], "input 0 must be audio: .* got list"),
    ],
)
def test_bad_inputs_name_the_problem(item, message):
    with pytest.raises(AudioInputError, match=message):
        load_audio(item)


def test_unreadable_files_name_the_file(tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("not audio at all")
    with pytest.raises(AudioInputError, match=r"input 3: file .*notes.txt' is not audio soundfile can read"):
        load_audio(str(text), name="input 3")
    with pytest.raises(AudioInputError, match="is a directory, not an audio file"):
        load_audio(str(tmp_path))
    truncated = tmp_path / "cut.flac"
    sf.write(truncated, _tone(), SR, format="FLAC")
    truncated.write_bytes(truncated.read_bytes()[:30])
    with pytest.raises(AudioInputError, match="cut.flac' is not audio soundfile can read"):
        load_audio(str(truncated))


def test_missing_soundfile_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "soundfile", None)
    with pytest.raises(
        AudioDecoderError, match=r"reading audio files needs soundfile: pip install 'tokenmill\[audio\]'"
    ):
        load_audio(b"RIFF0000WAVE")
    # arrays need no decoder
    np.testing.assert_array_equal(load_audio(_tone()), _tone())
