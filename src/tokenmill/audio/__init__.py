"""Audio for the speech pipelines: Whisper's log-Mel front end (``features``).

Decoders such as soundfile are imported inside functions only, so ``import tokenmill``
never needs them.
"""

from tokenmill.audio.features import (
    N_FRAMES,
    N_SAMPLES,
    SAMPLING_RATE,
    FeatureConfig,
    WhisperFeatureExtractor,
    log_mel_spectrogram,
    mel_filter_bank,
    pad_or_trim,
)

__all__ = [
    "N_FRAMES",
    "N_SAMPLES",
    "SAMPLING_RATE",
    "FeatureConfig",
    "WhisperFeatureExtractor",
    "log_mel_spectrogram",
    "mel_filter_bank",
    "pad_or_trim",
]
