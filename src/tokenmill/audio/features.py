"""Whisper's log-Mel front end, in torch.

Audio at 16 kHz becomes a (mel bins, frames) spectrogram: a Hann-windowed STFT (400
samples, hop 160, centred with reflection padding), power, a Slaney mel filter bank,
log10, the dynamic range clipped to 8 (80 dB) below the loudest bin, then scaled to about
[-1, 1]. Every step is the one transformers' ``WhisperFeatureExtractor`` takes in its
torch path, in the same order and precision, so the features agree within float32
rounding. A model reads 30-second windows: 480,000 samples, 3,000 frames.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

SAMPLING_RATE = 16_000
N_FFT = 400
HOP_LENGTH = 160
CHUNK_LENGTH = 30  # seconds in one model window
N_SAMPLES = CHUNK_LENGTH * SAMPLING_RATE  # 480,000
N_FRAMES = N_SAMPLES // HOP_LENGTH  # 3,000


@dataclass(frozen=True)
class FeatureConfig:
    """The front end's settings, as a checkpoint's preprocessor_config.json names them."""

    n_mels: int = 80  # "feature_size"; 128 for large-v3
    sampling_rate: int = SAMPLING_RATE
    n_fft: int = N_FFT
    hop_length: int = HOP_LENGTH
    chunk_length: int = CHUNK_LENGTH

    def __post_init__(self) -> None:
        for name in ("n_mels", "sampling_rate", "n_fft", "hop_length", "chunk_length"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"feature config field {name} must be a positive integer, got {value!r}")

    @property
    def n_samples(self) -> int:
        """Samples in one model window (480,000)."""
        return self.chunk_length * self.sampling_rate

    @property
    def n_frames(self) -> int:
        """Spectrogram frames in one model window (3,000)."""
        return self.n_samples // self.hop_length

    @classmethod
    def from_preprocessor_config(cls, pre: dict[str, Any], n_mels: int | None = None) -> FeatureConfig:
        """From a preprocessor_config.json dict; ``n_mels`` (the model's num_mel_bins) wins."""
        return cls(
            n_mels=int(n_mels if n_mels is not None else pre.get("feature_size", 80)),
            sampling_rate=int(pre.get("sampling_rate", SAMPLING_RATE)),
            n_fft=int(pre.get("n_fft", N_FFT)),
            hop_length=int(pre.get("hop_length", HOP_LENGTH)),
            chunk_length=int(pre.get("chunk_length", CHUNK_LENGTH)),
        )


def _hz_to_mel(freq: torch.Tensor) -> torch.Tensor:
    """Slaney's mel scale: linear below 1 kHz, logarithmic above."""
    logstep = 27.0 / math.log(6.4)
    return torch.where(freq >= 1000.0, 15.0 + torch.log(freq / 1000.0) * logstep, 3.0 * freq / 200.0)


def _mel_to_hz(mels: torch.Tensor) -> torch.Tensor:
    logstep = math.log(6.4) / 27.0
    return torch.where(mels >= 15.0, 1000.0 * torch.exp(logstep * (mels - 15.0)), 200.0 * mels / 3.0)


def mel_filter_bank(
    n_mels: int,
    *,
    sampling_rate: int = SAMPLING_RATE,
    n_fft: int = N_FFT,
    f_min: float = 0.0,
    f_max: float = 8000.0,
) -> torch.Tensor:
    """(n_fft // 2 + 1, n_mels) float32 triangular filters, Slaney-normalised.

    Computed in float64 and rounded once, as transformers' ``mel_filter_bank(...,
    norm="slaney", mel_scale="slaney")`` does, so the filters are bit-identical.
    """
    if isinstance(n_mels, bool) or not isinstance(n_mels, int) or n_mels <= 0:
        raise ValueError(f"n_mels must be a positive integer, got {n_mels!r}")
    f64 = torch.float64
    n_freqs = n_fft // 2 + 1
    mel_points = torch.linspace(
        float(_hz_to_mel(torch.tensor(f_min, dtype=f64))),
        float(_hz_to_mel(torch.tensor(f_max, dtype=f64))),
        n_mels + 2,
        dtype=f64,
    )
    filter_freqs = _mel_to_hz(mel_points)  # (n_mels + 2,) band edges and centres in Hz
    fft_freqs = torch.linspace(0, sampling_rate // 2, n_freqs, dtype=f64)
    slopes = filter_freqs.unsqueeze(0) - fft_freqs.unsqueeze(1)  # (n_freqs, n_mels + 2)
    widths = filter_freqs.diff()
    down = -slopes[:, :-2] / widths[:-1]
    up = slopes[:, 2:] / widths[1:]
    filters = torch.clamp(torch.minimum(down, up), min=0.0)  # (n_freqs, n_mels)
    # Slaney normalisation: each filter has about the same energy whatever its width.
    filters = filters * (2.0 / (filter_freqs[2:] - filter_freqs[:-2])).unsqueeze(0)
    return filters.to(torch.float32)


def _as_waveforms(audio: Any) -> list[torch.Tensor]:
    """One float32 1-D tensor per input: a 1-D array is one input, 2-D or a list is a batch."""
    if isinstance(audio, torch.Tensor) or hasattr(audio, "__array__") and not isinstance(audio, list):
        t = torch.as_tensor(audio)
        if t.dim() == 1:
            return [t.to(torch.float32)]
        if t.dim() == 2:
            return [row.to(torch.float32) for row in t]
        raise ValueError(
            f"audio must be mono: a 1-D array of samples or a (batch, samples) array, got shape {tuple(t.shape)}"
        )
    if isinstance(audio, Sequence) and not isinstance(audio, (str, bytes)):
        if len(audio) == 0:
            raise ValueError("audio is empty: give at least one waveform")
        if all(isinstance(x, (int, float)) for x in audio):
            return [torch.tensor(audio, dtype=torch.float32)]
        out: list[torch.Tensor] = []
        for x in audio:
            t = torch.as_tensor(x)
            if t.dim() != 1:
                raise ValueError(
                    f"each waveform must be a 1-D array of mono samples, got shape {tuple(t.shape)}"
                )
            out.append(t.to(torch.float32))
        return out
    raise ValueError(f"audio must be an array of samples or a list of them, got {type(audio).__name__}")


def log_mel_spectrogram(
    audio: torch.Tensor,
    n_mels: int = 80,
    *,
    padding: int = 0,
    filters: torch.Tensor | None = None,
    n_fft: int = N_FFT,
    hop_length: int = HOP_LENGTH,
    sampling_rate: int = SAMPLING_RATE,
) -> torch.Tensor:
    """Log-Mel spectrogram of audio of any length.

    Args:
        audio: (N,) or (B, N) float samples at 16 kHz, on the device to compute on.
        padding: zeros appended first (OpenAI's whisper appends a window of silence to
            long audio so the last window is complete).
        filters: ``mel_filter_bank(n_mels)``, to reuse between calls.

    Returns:
        (n_mels, frames) or (B, n_mels, frames) float32, frames = (N + padding) // hop;
        the dynamic range is clipped per input (row).
    """
    if audio.dim() not in (1, 2):
        raise ValueError(f"audio must be (samples,) or (batch, samples), got shape {tuple(audio.shape)}")
    audio = audio.to(torch.float32)
    if padding:
        audio = torch.nn.functional.pad(audio, (0, padding))
    if audio.shape[-1] < 2:
        raise ValueError(
            f"audio needs at least 2 samples for the STFT's reflection padding, got {audio.shape[-1]}"
        )
    if filters is None:
        filters = mel_filter_bank(n_mels, sampling_rate=sampling_rate, n_fft=n_fft)
    filters = filters.to(audio.device)
    window = torch.hann_window(n_fft, device=audio.device)
    stft = torch.stft(
        audio, n_fft, hop_length, window=window, return_complex=True
    )  # (..., freqs, frames + 1)
    # The last frame is centred past the end of the audio: dropped, as Whisper does.
    power = (stft[..., :-1].abs() ** 2).contiguous()
    mel = filters.T @ power  # (..., n_mels, frames)
    log_spec = torch.clamp(mel, min=1e-10).log10()
    top = log_spec.amax(dim=(-2, -1), keepdim=True)  # loudest bin of each input
    log_spec = torch.maximum(log_spec, top - 8.0)
    return (log_spec + 4.0) / 4.0


def pad_or_trim(audio: torch.Tensor, length: int = N_SAMPLES) -> torch.Tensor:
    """Cut or zero-pad the last dimension to ``length`` samples (one 30-second window)."""
    n = audio.shape[-1]
    if n > length:
        return audio[..., :length]
    if n < length:
        return torch.nn.functional.pad(audio, (0, length - n))
    return audio


class WhisperFeatureExtractor:
    """Batched 30-second windows of log-Mel features: (B, n_mels, 3000) for the encoder.

    Equal to transformers' ``WhisperFeatureExtractor(feature_size=n_mels)(audio,
    sampling_rate=16000).input_features`` (longer audio is truncated, shorter padded with
    silence, as there); windowing long audio is the caller's job.
    """

    def __init__(self, config: FeatureConfig | None = None, device: str | torch.device = "cpu") -> None:
        self.config = config or FeatureConfig()
        self.device = torch.device(device)
        c = self.config
        self.filters = mel_filter_bank(c.n_mels, sampling_rate=c.sampling_rate, n_fft=c.n_fft).to(self.device)

    def __call__(self, audio: Any, sampling_rate: int | None = None) -> torch.Tensor:
        """Features of one waveform or a batch (a list of 1-D arrays, or a 2-D array).

        Args:
            sampling_rate: the audio's rate, checked when given: resample before, not here.
        """
        c = self.config
        if sampling_rate is not None and sampling_rate != c.sampling_rate:
            raise ValueError(
                f"audio sampled at {sampling_rate} Hz; the model reads {c.sampling_rate} Hz: resample it first"
            )
        waves = _as_waveforms(audio)
        batch = torch.stack([pad_or_trim(w, c.n_samples) for w in waves]).to(self.device)  # (B, n_samples)
        return log_mel_spectrogram(
            batch,
            c.n_mels,
            filters=self.filters,
            n_fft=c.n_fft,
            hop_length=c.hop_length,
            sampling_rate=c.sampling_rate,
        )

    def log_mel(self, audio: Any, padding: int = 0) -> torch.Tensor:
        """(n_mels, frames) features of one waveform of any length (see ``log_mel_spectrogram``)."""
        waves = _as_waveforms(audio)
        if len(waves) != 1:
            raise ValueError(f"log_mel takes one waveform, got {len(waves)}")
        c = self.config
        return log_mel_spectrogram(
            waves[0].to(self.device),
            c.n_mels,
            padding=padding,
            filters=self.filters,
            n_fft=c.n_fft,
            hop_length=c.hop_length,
            sampling_rate=c.sampling_rate,
        )
