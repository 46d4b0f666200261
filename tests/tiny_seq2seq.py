"""Tiny random encoder-decoder models (T5, BART, mBART, Marian) saved as complete model dirs.

Each builder trains a small tokenizer with the `tokenizers` library on the text below,
wraps it in the family's transformers tokenizer class, builds a random transformers model
sized to it, and saves both (config.json, model.safetensors, tokenizer.json,
generation_config.json) to a temporary directory, once per process. The directories load
in transformers (AutoModelForSeq2SeqLM / AutoTokenizer) and in tokenmill.
"""

from __future__ import annotations

import atexit
import functools
import json
import shutil
import tempfile

import torch

TEXT = """
The old lighthouse stood at the edge of the harbour, and every evening the keeper climbed
the narrow stairs to light the lamp. Ships came in from the north with wool and timber,
and ships went out to the south with fish, salt and letters for distant cities. In the
spring the fishermen mended their nets on the stones, the children ran along the sea wall,
and the market filled with bread, cheese, apples and flowers from the valley farms.
A small school taught reading, writing and numbers to anyone who wished to learn. The
teacher was patient and kind; she believed that a good question was worth more than a
quick answer. Her students wrote short stories about storms, whales, brave sailors and
quiet mornings, and they read them aloud every Friday afternoon.
The town council met once a month in the hall beside the church. They talked about roads,
taxes, water, the new bridge over the river and the price of coal in winter. Some meetings
were long and loud, others were short and friendly, but the mayor always ended them with
the same words: thank you all, and please close the door on your way out.
Scientists visited the coast to study the birds, the tides and the changing weather. They
measured the temperature of the water, counted the nests on the cliffs and wrote reports
that few people in town ever read. Still, the keeper liked them, because they asked good
questions and they brought news from the university, from the capital and from abroad.
One winter a terrible storm broke the windows of the school and flooded the lower streets.
Everyone helped: the baker gave bread, the doctor cared for the injured, the fishermen
carried sand bags and the children painted bright signs that said the town would be strong
again. By summer the streets were clean, the windows were new, and the lighthouse still
turned its patient light across the dark and moving sea.
Translation is the art of carrying meaning from one language to another. A good translator
reads the whole sentence first, thinks about the context and the reader, and then chooses
words that sound natural. Summaries keep the main ideas and leave out the details; a good
summary is short, clear and faithful to the original text. Questions, answers, reviews and
news articles all have their own style, and a careful writer learns each of them.
"""

#: NLI labels of the zero-shot classification models (bart-large-mnli order)
NLI_LABELS = {0: "contradiction", 1: "neutral", 2: "entailment"}

# MBART's language codes used by the tests (all 25 fairseq codes are in the tokenizer)
SRC_LANG, TGT_LANG = "en_XX", "ro_RO"

_SMALL_BART = dict(
    d_model=32,
    encoder_layers=2,
    decoder_layers=2,
    encoder_attention_heads=4,
    decoder_attention_heads=4,
    encoder_ffn_dim=64,
    decoder_ffn_dim=64,
    max_position_embeddings=64,
    init_std=0.2,
)


def _lines() -> list[str]:
    return [line.strip() for line in TEXT.strip().splitlines() if line.strip()]


def _tempdir(name: str) -> str:
    path = tempfile.mkdtemp(prefix=f"tokenmill-tiny-{name}-")
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    return path


def _unigram_vocab(special: list[str], vocab_size: int = 300) -> list[tuple[str, float]]:
    """A SentencePiece-style Unigram vocabulary; the special tokens come first, in order."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.Unigram())
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    trainer = trainers.UnigramTrainer(
        vocab_size=vocab_size, special_tokens=special, unk_token="<unk>", show_progress=False
    )
    tok.train_from_iterator(_lines(), trainer)
    vocab = [(piece, float(score)) for piece, score in json.loads(tok.to_str())["model"]["vocab"]]
    if [p for p, _ in vocab[: len(special)]] != special:
        raise RuntimeError(f"unexpected special token order: {vocab[: len(special)]}")
    return vocab


def _widen(model, eos_bias: float) -> None:
    """Random init leaves near-uniform logits; spread them so greedy and beam choices are not
    decided by float noise, and make EOS likely enough that hypotheses end at different lengths."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
            elif name.endswith("bias"):
                p.normal_(0, 0.1)
        if hasattr(model, "final_logits_bias"):
            model.final_logits_bias.normal_(0, 0.5)
            for eos in _ids(model.config.eos_token_id):
                model.final_logits_bias[0, eos] += eos_bias


def _ids(x) -> list[int]:
    return [] if x is None else list(x) if isinstance(x, (list, tuple)) else [x]


def _save(model, tokenizer, name: str, generation: dict) -> str:
    from transformers import GenerationConfig

    path = _tempdir(name)
    model.generation_config = GenerationConfig(**generation)
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path


