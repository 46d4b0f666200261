"""Rebuilding a model's tokenizer from GGUF metadata.

A GGUF file carries no ``tokenizer.json``: it stores the vocabulary, merges or scores, token types and
special token ids under llama.cpp's ``tokenizer.ggml.*`` keys. We turn those back into a
``tokenizers.Tokenizer`` so encoding runs in Rust like every other tokenmill tokenizer.

Two vocabulary kinds are supported:

- ``gpt2``: byte-level BPE. The merges are in the file; how text is split before merging depends on
  ``tokenizer.ggml.pre`` (the regex the model was trained with).
- ``llama``: SentencePiece-style BPE with byte fallback. The file has scores but no merges, so the
  merges are derived from the vocabulary: every way to cut a token into two tokens is a merge, ranked
  by the token's score (for Gemma, by its position; see ``_POSITION_RANKED``).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from tokenmill.tokenization.tokenizer import Tokenizer
from tokenmill.weights.errors import ModelLoadError

logger = logging.getLogger(__name__)

# llama.cpp's token types (gguf.TokenType)
_NORMAL, _CONTROL, _USER_DEFINED, _BYTE = 1, 3, 4, 6

SUPPORTED_MODELS = ("gpt2", "llama")

# Pre-tokenizer regexes, written from the splits each model family was trained with.
_GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# diff vs Llama 3: digits one at a time
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# tokenizer.ggml.pre -> (split regex, digits split one by one first, ignore_merges)
# ignore_merges: a word that is itself in the vocabulary is one token (Llama 3 does this, llama.cpp too).
_PRE_TOKENIZERS: dict[str, tuple[str, bool, bool]] = {
    "default": (_GPT2_SPLIT, False, False),
    "gpt-2": (_GPT2_SPLIT, False, False),
    "gpt2": (_GPT2_SPLIT, False, False),
    "smollm": (_GPT2_SPLIT, True, False),
    "starcoder": (_GPT2_SPLIT, True, False),
    "llama3": (_LLAMA3_SPLIT, False, True),
    "llama-v3": (_LLAMA3_SPLIT, False, True),
    "llama-bpe": (_LLAMA3_SPLIT, False, True),
    "qwen2": (_QWEN2_SPLIT, False, False),
    "deepseek-r1-qwen": (_QWEN2_SPLIT, False, False),
}

# These files list their merges in vocabulary order, and their scores do not follow it: user-defined
# tokens such as "  " score -1000 yet merge first. Their multi-space tokens are also stored as real
# spaces, where the text they are matched against has "▁".
_POSITION_RANKED = ("gemma", "gemma2", "gemma3")

# Control tokens that end a turn; generation stops on them even when the file names no eot id.
_END_OF_TURN = ("<end_of_turn>", "<|eot_id|>", "<|eom_id|>", "<|im_end|>", "<|end|>")


def tokenizer_from_gguf(meta: dict[str, Any]) -> Tokenizer:
    """Build the tokenizer a GGUF file describes.

    Args:
        meta: the file's metadata (``GGUFFile.metadata``), with ``tokenizer.ggml.*`` keys.

    Returns:
        A ``Tokenizer`` whose ``encode(text)`` adds BOS/EOS as the file's ``add_bos_token`` /
        ``add_eos_token`` flags say, and whose special and user-defined tokens are never split.
    """
    model = meta.get("tokenizer.ggml.model")
    if model not in SUPPORTED_MODELS:
        raise ModelLoadError(
            f"GGUF tokenizer model {model!r} is not supported; tokenmill can rebuild "
            f"{' and '.join(repr(m) for m in SUPPORTED_MODELS)} (byte-level BPE and SentencePiece) "
            "tokenizers. Load the model from a Hugging Face directory with tokenizer.json instead."
        )
    tokens = _require(meta, "tokenizer.ggml.tokens")
    if not isinstance(tokens, list) or not tokens:
        raise ModelLoadError("GGUF metadata 'tokenizer.ggml.tokens' must be a non-empty list of strings")
    n = len(tokens)
    token_types = meta.get("tokenizer.ggml.token_type")
    types = [int(t) for t in token_types] if token_types is not None else [_NORMAL] * n
    if len(types) != n:
        raise ModelLoadError(f"GGUF metadata has {n} tokens but {len(types)} token types")

    def special(key: str) -> str | None:
        token_id = meta.get(f"tokenizer.ggml.{key}")
        if token_id is None:
            return None
        if not 0 <= int(token_id) < n:
            raise ModelLoadError(f"GGUF 'tokenizer.ggml.{key}' = {token_id} is outside the {n}-token vocabulary")
        return tokens[int(token_id)]

    bos, eos, unk, pad = special("bos_token_id"), special("eos_token_id"), special("unknown_token_id"), special("padding_token_id")
    if model == "gpt2":
        backend, vocab_tokens, default_bos = _byte_level_bpe(meta, tokens, types)
    else:
        backend, vocab_tokens, default_bos = _sentencepiece_bpe(meta, tokens, types, unk)
    _add_special_tokens(backend, vocab_tokens, types)

    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", default_bos))
    add_eos = bool(meta.get("tokenizer.ggml.add_eos_token", False))
    backend.post_processor = _post_processor(backend, bos if add_bos else None, eos if add_eos else None)

    extra = [special("eot_token_id"), special("eom_token_id")]
    extra += [t for t, ty in zip(tokens, types) if ty == _CONTROL and t in _END_OF_TURN]
    return Tokenizer(
        backend,
        bos_token=bos,
        eos_token=eos,
        pad_token=pad,
        chat_template=meta.get("tokenizer.chat_template"),
        extra_eos_tokens=[t for t in extra if t is not None],
    )


def _require(meta: dict[str, Any], key: str) -> Any:
    if key not in meta:
        raise ModelLoadError(f"GGUF metadata has no {key!r}; the file carries no usable tokenizer")
    return meta[key]


# -- byte-level BPE -------------------------------------------------------------------------------------
def _byte_level_bpe(meta: dict[str, Any], tokens: list[str], types: list[int]) -> tuple[Any, list[str], bool]:
    from tokenizers import Regex, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as Backend

    pre = meta.get("tokenizer.ggml.pre", "default")
    if pre not in _PRE_TOKENIZERS:
        logger.warning(
            "GGUF pre-tokenizer %r is not known to tokenmill; splitting text the GPT-2 way, "
            "which may give different tokens than the model was trained on (known: %s)",
            pre,
            ", ".join(sorted(_PRE_TOKENIZERS)),
        )
    split, digits, ignore_merges = _PRE_TOKENIZERS.get(pre, _PRE_TOKENIZERS["default"])

    # Every normal token is spelled in the byte alphabet; a few files store some raw, so respell those.
    # Control and user-defined tokens stay raw: they are matched against the raw text.
    alphabet = _bytes_to_unicode()
    letters = set(alphabet.values())
    vocab_tokens = [
        t if ty in (_CONTROL, _USER_DEFINED) or set(t) <= letters else "".join(alphabet[b] for b in t.encode())
        for t, ty in zip(tokens, types)
    ]
    merges = []
    for i, merge in enumerate(_require(meta, "tokenizer.ggml.merges")):
        parts = merge.split(" ")
        if len(parts) != 2:
            raise ModelLoadError(f"GGUF merge #{i} {merge!r} is not two tokens separated by one space")
        merges.append((parts[0], parts[1]))

    backend = Backend(
        models.BPE(
            vocab=_vocab(vocab_tokens),
            merges=merges,
            ignore_merges=ignore_merges,
            fuse_unk=False,
        )
    )
    steps = [pre_tokenizers.Digits(individual_digits=True)] if digits else []
    if split == _GPT2_SPLIT:
        steps.append(pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True))
    else:
        steps.append(pre_tokenizers.Split(Regex(split), behavior="isolated"))
        steps.append(pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False))
    backend.pre_tokenizer = steps[0] if len(steps) == 1 else pre_tokenizers.Sequence(steps)
    backend.decoder = decoders.ByteLevel()
    # llama.cpp adds BOS for Llama 3 vocabularies that do not say otherwise.
    return backend, vocab_tokens, ignore_merges


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte alphabet: printable bytes stand for themselves, the rest map above U+0100."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


# -- SentencePiece-style BPE ----------------------------------------------------------------------------
def _sentencepiece_bpe(
    meta: dict[str, Any], tokens: list[str], types: list[int], unk: str | None
) -> tuple[Any, list[str], bool]:
    from tokenizers import decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as Backend

    by_position = meta.get("general.architecture") in _POSITION_RANKED
    vocab_tokens = list(tokens)
    if by_position:
        vocab_tokens = ["\u2581" * len(t) if t and not t.strip(" ") else t for t in tokens]
    if "tokenizer.ggml.merges" in meta:
        merges = [tuple(m.split(" ", 1)) for m in meta["tokenizer.ggml.merges"]]
    else:
        if by_position:
            rank: Sequence[float] = range(0, -len(tokens), -1)
        else:
            rank = [float(s) for s in _require(meta, "tokenizer.ggml.scores")]
        merges = _merges_from_vocab(vocab_tokens, rank)

    backend = Backend(
        models.BPE(
            vocab=_vocab(vocab_tokens),
            merges=merges,
            unk_token=unk,
            fuse_unk=True,
            byte_fallback=True,
        )
    )
    # llama.cpp writes a space before the text (and SentencePiece models are trained on that) unless
    # the file says not to; Gemma's files say not to.
    add_space_prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", True))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(
        replacement="\u2581", prepend_scheme="first" if add_space_prefix else "never", split=False
    )
    steps = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    if add_space_prefix:
        steps.append(decoders.Strip(content=" ", left=1, right=0))
    backend.decoder = decoders.Sequence(steps)
    return backend, vocab_tokens, True


def _merges_from_vocab(tokens: list[str], rank: Sequence[float]) -> list[tuple[str, str]]:
    """Every cut of a token into two vocabulary tokens, best-ranked token first.

    SentencePiece BPE merges the adjacent pair whose joined piece has the highest score; a BPE merge
    list ordered by that score does the same. Among cuts of one token the longer left piece comes first.
    """
    vocab = set(tokens)
    found: list[tuple[float, int, int]] = []  # (-rank, -left length, token index)
    for index, (token, r) in enumerate(zip(tokens, rank)):
        for cut in range(1, len(token)):
            if token[:cut] in vocab and token[cut:] in vocab:
                found.append((-r, -cut, index))
    found.sort(key=lambda f: (f[0], f[1]))  # stable: equal keys keep vocabulary order
    return [(tokens[i][: -neg_cut], tokens[i][-neg_cut:]) for _, neg_cut, i in found]


# -- shared ---------------------------------------------------------------------------------------------
def _vocab(tokens: list[str]) -> dict[str, int]:
    vocab: dict[str, int] = {}
    for i, t in enumerate(tokens):
        vocab.setdefault(t, i)  # a duplicated spelling keeps its first id
    return vocab


def _add_special_tokens(backend: Any, vocab_tokens: list[str], types: list[int]) -> None:
    """Control tokens become special added tokens, user-defined ones plain added tokens: never split."""
    from tokenizers import AddedToken

    control = [t for t, ty in zip(vocab_tokens, types) if ty == _CONTROL]
    # A user-defined token respelled into the vocabulary alphabet ("  " -> "▁▁") is reached by merges.
    user = [t for t, ty in zip(vocab_tokens, types) if ty == _USER_DEFINED and t.strip("\u2581")]
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in control])
    backend.add_tokens([AddedToken(t, special=False, normalized=False) for t in user])
