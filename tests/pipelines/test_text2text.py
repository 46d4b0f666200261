"""summarization, translation and text2text-generation: transformers 4.x pipeline behaviour.

transformers 5 removed these pipelines, so the reference is transformers 5.24's
``generate()`` on the same tiny checkpoints (tests/tiny_seq2seq.py) with transformers
4.57's pipeline steps written out in ``reference``: each input tokenized alone (4.x runs
a list one input at a time) after the task prefix, generated with the settings the
pipeline resolves, decoded with ``skip_special_tokens=True`` and no space clean-up. The
settings each test expects are spelled out beside it.
"""

from __future__ import annotations

import functools
import json
import os
import shutil

import pytest
import torch
import transformers

import tiny_encoders
import tiny_seq2seq as ts
from tokenmill import pipeline
from tokenmill.pipelines.base import PipelineInputError
from tokenmill.tokenization.tokenizer import clean_up_tokenization
from tokenmill.weights.task_loader import MissingHeadError

TEXTS = [
    "The keeper climbed the narrow stairs to light the lamp.",
    "Ships came in from the north with wool and timber, and ships went out to the south.",
    "A good summary is short.",
]
KEYS = {"summarization": "summary", "translation": "translation", "text2text-generation": "generated"}


# -- the reference: transformers 4.57's pipeline steps around transformers 5.24's generate()
@functools.cache
def hf(path: str):
    tok = transformers.AutoTokenizer.from_pretrained(path)
    model = transformers.AutoModelForSeq2SeqLM.from_pretrained(path, dtype=torch.float32).eval()
    return tok, model


def _rows(out: torch.Tensor, eos: set[int]) -> list[list[int]]:
    """generate()'s rows without the padding after EOS (the decoder start token stays)."""
    rows = []
    for row in out.tolist():
        cut = next((i + 1 for i, t in enumerate(row) if i > 0 and t in eos), len(row))
        rows.append(row[:cut])
    return rows


def reference(path: str, texts: list[str], *, prefix: str = "", langs=None, **gen) -> list[list[list[int]]]:
    """Per input, transformers' generated rows (decoder start first). ``langs``: mBART's
    (src_lang, tgt_lang), through its tokenizer's ``_build_translation_inputs`` as 4.x does."""
    tok, model = hf(path)
    eos = model.generation_config.eos_token_id
    eos = set(eos) if isinstance(eos, list) else {eos}
    out = []
    for text in texts:
        if langs:
            enc = tok._build_translation_inputs(
                text, return_tensors="pt", src_lang=langs[0], tgt_lang=langs[1]
            )
        else:
            enc = tok(prefix + text, return_tensors="pt")
        enc.pop("token_type_ids", None)
        with torch.inference_mode():
            out.append(_rows(model.generate(**enc, **gen), eos))
    return out


def as_pipeline_output(path: str, task: str, rows, single: bool, clean: bool = False):
    """4.x's postprocess and result shape: a list of dicts per input; a list of inputs with
    one result each is flattened."""
    tok, _ = hf(path)
    key = f"{KEYS[task]}_text"
    per_input = []
    for seqs in rows:
        texts = [tok.decode(r, skip_special_tokens=True, clean_up_tokenization_spaces=False) for r in seqs]
        per_input.append([{key: clean_up_tokenization(t) if clean else t} for t in texts])
    if single:
        return per_input[0]
    return [r[0] for r in per_input] if all(len(r) == 1 for r in per_input) else per_input


@functools.cache
def ours(task: str, path: str, **kwargs):
    return pipeline(task, model=path, **kwargs)


def _copy(src: str, dst: str, config: dict | None = None, generation: dict | None = None) -> str:
    shutil.copytree(src, dst)
    for name, changes in (("config.json", config), ("generation_config.json", generation)):
        if changes:
            p = os.path.join(dst, name)
            with open(p) as f:
                data = json.load(f)
            data.update(changes)
            with open(p, "w") as f:
                json.dump(data, f)
    return dst


# -- greedy and beam search on every family -----------------------------------------
MODELS = [
    ("t5", "text2text-generation"),
    ("t5-gated", "summarization"),
    ("bart", "summarization"),
    ("marian", "translation"),
]
OPTION_SETS = {
    "greedy": dict(num_beams=1, max_new_tokens=12),
    "greedy-lengths": dict(num_beams=1, min_length=8, max_length=11),  # both count the start token
    "greedy-ngram": dict(num_beams=1, max_new_tokens=16, no_repeat_ngram_size=2),
    "greedy-repetition": dict(num_beams=1, max_new_tokens=12, repetition_penalty=1.5),
    "beam3": dict(
        num_beams=3, num_return_sequences=2, length_penalty=2.0, early_stopping=True, max_new_tokens=10
    ),
    "beam4-never": dict(
        num_beams=4,
        num_return_sequences=4,
        early_stopping="never",
        length_penalty=0.5,
        min_new_tokens=4,
        max_new_tokens=12,
    ),
    "beam4-ngram": dict(num_beams=4, no_repeat_ngram_size=3, min_length=3, max_length=14),
}


