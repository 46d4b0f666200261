"""Whisper speech recognition, tokenmill against transformers, in one run on the same audio.

Both models hold the same weights: tokenmill loads the packaged CTranslate2 file
(``whisper-tiny.en``, ``whisper-base``); transformers' ``WhisperForConditionalGeneration``
gets the same float16 values as float32 tensors, through tokenmill's CTranslate2 name
table. Both compute in float32 with the same threads.

The audio is about 60 seconds of speech that espeak-ng reads from the text below,
resampled to 16 kHz: two 30-second windows. Each library transcribes both windows in one
batch, greedily, without timestamps, with the checkpoint's suppressed tokens, up to
``--max-new-tokens`` tokens: ``generate()`` for transformers, ``greedy_decode`` for
tokenmill. The clock includes the log-Mel features (each library's own extractor).

Reported per model: the real-time factor (seconds of processing per second of audio;
lower is faster), the encoder's time per window, the decoder's time per step (one token
for each window) and the speedup, medians over ``--rounds`` interleaved rounds. The two
transcripts must be the same; a word diff is printed where they are not.

Then the long-form comparison (``bench_long_form``): the whole clip through each library's
sequential long-form decoding with timestamps, one window at a time, as a user transcribing
a file gets it.

    python benchmarks/bench_whisper.py [--rounds 3] [--threads 2] [--models whisper-base] [--no-long-form]
"""

from __future__ import annotations

import argparse
import difflib
import io
import json
import platform
import shutil
import statistics
import subprocess
import sys
import time

import numpy as np
import torch

TEXT = """\
The lighthouse stood on a rocky point at the edge of the harbour. Every evening the keeper \
climbed the narrow stairs and lit the great lamp, and the fishing boats came home safely \
through the dark water.

In the spring the village held a market on the square. Farmers brought cheese, bread and \
fresh fruit and vegetables, and children ran between the stalls while musicians played near \
the old fountain.

The railway reached the valley in the last century. Before that, goods travelled by cart over \
the mountain pass, a journey of three days in good weather and a week when the snow came early.

Scientists who study the weather use satellites, balloons and ground stations to measure \
temperature, pressure and wind. Their computer models divide the atmosphere into millions of \
small boxes and predict how each one will change over the next few hours.
"""

SR = 16_000
WINDOW = 30 * SR


def speech(text: str) -> np.ndarray:
    """espeak-ng's reading of ``text`` at 16 kHz, a little space between words (-g 8)."""
    import soundfile as sf
    from scipy.signal import resample_poly

    if shutil.which("espeak-ng") is None:
        sys.exit("espeak-ng is not installed: apt-get install -y espeak-ng")
    wav = subprocess.run(["espeak-ng", "-g", "8", "--stdout", text], capture_output=True, check=True).stdout
    audio, rate = sf.read(io.BytesIO(wav), dtype="float32")
    return resample_poly(audio, SR, rate).astype(np.float32)


def transformers_model(loaded):
    """transformers' Whisper with the values of the CTranslate2 file tokenmill loaded."""
    import transformers

    from tokenmill.weights.ctranslate2 import map_to_hf, read_model_bin

    ct2 = read_model_bin(f"{loaded.source}/model.bin")
    drop = ("architectures", "torch_dtype")
    cfg = transformers.WhisperConfig(**{k: v for k, v in loaded.hf_config.items() if k not in drop})
    hf = transformers.WhisperForConditionalGeneration(cfg).eval()
    missing, unexpected = hf.load_state_dict(dict(map_to_hf(ct2, torch.float32)), strict=False)
    if unexpected or set(missing) - {"proj_out.weight"}:  # proj_out is tied to the embeddings
        raise RuntimeError(f"weights do not fit transformers' model: {missing} {unexpected}")
    hf.generation_config = transformers.GenerationConfig(**loaded.generation_defaults)
    return hf


