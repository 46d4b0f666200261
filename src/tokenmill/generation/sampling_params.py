"""Per-request decoding parameters, validated on construction."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any

_GREEDY_EPS = 1e-5

# generation_config.json keys that give SamplingParams defaults
_HF_DEFAULT_KEYS = {
    "temperature": "temperature",
    "top_k": "top_k",
    "top_p": "top_p",
    "min_p": "min_p",
    "repetition_penalty": "repetition_penalty",
}


def _check_range(name: str, value: float, lo: float, hi: float, lo_open: bool = False, hi_open: bool = False):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        raise ValueError(f"{name} must be a number, got {value!r}")
    below = value <= lo if lo_open else value < lo
    above = value >= hi if hi_open else value > hi
    if below or above:
        lb = "(" if lo_open else "["
        rb = ")" if hi_open else "]"
        raise ValueError(f"{name} must be in {lb}{lo}, {hi}{rb}, got {value}")


def _check_int(name: str, value: Any, lo: int, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < lo:
        raise ValueError(f"{name} must be an integer >= {lo}, got {value!r}")


@dataclass
class SamplingParams:
    """How to decode one request. Fields left as None take the model's generation_config
    default, then the value documented here.

    Attributes:
        n: sequences to return for the prompt.
        max_tokens: most tokens to generate (default 16).
        min_tokens: EOS and stop ids are suppressed until this many tokens exist.
        temperature: 0 means greedy; default 1.0.
        top_k: keep the k most likely tokens; 0 or -1 keeps all.
        top_p: keep the smallest set whose probability reaches top_p; 1.0 keeps all.
        min_p: drop tokens less likely than min_p times the most likely one.
        repetition_penalty: CTRL's multiplicative penalty on prompt and output tokens (1.0 = off).
        presence_penalty, frequency_penalty: OpenAI's additive penalties on output tokens.
        logit_bias: token id -> value added to its logit.
        seed: per-request seed; the same seed gives the same text whatever else runs.
        stop: strings that end generation; they are not included in the text.
        stop_token_ids: ids that end generation (besides EOS).
        ignore_eos: keep generating past EOS.
        logprobs: return this many top log-probabilities for each generated token.
        skip_special_tokens: leave special tokens out of the text.
    """

    n: int = 1
    max_tokens: int | None = 16
    min_tokens: int = 0
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[int, float] | None = None
    seed: int | None = None
    stop: list[str] | str | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    logprobs: int | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    _resolved: bool = field(default=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        _check_int("n", self.n, 1)
        _check_int("max_tokens", self.max_tokens, 1, allow_none=True)
        _check_int("min_tokens", self.min_tokens, 0)
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise ValueError(
                f"min_tokens must be <= max_tokens, got min_tokens={self.min_tokens} > max_tokens={self.max_tokens}"
            )
        if self.temperature is not None:
            _check_range("temperature", self.temperature, 0.0, 100.0)
        if self.top_k is not None:
            if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < -1:
                raise ValueError(f"top_k must be -1, 0 (disabled) or a positive integer, got {self.top_k!r}")
        if self.top_p is not None:
            _check_range("top_p", self.top_p, 0.0, 1.0, lo_open=True)
        if self.min_p is not None:
            _check_range("min_p", self.min_p, 0.0, 1.0)
        if self.repetition_penalty is not None:
            _check_range("repetition_penalty", self.repetition_penalty, 0.0, 100.0, lo_open=True)
        _check_range("presence_penalty", self.presence_penalty, -2.0, 2.0)
        _check_range("frequency_penalty", self.frequency_penalty, -2.0, 2.0)
        if self.logit_bias is not None:
            if not isinstance(self.logit_bias, dict):
                raise ValueError(
                    f"logit_bias must be a dict of token id -> bias, got {type(self.logit_bias).__name__}"
                )
            clean = {}
            for k, v in self.logit_bias.items():
                try:
                    tok = int(k)
                except (TypeError, ValueError):
                    raise ValueError(f"logit_bias keys must be token ids, got {k!r}") from None
                if isinstance(k, bool) or (not isinstance(k, str) and tok != k):
                    raise ValueError(f"logit_bias keys must be token ids, got {k!r}")  # int(1.5) would be 1
                _check_range(f"logit_bias[{tok}]", v, -100.0, 100.0)
                clean[tok] = float(v)
            self.logit_bias = clean
        if self.seed is not None and (
            isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed < 2**63
        ):
            raise ValueError(f"seed must be an integer in [0, 2**63), got {repr(self.seed)[:40]}")
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if self.stop is not None:
            if not isinstance(self.stop, (list, tuple)) or not all(isinstance(s, str) for s in self.stop):
                raise ValueError(f"stop must be a string or a list of strings, got {self.stop!r}")
            if any(s == "" for s in self.stop):
                raise ValueError("stop strings must not be empty")
        if self.stop_token_ids is not None:
            if not isinstance(self.stop_token_ids, (list, tuple)):
                raise ValueError(f"stop_token_ids must be a list of token ids, got {self.stop_token_ids!r}")
            for t in self.stop_token_ids:
                _check_int("stop_token_ids entries", t, 0)
        if self.logprobs is not None:
            _check_int("logprobs", self.logprobs, 0)
            if self.logprobs > 20:
                raise ValueError(f"logprobs must be in [0, 20], got {self.logprobs}")

    @property
    def greedy(self) -> bool:
        return (self.temperature or 0.0) < _GREEDY_EPS

    def resolved(self, model_defaults: dict[str, Any], vocab_size: int) -> SamplingParams:
        """A copy with every None filled from ``model_defaults`` then the documented default,
        and token ids checked against the vocabulary."""
        values = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "_resolved"}
        sampling_defaults = {
            "temperature": 1.0,
            "top_k": 0,
            "top_p": 1.0,
            "min_p": 0.0,
            "repetition_penalty": 1.0,
        }
        do_sample = model_defaults.get("do_sample")
        for key, hf_key in _HF_DEFAULT_KEYS.items():
            if values[key] is None:
                if key == "temperature" and do_sample is False:
                    values[key] = 0.0  # the model asks for greedy decoding
                elif model_defaults.get(hf_key) is not None:
                    values[key] = model_defaults[hf_key]
                else:
                    values[key] = sampling_defaults[key]
        if values["top_k"] == -1 or values["top_k"] >= vocab_size:
            values["top_k"] = 0  # keeping every token is no filter at all
        for tok in list((values["logit_bias"] or {}).keys()) + list(values["stop_token_ids"] or []):
            if not 0 <= tok < vocab_size:
                raise ValueError(f"token id {tok} is outside the vocabulary [0, {vocab_size})")
        out = SamplingParams(**values)
        out._resolved = True
        return out


@dataclass
class BeamSearchParams:
    """Beam search: keeps ``beam_width`` hypotheses and returns them best first.

    The score of a finished hypothesis is its summed log-probability divided by
    (generated length ** length_penalty), as in transformers.
    """

    beam_width: int = 4
    max_tokens: int = 16
    length_penalty: float = 1.0
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = None
    skip_special_tokens: bool = True

    def __post_init__(self) -> None:
        _check_int("beam_width", self.beam_width, 1)
        _check_int("max_tokens", self.max_tokens, 1)
        _check_range("length_penalty", self.length_penalty, -10.0, 10.0)