@pytest.mark.parametrize("options", OPTION_SETS.values(), ids=OPTION_SETS.keys())
@pytest.mark.parametrize("name,task", MODELS)
def test_generation_matches_transformers(name, task, options):
    path = ts.seq2seq_dir(name)
    p = ours(task, path)
    rows = reference(path, TEXTS, **options)
    assert p(TEXTS, **options) == as_pipeline_output(path, task, rows, single=False)
    assert p(TEXTS[1], **options) == as_pipeline_output(path, task, rows[1:2], single=True)
    if options.get("num_return_sequences", 1) > 1 or "repetition_penalty" in options:
        got = p(TEXTS[0], return_tensors=True, **options)
        assert got == [{f"{KEYS[task]}_token_ids": r} for r in rows[0]]


def test_defaults_are_transformers_4_57s():
    """No settings anywhere: 4 beams and 256 new tokens (4.57's pipeline defaults), capped
    where the model's position table ends (BART's 64 positions: 63 new tokens)."""
    path = ts.t5_dir("relu")
    rows = reference(path, TEXTS[:1], num_beams=4, max_new_tokens=256)
    assert ours("summarization", path)(TEXTS[0]) == as_pipeline_output(path, "summarization", rows, True)
    path = ts.bart_dir()
    rows = reference(path, TEXTS[:2], num_beams=4, max_new_tokens=63)
    assert ours("summarization", path)(TEXTS[:2]) == as_pipeline_output(path, "summarization", rows, False)


def test_model_generation_config_beats_the_pipeline_defaults(tmp_path):
    """A generation_config max_length replaces the default 256 new tokens (as 4.57 does);
    num_beams=1 there equals transformers' global default, so the pipeline's 4 stay."""
    path = _copy(ts.bart_dir(), str(tmp_path / "bart"), generation=dict(max_length=9, num_beams=1))
    rows = reference(path, TEXTS, num_beams=4, max_length=9)
    assert pipeline("summarization", model=path)(TEXTS) == as_pipeline_output(
        path, "summarization", rows, False
    )
    path = _copy(ts.bart_dir(), str(tmp_path / "bart3"), generation=dict(num_beams=3, length_penalty=0.5))
    rows = reference(path, TEXTS[:1], num_beams=3, length_penalty=0.5, max_new_tokens=63)
    assert pipeline("summarization", model=path)(TEXTS[0]) == as_pipeline_output(
        path, "summarization", rows, True
    )


# -- T5's task_specific_params and prefixes ----------------------------------------------
TASK_PARAMS = {
    "summarization": dict(
        prefix="summarize: ",
        num_beams=3,
        max_length=12,
        min_length=5,
        length_penalty=2.0,
        early_stopping=True,
        no_repeat_ngram_size=2,
    ),
    "translation_en_to_de": dict(
        prefix="translate English to German: ", num_beams=2, max_length=10, early_stopping=True
    ),
}


@pytest.fixture(scope="module")
def t5_tasks(tmp_path_factory):
    """t5-small's layout: task_specific_params per task, and a config-wide prefix."""
    d = str(tmp_path_factory.mktemp("t5-tasks") / "t5")
    return _copy(ts.t5_dir("relu"), d, config=dict(task_specific_params=TASK_PARAMS, prefix="answer: "))


def test_summarization_takes_the_task_prefix_and_settings(t5_tasks):
    settings = {k: v for k, v in TASK_PARAMS["summarization"].items() if k != "prefix"}
    rows = reference(t5_tasks, TEXTS, prefix="summarize: ", **settings)
    p = pipeline("summarization", model=t5_tasks)
    assert p(TEXTS) == as_pipeline_output(t5_tasks, "summarization", rows, False)
    # the call's options win over the task's, the rest of the task's stay
    rows = reference(
        t5_tasks, TEXTS, prefix="summarize: ", **{**settings, "num_beams": 1, "max_new_tokens": 6}
    )
    assert p(TEXTS, num_beams=1, max_new_tokens=6) == as_pipeline_output(
        t5_tasks, "summarization", rows, False
    )


