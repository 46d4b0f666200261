"""Tiny random Whisper checkpoints saved as complete Hugging Face model directories.

Each directory holds config.json, model.safetensors, generation_config.json (Whisper's:
languages, tasks, no-timestamps and suppressed tokens), preprocessor_config.json (the
feature extractor) and a byte-level BPE tokenizer trained on a short text, with Whisper's
special tokens and the 1501 timestamp tokens after them, in OpenAI's order. The
directories load in transformers (WhisperForConditionalGeneration, WhisperProcessor,
pipeline("automatic-speech-recognition")) and in tokenmill. Built once per process.
"""

from __future__ import annotations

import atexit
import functools
import json
import shutil
import tempfile

import torch

TEXT = """
The quick brown fox jumps over the lazy dog. A small boat sailed across the quiet bay
in the early morning, and the fishermen waved from the harbour wall. Every evening the
keeper climbed the narrow stairs to light the lamp, and the ships came home safely.
Speech recognition turns sound into text: the model listens to thirty seconds at a time,
writes what it hears, and marks when each sentence starts and ends.
"""

LANGUAGES = ("en", "de", "fr", "es")
#: the special tokens after <|endoftext|>, in Whisper's order (languages after the start token)
TASK_TOKENS = (
    "<|translate|>",
    "<|transcribe|>",
    "<|startoflm|>",
    "<|startofprev|>",
    "<|nocaptions|>",
    "<|notimestamps|>",
)
#: <|0.00|> ... <|30.00|>: 20 ms apart, right after <|notimestamps|>
TIMESTAMPS = tuple(f"<|{i * 0.02:.2f}|>" for i in range(1501))

SMALL = dict(
    d_model=32,
    encoder_layers=2,
    decoder_layers=2,
    encoder_attention_heads=4,
    decoder_attention_heads=4,
    encoder_ffn_dim=64,
    decoder_ffn_dim=64,
    max_source_positions=1500,
    max_target_positions=448,
    init_std=0.3,  # wide enough that greedy outputs vary with the audio
)


def _tempdir(name: str) -> str:
    path = tempfile.mkdtemp(prefix=f"tokenmill-tiny-{name}-")
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    return path


def whisper_tokenizer():
    """transformers' WhisperTokenizer over a small BPE: text, <|endoftext|>, specials, timestamps."""
    import transformers as tf
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    lines = [line.strip() for line in TEXT.strip().splitlines() if line.strip()]
    tok.train_from_iterator(lines, trainer)
    model = json.loads(tok.to_str())["model"]
    vocab = dict(model["vocab"])
    vocab["<|endoftext|>"] = len(vocab)  # the last id of the text vocabulary, as in GPT-2
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    tokenizer = tf.WhisperTokenizer(vocab=vocab, merges=merges)
    specials = ["<|startoftranscript|>", *(f"<|{c}|>" for c in LANGUAGES), *TASK_TOKENS]
    tokenizer.add_special_tokens(
        {"additional_special_tokens": [AddedToken(t, special=True, normalized=False) for t in specials]}
    )
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t in TIMESTAMPS])
    ids = tokenizer.convert_tokens_to_ids(["<|endoftext|>", *specials, TIMESTAMPS[0], TIMESTAMPS[-1]])
    if ids != list(range(ids[0], ids[0] + len(specials) + 1)) + [ids[-3] + 1, ids[-3] + len(TIMESTAMPS)]:
        raise RuntimeError(f"unexpected special token ids: {ids}")
    return tokenizer


def _widen(model) -> None:
    """Random init gives near-uniform logits; spread them so greedy choices are not decided
    by float noise, and keep the sublayers from being drowned by the token embedding."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layer_norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
            elif name.endswith("bias"):
                p.normal_(0, 0.1)
            elif name.endswith(("out_proj.weight", "fc2.weight")):
                p.mul_(3.0)


def generation_config(tokenizer, multilingual: bool) -> dict:
    """generation_config.json as Whisper checkpoints hold it."""
    tid = tokenizer.convert_tokens_to_ids
    eot = tid("<|endoftext|>")
    gen = dict(
        bos_token_id=eot,
        eos_token_id=eot,
        pad_token_id=eot,
        decoder_start_token_id=tid("<|startoftranscript|>"),
        no_timestamps_token_id=tid("<|notimestamps|>"),
        prev_sot_token_id=tid("<|startofprev|>"),
        suppress_tokens=[],
        begin_suppress_tokens=[tid("Ġ"), eot],
        max_initial_timestamp_index=50,
        max_length=448,
        return_timestamps=False,
        is_multilingual=multilingual,
        alignment_heads=[[1, 0], [1, 1]],
    )
    if multilingual:
        gen["lang_to_id"] = {f"<|{c}|>": tid(f"<|{c}|>") for c in LANGUAGES}
        gen["task_to_id"] = {"transcribe": tid("<|transcribe|>"), "translate": tid("<|translate|>")}
    return gen


@functools.cache
def whisper_dir(multilingual: bool = True, num_mel_bins: int = 80, seed: int | None = None) -> str:
    """A tiny random Whisper (multilingual like base, or English-only like tiny.en).

    The default seeds give varied greedy output (some seeds repeat one token).
    """
    import transformers as tf

    tokenizer = whisper_tokenizer()
    gen = generation_config(tokenizer, multilingual)
    torch.manual_seed((0 if multilingual else 1) if seed is None else seed)
    cfg = tf.WhisperConfig(
        vocab_size=len(tokenizer),
        num_mel_bins=num_mel_bins,
        **SMALL,
        pad_token_id=gen["pad_token_id"],
        bos_token_id=gen["bos_token_id"],
        eos_token_id=gen["eos_token_id"],
        decoder_start_token_id=gen["decoder_start_token_id"],
        suppress_tokens=gen["suppress_tokens"],
        begin_suppress_tokens=gen["begin_suppress_tokens"],
    )
    model = tf.WhisperForConditionalGeneration(cfg).eval()
    _widen(model)
    with torch.no_grad():
        # Timestamp logits small (the output projection is the embedding): a random model
        # then writes text tokens unless timestamps are asked for, where the timestamp
        # rules of generation still force them.
        model.model.decoder.embed_tokens.weight[gen["no_timestamps_token_id"] + 1 :] *= 0.05
    model.generation_config = tf.GenerationConfig(**gen)
    name = f"whisper-{'multi' if multilingual else 'en'}-{num_mel_bins}-{seed}"
    path = _tempdir(name)
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    tf.WhisperFeatureExtractor(feature_size=num_mel_bins).save_pretrained(path)
    return path
