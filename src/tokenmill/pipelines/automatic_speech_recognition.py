"""automatic-speech-recognition: speech to text with Whisper, natively.

Behaves as transformers' pipeline: each input gives ``{"text": ...}``; with
``return_timestamps=True`` also ``"chunks"``: ``[{"timestamp": (start, end), "text": ...}]``,
one per segment, in seconds from the start of the input. Audio is anything
``tokenmill.audio.load_audio`` takes (a path, a file's bytes, a float array at 16 kHz,
``{"array", "sampling_rate"}``). Audio over 30 seconds is transcribed with Whisper's
sequential long-form method (``tokenmill.audio.decoding``), so there is no chunk length to
choose.

Options (per call, as pipeline defaults, or inside ``generate_kwargs`` as transformers
takes them): ``language`` ("en", "english", "<|en|>"; detected from the first 30 seconds
where not given), ``task`` ("transcribe", or "translate" into English), ``max_new_tokens``
(per 30-second window), ``temperature`` (0, the default, decodes greedily), ``prompt``
(text the model takes as what was said before, for spellings and style),
``return_language`` (chunks carry the language's name), ``no_speech_threshold`` and
``logprob_threshold`` (a window whose ``<|nospeech|>`` probability is over the first and
whose text's average log-probability is under the second is silence and gives no text;
Whisper's own transcribe uses 0.6 and -1.0; unset, as in transformers, every window's
text is kept).
"""

from __future__ import annotations

import json
import os
from numbers import Real
from typing import Any

import torch

from tokenmill.audio.decoding import DecodeOptions, Transcript, WhisperTokens, transcribe
from tokenmill.audio.features import FeatureConfig, WhisperFeatureExtractor
from tokenmill.audio.io import AudioInputError, check_audio_input, load_audio
from tokenmill.audio.languages import LANGUAGES, language_code
from tokenmill.pipelines.base import Pipeline, PipelineInputError
from tokenmill.weights.task_loader import LoadedTaskModel

TASKS = ("transcribe", "translate")
#: generate_kwargs keys the pipeline reads (transformers' names)
GENERATE_KWARGS = frozenset(
    {
        "language",
        "task",
        "max_new_tokens",
        "temperature",
        "num_beams",
        "no_speech_threshold",
        "logprob_threshold",
    }
)
#: transformers' chunked decoding options, which the sequential long-form method replaces
_CHUNKING = ("chunk_length_s", "stride_length_s")