def test_translation_task_name_takes_its_prefix(t5_tasks):
    settings = {k: v for k, v in TASK_PARAMS["translation_en_to_de"].items() if k != "prefix"}
    rows = reference(t5_tasks, TEXTS, prefix="translate English to German: ", **settings)
    want = as_pipeline_output(t5_tasks, "translation", rows, False)
    assert pipeline("translation_en_to_de", model=t5_tasks)(TEXTS) == want
    # tokenmill also reads the languages of a call (transformers 4.x keeps the task's)
    p = pipeline("translation", model=t5_tasks)
    assert p(TEXTS, src_lang="en", tgt_lang="de") == want
    # without languages the config-wide prefix applies, as for text2text-generation
    rows = reference(t5_tasks, TEXTS, prefix="answer: ", num_beams=1, max_new_tokens=8)
    assert p(TEXTS, num_beams=1, max_new_tokens=8) == as_pipeline_output(t5_tasks, "translation", rows, False)
    t2t = pipeline("text2text-generation", model=t5_tasks, num_beams=1, max_new_tokens=8)
    assert t2t(TEXTS) == as_pipeline_output(t5_tasks, "text2text-generation", rows, False)
    assert t2t(TEXTS[0], prefix="") == as_pipeline_output(
        t5_tasks, "text2text-generation", reference(t5_tasks, TEXTS[:1], num_beams=1, max_new_tokens=8), True
    )


# -- multilingual translation (mBART, mBART-50) -------------------------------------------
@pytest.mark.parametrize(
    "langs,options",
    [
        (("en_XX", "ro_RO"), dict(num_beams=1, max_new_tokens=10)),
        (("de_DE", "fr_XX"), dict(num_beams=3, num_return_sequences=2, max_new_tokens=8)),
        (("ro_RO", "en_XX"), dict(num_beams=4, length_penalty=1.5, early_stopping=True, max_length=9)),
    ],
)
def test_mbart_languages_match_transformers(langs, options):
    path = ts.mbart_dir()
    rows = reference(path, TEXTS, langs=langs, **options)  # the target code: forced_bos_token_id
    want = as_pipeline_output(path, "translation", rows, False)
    p = ours("translation", path)
    assert p(TEXTS, src_lang=langs[0], tgt_lang=langs[1], **options) == want
    # "en"/"ro" shorthands: the task name, or pipeline()'s defaults
    short = f"translation_{langs[0][:2]}_to_{langs[1][:2]}"
    assert ours(short, path)(TEXTS, **options) == want
    assert ours("translation", path, src_lang=langs[0], tgt_lang=langs[1])(TEXTS, **options) == want


def test_mbart50_puts_the_source_code_first(tmp_path):
    """mBART-50's tokenizer writes "en_XX X </s>" (mBART's "X </s> en_XX")."""
    tok = transformers.MBart50Tokenizer(
        vocab=ts._unigram_vocab(["<s>", "<pad>", "</s>", "<unk>"]), src_lang="en_XX", tgt_lang="ro_RO"
    )
    torch.manual_seed(5)
    cfg = transformers.MBartConfig(vocab_size=len(tok), **ts._SMALL_BART, decoder_start_token_id=2)
    model = transformers.MBartForConditionalGeneration(cfg).eval()
    ts._widen(model, 0.5)
    path = ts._save(model, tok, "mbart50", dict(decoder_start_token_id=2, eos_token_id=2, pad_token_id=1))
    langs = ("fr_XX", "de_DE")
    enc_ids = tok._build_translation_inputs(
        TEXTS[0], return_tensors="pt", src_lang=langs[0], tgt_lang=langs[1]
    )
    assert enc_ids.input_ids[0, 0].item() == tok.convert_tokens_to_ids("fr_XX")
    rows = reference(path, TEXTS, langs=langs, num_beams=2, max_new_tokens=8)
    got = pipeline("translation", model=path)(
        TEXTS, src_lang="fr", tgt_lang="de", num_beams=2, max_new_tokens=8
    )
    assert got == as_pipeline_output(path, "translation", rows, False)


