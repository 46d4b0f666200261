"""Whisper's decoding: prompts, language detection, timestamp rules and long-form seeking.

One input's log-Mel features are read in 30-second windows. A window is encoded, the
decoder starts from its prompt

    [<|startofprev|> prompt text...] <|startoftranscript|> [<|lang|> <|task|>] [<|notimestamps|>]

(language and task only for multilingual models; the language is detected from the first
window where none is given) and writes text, or text between timestamp tokens
(``<|0.00|>`` ... ``<|30.00|>``, 20 ms apart, numbered after ``<|notimestamps|>``).

Audio longer than one window is transcribed with Whisper's sequential long-form method, as
OpenAI's ``transcribe`` and transformers' ``generate`` do: the next window starts where the
last complete segment of this one ended (an unfinished segment is decoded again, whole,
from its start), so no word is cut at a window seam and none is written twice.

Greedy decoding is equal to transformers' ``WhisperForConditionalGeneration.generate``
(same prompt, the same logits processors in the same order, the same segment splitting and
seeking); windows of different inputs run through the encoder and decoder together.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

#: seconds per timestamp token, and per encoder position
TIME_PRECISION = 0.02
#: feature frames per encoder position (the second convolution's stride)
INPUT_STRIDE = 2


@dataclass(frozen=True)
class WhisperTokens:
    """The special ids and decoding defaults of one checkpoint (its generation_config.json)."""

    sot: int
    eot: int
    no_timestamps: int | None
    prev_sot: int | None
    #: ``<|nospeech|>`` (``<|nocaptions|>`` in older vocabularies): its probability after
    #: ``<|startoftranscript|>`` says how likely a window holds no speech
    no_speech: int | None
    #: language code ("en") -> token id; empty for English-only models
    lang_to_id: dict[str, int]
    task_to_id: dict[str, int]
    multilingual: bool
    suppress_tokens: tuple[int, ...]
    begin_suppress_tokens: tuple[int, ...]
    max_initial_timestamp_index: int | None
    #: decoder positions a window's prompt and text may fill
    max_length: int
    max_target_positions: int

    @property
    def timestamp_begin(self) -> int | None:
        """The id of ``<|0.00|>``: timestamps follow ``<|notimestamps|>``."""
        return None if self.no_timestamps is None else self.no_timestamps + 1

    @classmethod
    def from_loaded(cls, config: Any, gen: dict[str, Any], tokenizer: Any = None) -> WhisperTokens:
        """From a WhisperConfig, the generation defaults and (for ids the defaults lack) the tokenizer."""

        def token(name: str) -> int | None:
            return tokenizer.token_to_id(name) if tokenizer is not None else None

        eot = gen.get("eos_token_id", config.eos_token_id)
        eot = eot[0] if isinstance(eot, (list, tuple)) else eot
        lang_to_id = {k.strip("<|>"): int(v) for k, v in (gen.get("lang_to_id") or {}).items()}
        no_ts = gen.get("no_timestamps_token_id", token("<|notimestamps|>"))
        no_speech = token("<|nospeech|>")
        if no_speech is None:
            no_speech = token("<|nocaptions|>")
        if no_speech is None and no_ts is not None:
            no_speech = int(no_ts) - 1  # where every released vocabulary puts it
        return cls(
            sot=int(gen.get("decoder_start_token_id", config.decoder_start_token_id)),
            eot=int(eot),
            no_timestamps=None if no_ts is None else int(no_ts),
            prev_sot=gen.get("prev_sot_token_id", token("<|startofprev|>")),
            no_speech=no_speech,
            lang_to_id=lang_to_id,
            task_to_id={k: int(v) for k, v in (gen.get("task_to_id") or {}).items()},
            multilingual=bool(gen.get("is_multilingual", bool(lang_to_id))),
            suppress_tokens=tuple(gen.get("suppress_tokens", config.suppress_tokens) or ()),
            begin_suppress_tokens=tuple(gen.get("begin_suppress_tokens", config.begin_suppress_tokens) or ()),
            max_initial_timestamp_index=gen.get("max_initial_timestamp_index"),
            max_length=min(int(gen.get("max_length") or 448), config.max_target_positions),
            max_target_positions=config.max_target_positions,
        )


@dataclass
class DecodeOptions:
    """How to decode every window of one call.

    Args:
        language_id: the language token; None detects it per input (multilingual models).
        task_id: ``<|transcribe|>`` or ``<|translate|>`` (multilingual models only).
        timestamps: segment timestamps; always on for audio over one window.
        max_new_tokens: most tokens written per window (default: as many as fit).
        temperature: 0 decodes greedily; above 0 samples.
        prompt_ids: ``<|startofprev|>`` and the prompt's tokens, before every window's prompt.
        no_speech_threshold: a window whose ``<|nospeech|>`` probability is above this, and
            whose text has an average log-probability below ``logprob_threshold`` (when that
            is set), is taken as silence: it gives no text. None keeps every window's text.
        logprob_threshold: see ``no_speech_threshold``.
    """

    language_id: int | None = None
    task_id: int | None = None
    timestamps: bool = False
    max_new_tokens: int | None = None
    temperature: float = 0.0
    prompt_ids: list[int] = field(default_factory=list)
    generator: torch.Generator | None = None
    no_speech_threshold: float | None = None
    logprob_threshold: float | None = None


@dataclass
class Segment:
    """Text between two timestamps (seconds from the start of the input), tokens as written."""

    start: float
    end: float
    tokens: list[int]


@dataclass
class Transcript:
    segments: list[Segment]
    language_id: int | None

    @property
    def tokens(self) -> list[int]:
        return [t for s in self.segments for t in s.tokens]


@dataclass
class _Input:
    features: torch.Tensor  # (n_mels, frames)
    max_frames: int
    language_id: int | None
    seek: int = 0
    segments: list[Segment] = field(default_factory=list)


def transcribe(
    model: Any,
    tokens: WhisperTokens,
    features: Sequence[torch.Tensor],
    options: DecodeOptions,
    *,
    batch_size: int = 8,
) -> list[Transcript]:
    """Decode each input's features (``(n_mels, frames)``; one window of 3000 frames, padded
    with silence, for audio up to 30 s) into timed segments.

    ``batch_size`` windows, from as many inputs, run through the model together; an input
    that is done leaves its place to the next.
    """
    n_frames = 2 * model.config.max_source_positions
    inputs = [_Input(f, max(f.shape[-1], 1), options.language_id) for f in features]
    # Long audio needs timestamps to seek by, so it always decodes with them; its prompt has
    # no <|notimestamps|>, so it runs apart from short inputs that asked for none.
    groups: dict[bool, list[_Input]] = {}
    for x in inputs:
        groups.setdefault(options.timestamps or x.max_frames > n_frames, []).append(x)
    for timestamps, group in groups.items():
        pending = list(group)
        while pending:
            rows = pending[:batch_size]
            _decode_windows(model, tokens, rows, options, timestamps, n_frames)
            pending = [x for x in pending if x.seek < x.max_frames]
    return [Transcript(x.segments, x.language_id) for x in inputs]


def _window(x: _Input, n_frames: int) -> torch.Tensor:
    """The next window of ``x``, padded with zeros (as transformers pads long-form windows)."""
    w = x.features[:, x.seek : x.seek + min(n_frames, x.max_frames - x.seek)]
    return torch.nn.functional.pad(w, (0, n_frames - w.shape[-1])) if w.shape[-1] < n_frames else w


def _prompt(
    tokens: WhisperTokens, options: DecodeOptions, language_id: int | None, timestamps: bool
) -> list[int]:
    ids = [*options.prompt_ids, tokens.sot]
    if tokens.multilingual:
        ids += [i for i in (language_id, options.task_id) if i is not None]
    if not timestamps and tokens.no_timestamps is not None:
        ids.append(tokens.no_timestamps)
    return ids


@torch.inference_mode()
def _decode_windows(
    model: Any,
    tokens: WhisperTokens,
    rows: list[_Input],
    options: DecodeOptions,
    timestamps: bool,
    n_frames: int,
) -> None:
    device = next(model.parameters()).device
    windows = torch.stack([_window(x, n_frames) for x in rows]).to(device)  # (B, n_mels, 3000)
    hidden = model.encode(windows)  # (B, 1500, C)
    need = [
        i for i, x in enumerate(rows) if x.language_id is None and tokens.multilingual and tokens.lang_to_id
    ]
    if need:
        for i, lang in zip(need, detect_language(model, tokens, hidden[need])):
            rows[i].language_id = lang
    prompts = [_prompt(tokens, options, x.language_id, timestamps) for x in rows]
    P = len(prompts[0])
    limit = min(tokens.max_length + min(tokens.max_target_positions // 2 - 1, P), tokens.max_target_positions)
    room = tokens.max_target_positions - P
    if room < 1 or (options.max_new_tokens is not None and options.max_new_tokens > room):
        raise ValueError(
            f"max_new_tokens must be at most {room}: the decoder prompt takes {P} of Whisper's "
            f"{tokens.max_target_positions} positions, got {options.max_new_tokens}"
            if room >= 1
            else f"the decoder prompt is {P} tokens long and leaves no room to write within "
            f"Whisper's {tokens.max_target_positions} positions; shorten the prompt"
        )
    max_new = limit - P if options.max_new_tokens is None else options.max_new_tokens
    cache = model.start_decoding(hidden, capacity=P + max_new)
    written, silent = _generate(model, tokens, cache, prompts, max_new, options, timestamps, device)
    for x, seq, skip in zip(rows, written, silent):
        window_frames = min(n_frames, x.max_frames - x.seek)
        if skip:  # what Whisper writes for a silent window is made up ("you", "."): drop it
            x.seek += window_frames
            continue
        segments, advance = split_segments(seq, tokens.timestamp_begin, x.seek, window_frames)
        x.segments += segments
        x.seek += advance if advance > 0 else window_frames


def detect_language(model: Any, tokens: WhisperTokens, hidden: torch.Tensor) -> list[int]:
    """The most likely language token after ``<|startoftranscript|>``, per encoded window."""
    cache = model.start_decoding(hidden, capacity=1)
    sot = torch.full((hidden.shape[0], 1), tokens.sot, dtype=torch.long, device=hidden.device)
    logits = model.decode(sot, cache)[:, -1].float()  # (B, V)
    langs = torch.tensor(sorted(tokens.lang_to_id.values()), device=logits.device)
    return langs[logits.index_select(1, langs).argmax(dim=-1)].tolist()


def _generate(
    model: Any,
    tokens: WhisperTokens,
    cache: Any,
    prompts: list[list[int]],
    max_new: int,
    options: DecodeOptions,
    timestamps: bool,
    device: torch.device,
) -> tuple[list[list[int]], list[bool]]:
    """Each row's written tokens (EOT dropped), greedy or sampled, and whether the row is
    silence by ``options.no_speech_threshold``."""
    B = len(prompts)
    check_speech = options.no_speech_threshold is not None and tokens.no_speech is not None
    # of each chosen token, EOT included, after the rules (as Whisper scores); kept on the
    # device so the check adds no host sync to a step
    sum_logprob = torch.zeros(B, device=device)
    neg = float("-inf")
    suppress = torch.tensor(tokens.suppress_tokens, dtype=torch.long, device=device)
    begin = torch.tensor(tokens.begin_suppress_tokens, dtype=torch.long, device=device)
    rules = TimestampRules(tokens, device) if timestamps else None
    out: list[list[int]] = [[] for _ in range(B)]
    alive = list(range(B))
    alive_rows = torch.arange(B, device=device)
    step_ids = torch.tensor(prompts, dtype=torch.long, device=device)  # (B, P): the prompt in one step
    no_speech_prob = [0.0] * B
    for step in range(max_new):
        all_logits = model.decode(step_ids, cache)
        if step == 0 and check_speech:
            sot_at = len(options.prompt_ids)  # the prompt's position of <|startoftranscript|>
            probs = all_logits[:, sot_at].float().softmax(dim=-1)[:, tokens.no_speech]
            no_speech_prob = probs.tolist()
        logits = all_logits[:, -1].float()  # (A, V)
        # transformers' order: begin-suppress, suppress, timestamp rules
        if step == 0 and begin.numel():
            logits.index_fill_(1, begin, neg)
        if suppress.numel():
            logits.index_fill_(1, suppress, neg)
        if rules is not None:
            logits = rules(logits, [out[r] for r in alive], first=step == 0)
        if options.temperature > 0:
            probs = torch.softmax(logits / options.temperature, dim=-1)
            noise = torch.empty_like(probs).exponential_(generator=options.generator)
            chosen = (probs / noise).argmax(dim=-1)  # a sample from probs
        else:
            chosen = logits.argmax(dim=-1)
        if check_speech:
            lp = logits.log_softmax(dim=-1).gather(1, chosen.unsqueeze(1)).squeeze(1)
            sum_logprob.index_add_(0, alive_rows, lp)
        next_ids = chosen.tolist()
        keep = []
        for a, r in enumerate(alive):
            if next_ids[a] == tokens.eot:
                continue
            out[r].append(next_ids[a])
            keep.append(a)
        if not keep:
            break
        if len(keep) != len(alive):
            kept = torch.tensor(keep, dtype=torch.long, device=device)
            cache.select_rows(kept)
            alive = [alive[a] for a in keep]
            alive_rows = alive_rows[kept]
        step_ids = torch.tensor([[next_ids[a]] for a in keep], dtype=torch.long, device=device)
    silent = [False] * B
    if check_speech:
        sums = sum_logprob.tolist()
        for r in range(B):
            avg = sums[r] / (len(out[r]) + 1)  # +1: the EOT, as Whisper averages
            silent[r] = no_speech_prob[r] > options.no_speech_threshold and (
                options.logprob_threshold is None or avg < options.logprob_threshold
            )
    return out, silent


class TimestampRules:
    """Whisper's timestamp constraints on next-token logits (rows, vocab):

    - ``<|notimestamps|>`` is never written; the first token is a timestamp, at most
      ``max_initial_timestamp_index`` steps (1 s) in;
    - timestamps come in pairs (the end of one segment, the start of the next), except a
      single one right before the end of text;
    - timestamps never go back, and a closed pair is not repeated;
    - where the timestamps together are more likely than the likeliest text token, a
      timestamp is written.
    """

    def __init__(self, tokens: WhisperTokens, device: torch.device) -> None:
        if tokens.timestamp_begin is None:
            raise ValueError(
                "this model's generation config has no <|notimestamps|> id, so it cannot write timestamps"
            )
        self.begin = tokens.timestamp_begin
        self.no_timestamps = tokens.no_timestamps
        self.eot = tokens.eot
        self.max_initial = tokens.max_initial_timestamp_index
        self.device = device

    def __call__(self, logits: torch.Tensor, written: list[list[int]], first: bool) -> torch.Tensor:
        tb, neg = self.begin, float("-inf")
        logits[:, self.no_timestamps] = neg
        no_ts, no_text, lowest = [], [], []
        for k, seq in enumerate(written):
            last = len(seq) >= 1 and seq[-1] >= tb
            penultimate = len(seq) < 2 or seq[-2] >= tb
            if last:
                (no_ts if penultimate else no_text).append(k)
            low = tb
            previous = next((t for t in reversed(seq) if t >= tb), None)
            if previous is not None:
                # an open pair may close on the same time; otherwise time moves on
                low = previous if last and not penultimate else previous + 1
            lowest.append(low)
        if no_ts:
            logits[no_ts, tb:] = neg
        if no_text:
            logits[no_text, : self.eot] = neg
        vocab = torch.arange(logits.shape[-1], device=logits.device)
        floor = torch.tensor(lowest, device=logits.device).unsqueeze(-1)
        logits.masked_fill_((vocab >= tb) & (vocab < floor), neg)
        if first:
            logits[:, :tb] = neg
            if self.max_initial is not None:
                logits[:, tb + self.max_initial + 1 :] = neg
        logprobs = torch.log_softmax(logits, dim=-1)
        timestamp_mass = logprobs[:, tb:].logsumexp(dim=-1)
        best_text = logprobs[:, :tb].max(dim=-1).values
        logits[:, :tb].masked_fill_((timestamp_mass > best_text).unsqueeze(-1), neg)
        return logits


def split_segments(
    seq: list[int], timestamp_begin: int | None, seek: int, window_frames: int
) -> tuple[list[Segment], int]:
    """One window's written tokens as segments, and how many frames the next window moves on.

    Pairs of timestamps end one segment and start the next. A window whose text ends in a
    closed pair stops there: what follows was cut off by the window's end and is decoded
    again from the start of the next window. Without any pair, the window is one segment.
    """
    offset = seek * TIME_PRECISION / INPUT_STRIDE  # seconds before this window
    tb = timestamp_begin if timestamp_begin is not None else 1 << 62
    is_ts = [t >= tb for t in seq]
    single_ending = is_ts[-2:] == [False, True]
    cuts = [i + 1 for i in range(len(seq) - 1) if is_ts[i] and is_ts[i + 1]]
    if not cuts:
        end = int(window_frames * 0.01 / TIME_PRECISION)  # in timestamp steps (20 ms)
        stamps = [t for t, ts in zip(seq, is_ts) if ts]
        if stamps and stamps[-1] != tb:
            end = stamps[-1] - tb  # no pair, but a last timestamp: the text ends there
        return [Segment(offset, offset + end * TIME_PRECISION, list(seq))], window_frames
    if single_ending:
        cuts.append(len(seq))
    else:
        cuts[-1] += 1  # the closing pair stays with the last segment
    segments, last = [], 0
    for i, cut in enumerate(cuts):
        piece = seq[last:cut]
        end_at = -1 if i < len(cuts) - 1 or single_ending else -2
        segments.append(
            Segment(
                offset + (piece[0] - tb) * TIME_PRECISION,
                offset + (piece[end_at] - tb) * TIME_PRECISION,
                piece,
            )
        )
        last = cut
    if single_ending:
        return segments, window_frames  # nothing after the last timestamp: the window is done
    return segments, (seq[last - 2] - tb) * INPUT_STRIDE
