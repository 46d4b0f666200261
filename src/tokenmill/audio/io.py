"""Audio from what a user hands a pipeline, as mono float32 samples at the model's rate.

Accepted: a file path (str or ``os.PathLike``), the file's bytes, a 1-D float array (numpy
or torch) taken to be at the model's rate already, or ``{"array": ..., "sampling_rate":
...}`` (``"raw"`` for ``"array"``, as transformers also reads) at any rate. Files are read
by soundfile (libsndfile): WAV, FLAC, OGG/Vorbis and, from libsndfile 1.1 on, MP3. Several
channels are averaged to one; other rates are resampled with a polyphase filter
(``scipy.signal.resample_poly``). URLs are refused: tokenmill never fetches anything.

Every input that cannot become audio is an ``AudioInputError`` whose message names the
input and says what to pass instead; a missing decoder (soundfile, scipy, or a libsndfile
without MP3) is an ``AudioDecoderError`` that says what to install.
"""

from __future__ import annotations

import io
import math
import numbers
import os
import re
import sys
from typing import Any

import numpy as np

#: Whisper's rate, and the default target
SAMPLING_RATE = 16_000
#: slowest rate taken: below it a "rate" is almost surely a mistake (seconds, kHz) and
#: resampling to 16 kHz would invent 16x the samples
MIN_SAMPLING_RATE = 1_000

_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]*://")
_FORMATS = "WAV, FLAC, OGG, MP3"


class AudioInputError(ValueError):
    """An input that is not audio tokenmill can read (pipelines raise it as PipelineInputError)."""


class AudioDecoderError(ImportError):
    """A decoder audio input needs is not installed."""


def soundfile() -> Any:
    """The ``soundfile`` module, or an AudioDecoderError that says how to install it."""
    try:
        import soundfile as sf
    except (ImportError, OSError) as e:  # OSError: the package is there but libsndfile is not
        raise AudioDecoderError(
            f"reading audio files needs soundfile: pip install 'tokenmill[audio]' (or pip install soundfile) ({e})"
        ) from e
    return sf


def _is_tensor(item: Any) -> bool:
    torch = sys.modules.get("torch")  # a tensor can only exist if torch is imported
    return torch is not None and isinstance(item, torch.Tensor)


def check_sampling_rate(rate: Any, name: str = "input 0") -> int:
    """``rate`` as an int of Hz, or an AudioInputError saying what a rate must be."""
    if isinstance(rate, bool) or not isinstance(rate, numbers.Integral) or rate < MIN_SAMPLING_RATE:
        raise AudioInputError(
            f"{name}: sampling_rate must be a positive integer number of samples per second "
            f"(at least {MIN_SAMPLING_RATE}, e.g. 16000 or 44100), got {rate!r}"
        )
    return int(rate)


def check_audio_input(item: Any, name: str = "input 0") -> Any:
    """Cheap checks of one audio input, before anything is decoded.

    Returns:
        the input, a path-like as a string, a tensor as a numpy array, bytes as ``bytes``.
    """
    if isinstance(item, os.PathLike):
        item = os.fspath(item)
    if isinstance(item, str):
        if _URL.match(item):
            raise AudioInputError(
                f"{name} is a URL; tokenmill does not fetch URLs: download the audio and pass its path or bytes"
            )
        if not item.strip():
            raise AudioInputError(f"{name} is an empty string; give an audio file's path")
        if os.path.isdir(item):
            raise AudioInputError(f"{name}: {item!r} is a directory, not an audio file")
        if not os.path.isfile(item):
            raise AudioInputError(f"{name}: no audio file {item!r}")
        return item
    if isinstance(item, (bytes, bytearray, memoryview)):
        if len(item) == 0:
            raise AudioInputError(f"{name} is empty bytes; give an audio file's contents")
        return bytes(item)
    if isinstance(item, dict):
        array = item.get("array", item.get("raw"))
        if array is None or "sampling_rate" not in item:
            raise AudioInputError(
                f"{name}: an audio dict needs 'array' (or 'raw') and 'sampling_rate', got keys {sorted(item)}"
            )
        rate = check_sampling_rate(item["sampling_rate"], name)
        return {"array": _check_array(array, name), "sampling_rate": rate}
    if _is_tensor(item) or isinstance(item, np.ndarray):
        return _check_array(item, name)
    raise AudioInputError(
        f"{name} must be audio: a file path, the file's bytes, a 1-D float array or "
        f"{{'array': ..., 'sampling_rate': ...}}, got {type(item).__name__}"
    )