@functools.cache
def t5_dir(feed_forward_proj: str = "relu") -> str:
    """T5 ("relu": original T5, tied and rescaled; "gated-gelu": T5 v1.1 / FLAN-T5)."""
    import transformers as tf

    tokenizer = tf.T5Tokenizer(vocab=_unigram_vocab(["<pad>", "</s>", "<unk>"]), extra_ids=0)
    torch.manual_seed(0)
    cfg = tf.T5Config(
        vocab_size=len(tokenizer),
        d_model=32,
        d_kv=8,
        d_ff=64,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=20,
        feed_forward_proj=feed_forward_proj,
        # FLAN-T5 does not rescale the decoder output (transformers 5 stores it as a flag)
        tie_word_embeddings=feed_forward_proj == "relu",
        decoder_start_token_id=0,
        pad_token_id=0,
        eos_token_id=1,
    )
    model = tf.T5ForConditionalGeneration(cfg).eval()
    _widen(model, 0.0)
    with torch.no_grad():
        model.shared.weight[1] *= 1.5  # EOS a little likelier (T5 has no logits bias)
        # Larger sublayer outputs: otherwise the tied embedding of the previous token
        # dominates the residual stream and the model only repeats it. (A larger
        # initializer_factor does this too, but its attention scores make float32 rounding
        # approach the 1e-4 tolerance.)
        for name, p in model.named_parameters():
            if name.endswith((".o.weight", ".wo.weight")):
                p.mul_(3.0)
        if not cfg.scale_decoder_outputs:
            model.decoder.final_layer_norm.weight.mul_(0.3)  # unscaled logits would be large
    gen = dict(decoder_start_token_id=0, eos_token_id=1, pad_token_id=0)
    return _save(model, tokenizer, f"t5-{feed_forward_proj}", gen)


def _bart_tokenizer():
    """Byte-level BPE as BART's: <s>=0 <pad>=1 </s>=2 <unk>=3 <mask>=4, "<s> $A </s>"."""
    import transformers as tf
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_lines(), trainer)
    model = json.loads(tok.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    return tf.BartTokenizer(vocab=model["vocab"], merges=merges)


@functools.cache
def bart_dir() -> str:
    """BART (post-LN, learned positions) with bart-large-cnn's forced BOS/EOS."""
    import transformers as tf

    tokenizer = _bart_tokenizer()
    torch.manual_seed(1)
    cfg = tf.BartConfig(vocab_size=len(tokenizer), **_SMALL_BART, scale_embedding=True)
    model = tf.BartForConditionalGeneration(cfg).eval()
    _widen(model, 1.0)
    gen = dict(
        bos_token_id=0,
        decoder_start_token_id=2,
        eos_token_id=2,
        pad_token_id=1,
        forced_bos_token_id=0,
        forced_eos_token_id=2,
    )
    return _save(model, tokenizer, "bart", gen)


@functools.cache
def bart_nli_dir() -> str:
    """BartForSequenceClassification with bart-large-mnli's labels (zero-shot classification)."""
    import transformers as tf

    tokenizer = _bart_tokenizer()
    torch.manual_seed(2)
    cfg = tf.BartConfig(
        vocab_size=len(tokenizer),
        **_SMALL_BART,
        id2label=dict(NLI_LABELS),
        label2id={v: k for k, v in NLI_LABELS.items()},
    )
    model = tf.BartForSequenceClassification(cfg).eval()
    _widen(model, 0.0)
    gen = dict(
        bos_token_id=0, decoder_start_token_id=2, eos_token_id=2, pad_token_id=1, forced_eos_token_id=2
    )
    return _save(model, tokenizer, "bart-nli", gen)


@functools.cache
def mbart_dir() -> str:
    """mBART (pre-LN, final norms) translating en_XX -> ro_RO: the target language is the
    forced first token, as in mBART-50's one-to-many models."""
    import transformers as tf

    vocab = _unigram_vocab(["<s>", "<pad>", "</s>", "<unk>"])
    tokenizer = tf.MBartTokenizer(vocab=vocab, src_lang=SRC_LANG, tgt_lang=TGT_LANG)
    torch.manual_seed(3)
    cfg = tf.MBartConfig(vocab_size=len(tokenizer), **_SMALL_BART, decoder_start_token_id=2)
    model = tf.MBartForConditionalGeneration(cfg).eval()
    _widen(model, 0.5)
    gen = dict(
        bos_token_id=0,
        decoder_start_token_id=2,
        eos_token_id=2,
        pad_token_id=1,
        forced_bos_token_id=tokenizer.convert_tokens_to_ids(TGT_LANG),
        forced_eos_token_id=2,
    )
    return _save(model, tokenizer, "mbart", gen)


@functools.cache
def marian_dir() -> str:
    """Marian (OPUS-MT): </s>=0, <unk>=1, <pad> last and the decoder start token."""
    import transformers as tf
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

    vocab = _unigram_vocab(["</s>", "<unk>"])
    vocab.append(("<pad>", 0.0))
    tok = Tokenizer(models.Unigram(vocab, unk_id=1, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    tok.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A $B </s>", special_tokens=[("</s>", 0)]
    )
    # Marian's own tokenizer is SentencePiece-only (slow); the fast wrapper does what it does.
    tokenizer = tf.PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="</s>", unk_token="<unk>", pad_token="<pad>"
    )
    pad = len(vocab) - 1
    torch.manual_seed(4)
    cfg = tf.MarianConfig(
        vocab_size=len(vocab),
        **_SMALL_BART,
        scale_embedding=True,
        activation_function="swish",
        pad_token_id=pad,
        decoder_start_token_id=pad,
        eos_token_id=0,
        forced_eos_token_id=0,
        bos_token_id=None,
    )
    model = tf.MarianMTModel(cfg).eval()
    _widen(model, 0.5)
    gen = dict(
        bad_words_ids=[[pad]],
        decoder_start_token_id=pad,
        eos_token_id=0,
        forced_eos_token_id=0,
        pad_token_id=pad,
    )
    return _save(model, tokenizer, "marian", gen)


#: the seq2seq-lm families the tests cover, by name
SEQ2SEQ_BUILDERS = {
    "t5": lambda: t5_dir("relu"),
    "t5-gated": lambda: t5_dir("gated-gelu"),
    "bart": bart_dir,
    "mbart": mbart_dir,
    "marian": marian_dir,
}


def seq2seq_dir(name: str) -> str:
    """The model directory of one of ``SEQ2SEQ_BUILDERS``."""
    return SEQ2SEQ_BUILDERS[name]()
