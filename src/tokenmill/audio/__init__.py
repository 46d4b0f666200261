"""Audio for the speech pipelines: reading and resampling (``io``), Whisper's log-Mel front
end (``features``) and Whisper's decoding (``decoding``).

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
from tokenmill.audio.io import (
    AudioDecoderError,
    AudioInputError,
    check_audio_input,
    load_audio,
    read_audio,
    resample,
)

__all__ = [
    "AudioDecoderError",
    "AudioInputError",
    "check_audio_input",
    "load_audio",
    "read_audio",
    "resample",
    "N_FRAMES",
    "N_SAMPLES",
    "SAMPLING_RATE",
    "FeatureConfig",
    "WhisperFeatureExtractor",
    "log_mel_spectrogram",
    "mel_filter_bank",
    "pad_or_trim",
]