def _check_array(array: Any, name: str) -> np.ndarray:
    if _is_tensor(array):
        array = array.detach().cpu().float().numpy() if array.is_floating_point() else array.cpu().numpy()
    if not isinstance(array, np.ndarray):
        raise AudioInputError(
            f"{name}: audio samples must be a 1-D numpy array or torch tensor, got {type(array).__name__}"
        )
    if array.ndim != 1:
        raise AudioInputError(
            f"{name}: audio arrays must be 1-D (mono), got shape {tuple(array.shape)}; average the channels "
            "(e.g. array.mean(axis=1) for (samples, channels))"
        )
    if not np.issubdtype(array.dtype, np.floating):
        raise AudioInputError(
            f"{name}: audio samples must be floats in [-1, 1], got dtype {array.dtype}; "
            "for 16-bit PCM divide by 32768"
        )
    return array


def _looks_like_mp3(head: bytes) -> bool:
    # an ID3 tag, or an MPEG audio frame header (11 sync bits)
    return head.startswith(b"ID3") or (len(head) >= 2 and head[0] == 0xFF and head[1] & 0xE0 == 0xE0)


def _decode(source: Any, head: bytes, what: str, name: str) -> tuple[np.ndarray, int]:
    sf = soundfile()
    if _looks_like_mp3(head) and "MP3" not in sf.available_formats():
        raise AudioDecoderError(
            f"{name}: {what} MP3, and this libsndfile ({sf.__libsndfile_version__}) has no MP3 decoder; "
            "upgrade soundfile (pip install -U soundfile, which bundles libsndfile 1.1 or later) or "
            "convert the file to WAV or FLAC"
        )
    try:
        samples, rate = sf.read(source, dtype="float32", always_2d=True)
    except Exception as e:  # libsndfile errors, or a format it does not know
        reason = getattr(e, "error_string", None) or str(e)
        raise AudioInputError(f"{name}: {what} not audio soundfile can read ({_FORMATS}): {reason}") from None
    return samples.mean(axis=1, dtype=np.float32), int(rate)  # (frames, channels) -> mono


def read_audio(item: Any, name: str = "input 0") -> tuple[np.ndarray, int | None]:
    """Mono float32 samples and their rate, not resampled; the rate is None for a bare array
    (it has none of its own: the caller decides)."""
    item = check_audio_input(item, name)
    if isinstance(item, str):
        try:
            with open(item, "rb") as f:
                head = f.read(4)
        except OSError as e:
            raise AudioInputError(f"{name}: file {item!r} is unreadable ({e.strerror})") from None
        samples, rate = _decode(item, head, f"file {item!r} is", name)
    elif isinstance(item, bytes):
        samples, rate = _decode(io.BytesIO(item), item[:4], "the bytes are", name)
    elif isinstance(item, dict):
        samples, rate = item["array"], item["sampling_rate"]
    else:
        samples, rate = item, None
    if samples.size == 0:
        raise AudioInputError(f"{name} holds no audio samples")
    samples = np.asarray(samples, dtype=np.float32)
    if not np.isfinite(samples).all():
        raise AudioInputError(f"{name} holds NaN or infinite samples; audio samples are floats in [-1, 1]")
    return samples, rate


def resample(samples: np.ndarray, rate: int, target: int = SAMPLING_RATE) -> np.ndarray:
    """``samples`` at ``rate`` Hz resampled to ``target`` Hz (polyphase, scipy's default filter)."""
    if rate == target:
        return np.asarray(samples, dtype=np.float32)
    try:
        from scipy.signal import resample_poly
    except ImportError as e:
        raise AudioDecoderError(
            f"audio at {rate} Hz must be resampled to {target} Hz, which needs scipy: "
            f"pip install 'tokenmill[audio]' (or pip install scipy) ({e})"
        ) from e
    g = math.gcd(rate, target)
    return resample_poly(samples, target // g, rate // g).astype(np.float32)


def load_audio(item: Any, sampling_rate: int = SAMPLING_RATE, *, name: str = "input 0") -> np.ndarray:
    """One input as mono float32 samples at ``sampling_rate`` Hz.

    A bare array is taken to be at ``sampling_rate`` already (pass ``{"array",
    "sampling_rate"}`` otherwise); a file or a dict at another rate is resampled.

    Args:
        name: how messages name the input ("input 3").

    Raises:
        AudioInputError: not audio, unreadable, empty, or a bad sampling rate.
        AudioDecoderError: soundfile (or scipy, or an MP3-capable libsndfile) is missing.
    """
    samples, rate = read_audio(item, name)
    return samples if rate is None else resample(samples, rate, sampling_rate)