# -- result shapes, tensors, clean-up --------------------------------------------------
def test_result_shapes():
    path = ts.t5_dir("relu")
    for task in KEYS:
        p = ours(task, path)
        key = f"{KEYS[task]}_text"
        one = p(TEXTS[0], num_beams=1, max_new_tokens=4)
        assert isinstance(one, list) and len(one) == 1 and set(one[0]) == {key}
        several = p(TEXTS[0], num_beams=3, num_return_sequences=3, max_new_tokens=4)
        assert len(several) == 3 and all(set(d) == {key} for d in several)
        flat = p(TEXTS, num_beams=1, max_new_tokens=4)
        assert len(flat) == 3 and all(isinstance(d, dict) for d in flat)
        nested = p(TEXTS, num_beams=2, num_return_sequences=2, max_new_tokens=4)
        assert [len(r) for r in nested] == [2, 2, 2] and all(isinstance(r, list) for r in nested)
        assert p([TEXTS[0]], num_beams=1, max_new_tokens=4) == one  # a list of one stays flat
        ids = p(TEXTS[0], num_beams=1, max_new_tokens=4, return_tensors=True)
        assert set(ids[0]) == {f"{KEYS[task]}_token_ids"} and ids[0][f"{KEYS[task]}_token_ids"][0] == 0


def _biased_copy(src: str, dst: str, bias: dict[str, float]) -> str:
    """The checkpoint with some tokens made likelier (final_logits_bias)."""
    tok, _ = hf(src)
    model = transformers.AutoModelForSeq2SeqLM.from_pretrained(src, dtype=torch.float32)
    with torch.no_grad():
        for token, value in bias.items():
            model.final_logits_bias[0, tok.convert_tokens_to_ids(token)] += value
    model.save_pretrained(dst)
    tok.save_pretrained(dst)
    return dst


def test_clean_up_tokenization_spaces(tmp_path):
    """Off by default (4.x pipelines decode with clean_up_tokenization_spaces=False)."""
    path = _biased_copy(ts.bart_dir(), str(tmp_path / "bart"), {"Ġ": 8.0, ".": 6.0, ",": 6.0})
    opts = dict(num_beams=1, max_new_tokens=12, no_repeat_ngram_size=1)
    rows = reference(path, TEXTS, **opts)
    p = pipeline("summarization", model=path)
    plain = p(TEXTS, **opts)
    assert plain == as_pipeline_output(path, "summarization", rows, False)
    assert any(" ." in d["summary_text"] or " ," in d["summary_text"] for d in plain)
    cleaned = p(TEXTS, clean_up_tokenization_spaces=True, **opts)
    assert cleaned == as_pipeline_output(path, "summarization", rows, False, clean=True) != plain


def test_marian_never_generates_its_pad_token(tmp_path):
    """generation_config's bad_words_ids=[[pad]] (Marian's decoder start) is obeyed."""
    path = _biased_copy(ts.marian_dir(), str(tmp_path / "marian"), {"<pad>": 5.0})
    opts = dict(num_beams=1, max_new_tokens=8)
    rows = reference(path, TEXTS, **opts)
    assert pipeline("translation", model=path)(TEXTS, **opts) == as_pipeline_output(
        path, "translation", rows, False
    )
    opts = dict(num_beams=3, num_return_sequences=3, max_new_tokens=8)
    rows = reference(path, TEXTS[:1], **opts)
    assert pipeline("translation", model=path)(TEXTS[0], **opts) == as_pipeline_output(
        path, "translation", rows, True
    )


# -- sampling and batching ----------------------------------------------------------------
def test_seeded_sampling_repeats():
    p = ours("text2text-generation", ts.t5_dir("gated-gelu"))
    opts = dict(do_sample=True, temperature=1.5, top_k=0, num_return_sequences=3, max_new_tokens=10)
    a = p(TEXTS, seed=3, **opts)
    assert a == p(TEXTS, seed=3, **opts)
    assert [len(r) for r in a] == [3, 3, 3]
    assert a != p(TEXTS, seed=4, **opts)
    # do_sample alone samples (the pipeline's default 4 beams are for beam search only)
    assert len(p(TEXTS[0], do_sample=True, seed=1, max_new_tokens=5)) == 1


def test_batching_changes_nothing_for_greedy():
    texts = [*TEXTS, "Scientists visited the coast.", "The town council met once a month in the hall."]
    for name, task in MODELS:
        p = ours(task, ts.seq2seq_dir(name))
        one = p(texts, num_beams=1, max_new_tokens=10, batch_size=1)
        assert p(texts, num_beams=1, max_new_tokens=10, batch_size=8) == one
        assert [p(t, num_beams=1, max_new_tokens=10)[0] for t in texts] == one