class AutomaticSpeechRecognitionPipeline(Pipeline):
    """``pipe(audio | list of audio, return_timestamps=False, language=None, task="transcribe")``."""

    task = "automatic-speech-recognition"
    call_options = frozenset(
        {"return_timestamps", "return_language", "generate_kwargs", "prompt"}
        | GENERATE_KWARGS - {"num_beams"}
    )

    def __init__(self, loaded: LoadedTaskModel, *, batch_size: int = 8, **defaults: Any) -> None:
        if loaded.tokenizer is None:
            raise ValueError(
                f"{loaded.source} has no tokenizer.json; Whisper needs one to turn tokens into text"
            )
        cfg = loaded.config
        self.tokens = WhisperTokens.from_loaded(cfg, loaded.generation_defaults, loaded.tokenizer)
        pre_path = os.path.join(loaded.source, "preprocessor_config.json")
        pre: dict[str, Any] = {}
        if os.path.isfile(pre_path):
            with open(pre_path, encoding="utf-8") as f:
                pre = json.load(f)
        self.feature_config = FeatureConfig.from_preprocessor_config(pre, n_mels=cfg.num_mel_bins)
        self.features = WhisperFeatureExtractor(self.feature_config, device=loaded.device)
        super().__init__(loaded, batch_size=batch_size, **defaults)

    # -- options ----------------------------------------------------------------------
    def sanitize(self, options: dict[str, Any]) -> dict[str, Any]:
        for name in _CHUNKING:
            if name in options:
                raise ValueError(
                    f"{name}: tokenmill transcribes audio over 30 seconds with Whisper's sequential "
                    "long-form method (each window starts where the last full segment ended), so it "
                    "takes no chunk or stride length; leave it out"
                )
        out = self.known_options(options, self.call_options | {"batch_size"})  # no tokens to truncate
        extra = out.pop("generate_kwargs", None) or {}
        if not isinstance(extra, dict):
            raise ValueError(f"generate_kwargs must be a dict, got {type(extra).__name__}")
        bad = sorted(set(extra) - GENERATE_KWARGS)
        if bad:
            raise ValueError(
                f"generate_kwargs got unsupported key(s) {', '.join(map(repr, bad))}; "
                f"tokenmill's Whisper reads {', '.join(sorted(GENERATE_KWARGS))}"
            )
        for name, value in extra.items():
            if name in out and out[name] != value:
                raise ValueError(
                    f"{name} is given twice, as an option and in generate_kwargs, with different values"
                )
            out[name] = value
        return self.check_options(out)

    def check_options(self, options: dict[str, Any]) -> dict[str, Any]:
        tokens = self.tokens
        ts = options.get("return_timestamps")
        if ts is not None and not isinstance(ts, bool):
            hint = "; word-level timestamps are not supported" if ts == "word" else ""
            raise ValueError(
                f"return_timestamps must be True (segment timestamps) or False, got {ts!r}{hint}"
            )
        if ts is not None and tokens.no_timestamps is None:
            raise ValueError(
                "this model's generation config has no <|notimestamps|> id, so it cannot give timestamps"
            )
        lang = options.get("return_language")
        if lang is not None and not isinstance(lang, bool):
            raise ValueError(f"return_language must be True or False, got {lang!r}")
        beams = options.pop("num_beams", 1)
        if beams != 1:
            raise ValueError(
                f"num_beams must be 1: tokenmill's Whisper decodes greedily or by sampling, got {beams!r}"
            )
        if options.get("language") is not None:
            options["language"] = self._language(options["language"])
        if options.get("task") is not None:
            task = options["task"]
            if task not in TASKS:
                raise ValueError(f"task must be 'transcribe' or 'translate', got {task!r}")
            if task == "translate" and not tokens.multilingual:
                raise ValueError(
                    "task 'translate' needs a multilingual Whisper (such as whisper-base); this model is "
                    "English-only and can only transcribe English"
                )
            if tokens.multilingual and task not in tokens.task_to_id:
                raise ValueError(f"this model's generation config has no <|{task}|> token")
        n = options.get("max_new_tokens")
        if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
            raise ValueError(f"max_new_tokens must be a positive integer, got {n!r}")
        t = options.get("temperature")
        if t is not None and (isinstance(t, bool) or not isinstance(t, Real) or not 0 <= t <= 2):
            raise ValueError(f"temperature must be a number in [0, 2] (0 decodes greedily), got {t!r}")
        ns = options.get("no_speech_threshold")
        if ns is not None and (isinstance(ns, bool) or not isinstance(ns, Real) or not 0 < ns < 1):
            raise ValueError(
                f"no_speech_threshold must be a probability between 0 and 1 (Whisper uses 0.6), got {ns!r}"
            )
        if ns is not None and self.tokens.no_speech is None:
            raise ValueError("this model's vocabulary has no <|nospeech|> token, so it cannot detect silence")
        lt = options.get("logprob_threshold")
        if lt is not None and (isinstance(lt, bool) or not isinstance(lt, Real) or not lt <= 0):
            raise ValueError(
                f"logprob_threshold must be a log-probability (a number <= 0; Whisper uses -1.0), got {lt!r}"
            )
        if lt is not None and ns is None:
            raise ValueError("logprob_threshold only acts together with no_speech_threshold; give both")
        if "prompt" in options:
            self._prompt_ids(options["prompt"])  # checks it
        return options

    def _language(self, language: Any) -> str:
        tokens = self.tokens
        if not isinstance(language, str):
            raise ValueError(
                f"language must be a string such as 'en' or 'english', got {type(language).__name__}"
            )
        code = language_code(language)
        if code is None:
            raw = language.strip().lower().strip("<|>")
            code = raw if raw in tokens.lang_to_id else None
        if not tokens.multilingual:
            if code != "en":
                raise ValueError(
                    f"language {language!r}: this model is English-only (a '.en' Whisper); use a "
                    "multilingual one such as whisper-base for other languages"
                )
            return code
        if code is None or code not in tokens.lang_to_id:
            known = ", ".join(sorted(tokens.lang_to_id))
            raise ValueError(f"language {language!r} is not one of this model's languages: {known}")
        return code

    def _prompt_ids(self, prompt: Any) -> list[int]:
        if prompt is None:
            return []
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError(f"prompt must be a non-empty string, got {prompt!r}")
        if self.tokens.prev_sot is None:
            raise ValueError("this model has no <|startofprev|> token, so it cannot take a prompt")
        ids = self.tokenizer.encode(" " + prompt.strip(), add_special_tokens=False)
        most = self.tokens.max_target_positions // 2 - 1
        if len(ids) > most:
            raise ValueError(
                f"prompt is {len(ids)} tokens long; Whisper takes at most {most} tokens of prompt, shorten it"
            )
        return [self.tokens.prev_sot, *ids]

    def decode_options(self, options: dict[str, Any]) -> DecodeOptions:
        tokens = self.tokens
        lang = options.get("language")
        task = options.get("task") or "transcribe"
        return DecodeOptions(
            language_id=tokens.lang_to_id[lang] if lang is not None and tokens.multilingual else None,
            task_id=tokens.task_to_id.get(task) if tokens.multilingual else None,
            timestamps=bool(options.get("return_timestamps")),
            max_new_tokens=options.get("max_new_tokens"),
            temperature=float(options.get("temperature") or 0.0),
            prompt_ids=self._prompt_ids(options.get("prompt")),
            no_speech_threshold=options.get("no_speech_threshold"),
            logprob_threshold=options.get("logprob_threshold"),
        )

    # -- inputs -----------------------------------------------------------------------
    def check_input(self, item: Any, i: int) -> Any:
        try:
            return check_audio_input(item, f"input {i}")
        except AudioInputError as e:
            raise PipelineInputError(str(e)) from None

    def load(self, item: Any, i: int) -> torch.Tensor:
        """One input's samples at the model's rate."""
        try:
            samples = load_audio(item, self.feature_config.sampling_rate, name=f"input {i}")
        except AudioInputError as e:
            raise PipelineInputError(str(e)) from None
        return torch.from_numpy(samples)

    def input_features(self, waves: list[torch.Tensor]) -> list[torch.Tensor]:
        """(n_mels, frames) per input: one 30-second window padded with silence for audio up to
        30 s (as transformers' feature extractor pads), the whole spectrogram for longer audio."""
        n = self.feature_config.n_samples
        out: list[torch.Tensor | None] = [None] * len(waves)
        short = [k for k, w in enumerate(waves) if w.shape[0] <= n]
        if short:
            for k, f in zip(short, self.features([waves[k] for k in short])):
                out[k] = f
        for k, w in enumerate(waves):
            if out[k] is None:
                out[k] = self.features.log_mel(w)
        return out  # type: ignore[return-value]

    # -- the call ---------------------------------------------------------------------
    def run(self, items: list[Any], opts: dict[str, Any]) -> list[Any]:
        waves = [self.load(x, i) for i, x in enumerate(items)]
        options = self.decode_options(opts)
        transcripts = transcribe(
            self.model,
            self.tokens,
            self.input_features(waves),
            options,
            batch_size=opts.get("batch_size", self.batch_size),
        )
        return [self.result(t, opts) for t in transcripts]

    def text(self, ids: list[int]) -> str:
        """Decoded text of written tokens; timestamps (which the tokenizer may not have) left out."""
        tb = self.tokens.timestamp_begin
        return self.tokenizer.decode([t for t in ids if tb is None or t < tb], skip_special_tokens=True)

    def result(self, transcript: Transcript, opts: dict[str, Any]) -> dict[str, Any]:
        pieces = [(s, self.text(s.tokens)) for s in transcript.segments]
        out: dict[str, Any] = {"text": "".join(text for _, text in pieces)}
        lang_id = transcript.language_id
        code = next((c for c, i in self.tokens.lang_to_id.items() if i == lang_id), "en")
        language = LANGUAGES.get(code, code)
        if opts.get("return_timestamps"):
            chunks = [
                {"timestamp": (round(s.start, 2), round(s.end, 2)), "text": text}
                for s, text in pieces
                if text
            ]
            if opts.get("return_language"):
                chunks = [{"language": language, **c} for c in chunks]
            out["chunks"] = chunks
        elif opts.get("return_language"):
            out["chunks"] = [{"language": language, "text": out["text"]}]
        return out