class Pair:
    """One checkpoint in both libraries, and a transcription function for each."""

    def __init__(self, name: str, windows: list[np.ndarray], max_new_tokens: int) -> None:
        import transformers

        from tokenmill.audio import FeatureConfig, WhisperFeatureExtractor
        from tokenmill.weights.task_loader import load_task_model

        self.name = name
        self.windows = windows
        self.loaded = load_task_model(name, "speech-seq2seq")
        self.hf = transformers_model(self.loaded)
        g = self.loaded.generation_defaults
        self.gen = g
        self.prompt = [g["decoder_start_token_id"]]
        self.hf_kwargs: dict = {}
        if g["is_multilingual"]:
            self.prompt += [g["lang_to_id"]["<|en|>"], g["task_to_id"]["transcribe"]]
            self.hf_kwargs = {"language": "en", "task": "transcribe"}
        self.prompt.append(g["no_timestamps_token_id"])
        self.max_new_tokens = max_new_tokens
        n_mels = self.loaded.config.num_mel_bins
        self.fe = WhisperFeatureExtractor(FeatureConfig(n_mels=n_mels))
        self.hf_fe = transformers.WhisperFeatureExtractor(feature_size=n_mels)

    def ours(self) -> list[list[int]]:
        from tokenmill.models.whisper import greedy_decode

        return greedy_decode(
            self.loaded.model,
            self.fe(self.windows, sampling_rate=SR),
            self.prompt,
            max_new_tokens=self.max_new_tokens,
            suppress_tokens=self.gen["suppress_tokens"],
            begin_suppress_tokens=self.gen["begin_suppress_tokens"],
        )

    def theirs(self) -> list[list[int]]:
        features = self.hf_fe(self.windows, sampling_rate=SR, return_tensors="pt").input_features
        with torch.inference_mode():
            out = self.hf.generate(
                features,
                do_sample=False,
                num_beams=1,
                max_new_tokens=self.max_new_tokens,
                return_timestamps=False,
                **self.hf_kwargs,
            )
        return out.tolist()

    def encoders(self) -> tuple[float, float]:
        """Seconds for one encoder pass over the windows: tokenmill's, transformers'."""
        features = self.fe(self.windows, sampling_rate=SR)
        with torch.inference_mode():
            t0 = time.perf_counter()
            self.loaded.model.encode(features)
            t1 = time.perf_counter()
            self.hf.model.encoder(features)
            t2 = time.perf_counter()
        return t1 - t0, t2 - t1

    def text(self, ids: list[list[int]]) -> str:
        return " ".join(self.loaded.tokenizer.decode(row, skip_special_tokens=True).strip() for row in ids)


def bench_long_form(pair: Pair, audio: np.ndarray, rounds: int) -> dict:
    """The whole clip at once, Whisper's sequential long-form method in both libraries: each
    30-second window is decoded with timestamps and the next starts at the last complete
    segment. tokenmill through ``pipeline("automatic-speech-recognition")``; transformers
    through ``generate(return_timestamps=True)`` on the unpadded features, as its pipeline
    does for audio over 30 s. Greedy, no temperature fallback, not conditioned on earlier text."""
    from tokenmill import pipeline

    pipe = pipeline("automatic-speech-recognition", model=pair.name)
    kwargs = {"language": "en"} if pair.gen["is_multilingual"] else {}

    def ours() -> str:
        return pipe(audio, **kwargs)["text"].strip()

    def theirs() -> str:
        f = pair.hf_fe(
            audio,
            sampling_rate=SR,
            return_tensors="pt",
            truncation=False,
            padding="longest",
            return_attention_mask=True,
        )
        with torch.inference_mode():
            out = pair.hf.generate(
                f.input_features,
                attention_mask=f.attention_mask,
                return_timestamps=True,
                do_sample=False,
                num_beams=1,
                **pair.hf_kwargs,
            )
        return pair.loaded.tokenizer.decode(out[0].tolist(), skip_special_tokens=True).strip()

    ours_text, their_text = ours(), theirs()  # warm-up
    times: dict[str, list[float]] = {"tokenmill": [], "transformers": []}
    for r in range(rounds):
        order = [("tokenmill", ours), ("transformers", theirs)]
        for label, fn in order if r % 2 == 0 else order[::-1]:
            t0 = time.perf_counter()
            fn()
            times[label].append(time.perf_counter() - t0)
    seconds = len(audio) / SR
    res: dict = {"model": pair.name}
    for label in times:
        total = statistics.median(times[label])
        res[label] = {"seconds": round(total, 3), "rtf": round(total / seconds, 4)}
    res["speedup"] = round(
        statistics.median(b / a for a, b in zip(times["tokenmill"], times["transformers"])), 2
    )
    res["same_transcript"] = ours_text == their_text
    res["transcript"] = ours_text
    if ours_text != their_text:
        res["diff"] = word_diff(ours_text, their_text)
    return res


def steps(ids: list[list[int]], eos: int) -> int:
    """Decoder steps of a batched greedy run: the longest row, EOS counted, padding not."""
    return max((row.index(eos) + 1 if eos in row else len(row)) for row in ids)


def word_diff(a: str, b: str) -> str:
    return "\n".join(
        difflib.unified_diff(a.split(), b.split(), "tokenmill", "transformers", lineterm="", n=3)
    )