# -- errors ----------------------------------------------------------------------------
@pytest.mark.parametrize(
    "inputs,options,error,message",
    [
        (TEXTS[0], {"max_new_token": 3}, ValueError, "unknown option(s) 'max_new_token'; it accepts"),
        (TEXTS[0], {"do_sample": "yes"}, ValueError, "do_sample must be True or False, got 'yes'"),
        (TEXTS[0], {"max_new_tokens": "5"}, ValueError, "max_new_tokens must be an integer >= 1, got '5'"),
        (TEXTS[0], {"num_beams": 0}, ValueError, "num_beams must be an integer >= 1, got 0"),
        (TEXTS[0], {"max_length": 1}, ValueError, "max_length must be an integer >= 2"),
        (TEXTS[0], {"temperature": 0}, ValueError, "temperature must be a number > 0, got 0"),
        (TEXTS[0], {"top_p": 1.5}, ValueError, "top_p must be a number in (0, 1], got 1.5"),
        (TEXTS[0], {"early_stopping": "maybe"}, ValueError, "early_stopping must be True, False or 'never'"),
        (TEXTS[0], {"prefix": 3}, ValueError, "prefix must be a string, got 3"),
        (TEXTS[0], {"return_tensors": 1}, ValueError, "return_tensors must be True or False"),
        (3, {}, PipelineInputError, "input 0 must be a string, got int"),
        ([TEXTS[0], {"text": "x"}], {}, PipelineInputError, "input 1 must be a string, got dict"),
        ("", {}, PipelineInputError, "input 0 is an empty string"),
        ("   ", {}, PipelineInputError, "input 0 is an empty string"),
        ([], {}, PipelineInputError, "got an empty list of inputs"),
        (
            TEXTS[0],
            {"num_beams": 2, "num_return_sequences": 3},
            ValueError,
            "num_return_sequences (3) must be at most num_beams (2)",
        ),
        (
            TEXTS[0],
            {"num_beams": 1, "num_return_sequences": 2},
            ValueError,
            "greedy decoding gives one sequence, so num_return_sequences=2 needs do_sample=True",
        ),
        (
            TEXTS[0],
            {"num_beams": 2, "do_sample": True},
            ValueError,
            "beam sampling (num_beams=2 with do_sample=True) is not supported",
        ),
        (
            TEXTS[0],
            {"num_beams": 2, "repetition_penalty": 1.2},
            ValueError,
            "repetition_penalty is not supported with beam search",
        ),
        (TEXTS[0], {"max_new_tokens": 64}, ValueError, "this model generates at most 63 tokens"),
        (
            TEXTS[0],
            {"max_new_tokens": 4, "min_new_tokens": 5},
            ValueError,
            "the minimum length (5 new tokens) is above the maximum (4)",
        ),
        (
            " ".join(TEXTS * 3),
            {},
            PipelineInputError,
            "over this model's limit of 64; shorten it or pass truncation=True",
        ),
    ],
)
def test_user_errors_name_the_problem(inputs, options, error, message):
    p = ours("summarization", ts.bart_dir())
    with pytest.raises(error) as e:
        p(inputs, **options)
    assert message in str(e.value)


def test_truncation_cuts_a_long_input():
    p = ours("summarization", ts.bart_dir())
    long = " ".join(TEXTS * 3)
    got = p(long, truncation=True, num_beams=1, max_new_tokens=5)
    tok, model = hf(ts.bart_dir())
    enc = tok(long, truncation=True, max_length=64, return_tensors="pt")
    with torch.inference_mode():
        want = _rows(model.generate(**enc, num_beams=1, max_new_tokens=5), {2})
    assert got == [{"summary_text": tok.decode(want[0], skip_special_tokens=True)}]


def test_translation_errors_name_the_languages():
    p = ours("translation", ts.mbart_dir())
    with pytest.raises(ValueError) as e:
        p(TEXTS[0])
    assert "this multilingual model needs src_lang= and tgt_lang=" in str(e.value)
    assert "en_XX" in str(e.value)
    with pytest.raises(ValueError) as e:
        p(TEXTS[0], src_lang="en_XX", tgt_lang="xx")
    assert "tgt_lang='xx' is not a language code of this model; it knows ar_AR, cs_CZ" in str(e.value)
    # a token of the vocabulary is no language code
    with pytest.raises(ValueError, match="src_lang='the' is not a language code"):
        p(TEXTS[0], src_lang="the", tgt_lang="ro_RO")
    with pytest.raises(ValueError, match="src_lang must be a language code string, got 5"):
        p(TEXTS[0], src_lang=5, tgt_lang="ro_RO")
    with pytest.raises(ValueError, match="tgt_lang must be a language code string"):
        pipeline("translation", model=ts.mbart_dir(), tgt_lang=None)


def test_a_checkpoint_without_a_seq2seq_head():
    with pytest.raises(MissingHeadError) as e:
        pipeline("summarization", model=tiny_encoders.tiny_encoder_dir("bert", "masked-lm"))
    assert "tokenmill has no 'bert' model with an encoder-decoder language-model head" in str(e.value)
