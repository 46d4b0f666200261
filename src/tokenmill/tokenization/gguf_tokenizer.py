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
from typing import Any, NamedTuple

from tokenmill.tokenization.tokenizer import Tokenizer
from tokenmill.utils.errors import ModelLoadError

logger = logging.getLogger(__name__)

# llama.cpp's token types (gguf.TokenType)
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED = 1, 2, 3, 4

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


class _Pre(NamedTuple):
    split: str
    digits_first: bool = False  # every digit its own word before the regex runs (StarCoder, SmolLM)
    llama3: bool = False  # a word that is a vocabulary token stays whole (ignore_merges); BOS by default


_PRE_TOKENIZERS: dict[str, _Pre] = {
    "default": _Pre(_GPT2_SPLIT),
    "gpt-2": _Pre(_GPT2_SPLIT),
    "gpt2": _Pre(_GPT2_SPLIT),
    "smollm": _Pre(_GPT2_SPLIT, digits_first=True),
    "starcoder": _Pre(_GPT2_SPLIT, digits_first=True),
    "llama3": _Pre(_LLAMA3_SPLIT, llama3=True),
    "llama-v3": _Pre(_LLAMA3_SPLIT, llama3=True),
    "llama-bpe": _Pre(_LLAMA3_SPLIT, llama3=True),
    "qwen2": _Pre(_QWEN2_SPLIT),
    "deepseek-r1-qwen": _Pre(_QWEN2_SPLIT),
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

    def token_id(key: str) -> int | None:
        value = meta.get(f"tokenizer.ggml.{key}")
        if value is not None and not 0 <= int(value) < n:
            raise ModelLoadError(f"GGUF 'tokenizer.ggml.{key}' = {value} is outside the {n}-token vocabulary")
        return None if value is None else int(value)

    unk_id = token_id("unknown_token_id")
    if model == "gpt2":
        backend, spelled, default_bos = _byte_level_bpe(meta, tokens, types)
    else:
        unk = None if unk_id is None else tokens[unk_id]
        backend, spelled, default_bos = _sentencepiece_bpe(meta, tokens, types, unk)

    def token(key: str) -> str | None:
        i = token_id(key)
        return None if i is None else spelled[i]

    bos, eos, pad = token("bos_token_id"), token("eos_token_id"), token("padding_token_id")
    named = [t for t in (bos, eos, pad, None if unk_id is None else spelled[unk_id]) if t is not None]
    _add_special_tokens(backend, tokens, spelled, types, named)
    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", default_bos))
    add_eos = bool(meta.get("tokenizer.ggml.add_eos_token", False))
    for flag, name, value in ((add_bos, "bos", bos), (add_eos, "eos", eos)):
        if flag and value is None:
            raise ModelLoadError(
                f"GGUF metadata asks to add a {name.upper()} token (tokenizer.ggml.add_{name}_token) "
                f"but has no tokenizer.ggml.{name}_token_id"
            )
    backend.post_processor = _post_processor(backend, bos if add_bos else None, eos if add_eos else None)

    extra = [token("eot_token_id"), token("eom_token_id")]
    extra += [t for t, ty in zip(spelled, types) if ty == _CONTROL and t in _END_OF_TURN]
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
    split, digits_first, llama3 = _PRE_TOKENIZERS.get(pre, _PRE_TOKENIZERS["default"])

    # Every normal token is spelled in the byte alphabet; a few files store some raw, so respell those.
    # Control and user-defined tokens stay raw: they are matched against the raw text.
    alphabet = _bytes_to_unicode()
    letters = set(alphabet.values())
    vocab_tokens = [
        t
        if ty in (_CONTROL, _USER_DEFINED) or set(t) <= letters
        else "".join(alphabet[b] for b in t.encode())
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
            ignore_merges=llama3,
            fuse_unk=False,
        )
    )
    steps = [pre_tokenizers.Digits(individual_digits=True)] if digits_first else []
    if split == _GPT2_SPLIT:
        steps.append(pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True))
    else:
        steps.append(pre_tokenizers.Split(Regex(split), behavior="isolated"))
        steps.append(pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False))
    backend.pre_tokenizer = steps[0] if len(steps) == 1 else pre_tokenizers.Sequence(steps)
    backend.decoder = decoders.ByteLevel()
    # llama.cpp adds BOS for Llama 3 vocabularies that do not say otherwise.
    return backend, vocab_tokens, llama3


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte alphabet: printable bytes stand for themselves, the rest map above U+0100."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
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
    from tokenizers import Tokenizer as Backend
    from tokenizers import decoders, models, pre_tokenizers

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
    found: list[tuple[float, int, int]] = []  # (-rank, -cut, token index): sorts best first
    for index, (token, r) in enumerate(zip(tokens, rank)):
        for cut in range(1, len(token)):
            if token[:cut] in vocab and token[cut:] in vocab:
                found.append((-r, -cut, index))
    found.sort(key=lambda f: (f[0], f[1]))  # stable: equal keys keep vocabulary order
    merges = []
    for _, neg_cut, index in found:
        token, cut = tokens[index], -neg_cut
        merges.append((token[:cut], token[cut:]))
    return merges


# -- shared ---------------------------------------------------------------------------------------------
def _vocab(tokens: list[str]) -> dict[str, int]:
    vocab: dict[str, int] = {}
    for i, t in enumerate(tokens):
        vocab.setdefault(t, i)  # a duplicated spelling keeps its first id
    return vocab


def _add_special_tokens(
    backend: Any, tokens: list[str], spelled: list[str], types: list[int], named: list[str]
) -> None:
    """Control tokens (and the unk/bos/eos/pad the file names) become special added tokens, user-defined
    ones plain added tokens: either way the text is searched for them first and they are never split."""
    from tokenizers import AddedToken

    special = [t for t, ty in zip(spelled, types) if ty in (_CONTROL, _UNKNOWN)]
    special = list(dict.fromkeys([*special, *named]))
    # A user-defined token we respelled into the vocabulary's alphabet ("  " -> "▁▁") is reached by
    # merges instead; as an added token it would match a literal "▁▁" in the text.
    user = [v for t, v, ty in zip(tokens, spelled, types) if ty == _USER_DEFINED and v == t]
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special])
    backend.add_tokens([AddedToken(t, special=False, normalized=False) for t in user])


def _post_processor(backend: Any, bos: str | None, eos: str | None) -> Any:
    """BOS/EOS around each sequence, so ``encode(text, add_special_tokens=True)`` adds them."""
    from tokenizers import processors

    if bos is None and eos is None:
        return None

    def around(seq: str, type_id: int) -> str:
        parts = [f"{bos}:{type_id}"] if bos else []
        parts.append(f"${seq}:{type_id}")
        return " ".join([*parts, f"{eos}:{type_id}"] if eos else parts)

    single = around("A", 0)
    pair = f"{single} {around('B', 1)}"
    specials = [(t, backend.token_to_id(t)) for t in dict.fromkeys(x for x in (bos, eos) if x)]
    return processors.TemplateProcessing(single=single, pair=pair, special_tokens=specials)