def bench(pair: Pair, rounds: int, audio_seconds: float) -> dict:
    eos = pair.loaded.config.eos_token_id
    t0 = time.perf_counter()
    ours_ids = pair.ours()  # warm-up: the first call builds kernels and weight copies
    first_call = time.perf_counter() - t0
    their_ids = pair.theirs()
    ours_text, their_text = pair.text(ours_ids), pair.text(their_ids)
    # the same transcript takes the same steps; transformers' output may drop the last EOS
    n_ours = steps(ours_ids, eos)
    n_theirs = n_ours if ours_text == their_text else steps(their_ids, eos)
    times: dict[str, list[float]] = {"tokenmill": [], "transformers": []}
    enc: dict[str, list[float]] = {"tokenmill": [], "transformers": []}
    for r in range(rounds):
        order = [("tokenmill", pair.ours), ("transformers", pair.theirs)]
        for label, fn in order if r % 2 == 0 else order[::-1]:
            t0 = time.perf_counter()
            fn()
            times[label].append(time.perf_counter() - t0)
        e_ours, e_theirs = pair.encoders()
        enc["tokenmill"].append(e_ours)
        enc["transformers"].append(e_theirs)
    windows = len(pair.windows)
    res: dict = {"model": pair.name, "windows": windows, "first_call_s": round(first_call, 3)}
    for label, n in (("tokenmill", n_ours), ("transformers", n_theirs)):
        total, encoder = statistics.median(times[label]), statistics.median(enc[label])
        res[label] = {
            "seconds": round(total, 3),
            "rtf": round(total / audio_seconds, 4),
            "encoder_ms_per_window": round(1000 * encoder / windows, 1),
            "decoder_steps": n,
            # what remains after the encoder: features, cross-attention K/V, the steps
            "decoder_ms_per_step": round(1000 * (total - encoder) / n, 2),
        }
    res["speedup"] = round(
        statistics.median(b / a for a, b in zip(times["tokenmill"], times["transformers"])), 2
    )
    res["same_transcript"] = ours_text == their_text
    res["transcript"] = ours_text
    if ours_text != their_text:
        res["diff"] = word_diff(ours_text, their_text)
    return res


def _print_transcripts(res: dict) -> None:
    if res["same_transcript"]:
        print(f"  transcripts identical: {res['transcript']}")
    else:
        print(f"  TRANSCRIPTS DIFFER:\n{res['diff']}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--models", nargs="+", default=["whisper-tiny.en", "whisper-base"])
    ap.add_argument("--max-new-tokens", type=int, default=200)
    ap.add_argument("--no-long-form", action="store_true", help="only the two windows in one batch")
    ap.add_argument("--json", action="store_true", help="print the results as JSON too")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    import transformers

    transformers.logging.set_verbosity_error()
    audio = speech(TEXT)
    seconds = len(audio) / SR
    windows = [audio[i : i + WINDOW] for i in range(0, len(audio), WINDOW)]
    print(
        f"audio: {seconds:.1f} s of espeak-ng speech, {len(windows)} windows; torch {torch.__version__}, "
        f"transformers {transformers.__version__}, {args.threads} threads, {platform.processor() or platform.machine()}"
    )
    results = []
    for name in args.models:
        pair = Pair(name, windows, args.max_new_tokens)
        res = bench(pair, args.rounds, seconds)
        if not args.no_long_form:
            res["long_form"] = bench_long_form(pair, audio, args.rounds)
        results.append(res)
        a, b = res["tokenmill"], res["transformers"]
        print(
            f"\n{name}: {res['windows']} windows, float32, greedy, no timestamps; first tokenmill call {res['first_call_s']} s"
        )
        print(
            f"  {'':13} {'RTF':>7} {'seconds':>8} {'encoder ms/window':>18} {'decoder ms/step':>16} {'steps':>6}"
        )
        for label, r in (("tokenmill", a), ("transformers", b)):
            print(
                f"  {label:13} {r['rtf']:7.4f} {r['seconds']:8.3f} {r['encoder_ms_per_window']:18.1f} "
                f"{r['decoder_ms_per_step']:16.2f} {r['decoder_steps']:6d}"
            )
        print(f"  speedup (median of per-round ratios): {res['speedup']}x")
        _print_transcripts(res)
        long = res.get("long_form")
        if long is not None:
            a, b = long["tokenmill"], long["transformers"]
            print(f"{name}, long-form (the whole clip, sequential windows, timestamps):")
            for label, r in (("tokenmill", a), ("transformers", b)):
                print(f"  {label:13} RTF {r['rtf']:7.4f} {r['seconds']:8.3f} s")
            print(f"  speedup (median of per-round ratios): {long['speedup']}x")
            _print_transcripts(long)
    if args.json:
        print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
