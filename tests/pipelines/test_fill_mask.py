"""fill-mask against transformers' pipeline on tiny BERT, DistilBERT, RoBERTa and XLM-RoBERTa.

Same tokens, token strings and sequences, in the same order; scores within 1e-4 (and within
1e-4 relative, since a random model spreads its probability thinly over the vocabulary).
"""

import json
import logging
import os
import shutil

import pytest
import torch
import transformers

import tiny_encoders
from tokenmill import pipeline
from tokenmill.pipelines.base import PipelineInputError
from tokenmill.pipelines.fill_mask import clean_up_tokenization

FAMILIES = tiny_encoders.FAMILIES


def assert_same(got, want, path="result"):
    """Equal structure, keys, tokens and strings; scores within atol 1e-4 and rtol 1e-4."""
    assert type(got) is type(want), f"{path}: {type(got).__name__} != {type(want).__name__}"
    if isinstance(want, list):
        assert len(got) == len(want), f"{path}: {len(got)} items, transformers has {len(want)}"
        for i, (g, w) in enumerate(zip(got, want)):
            assert_same(g, w, f"{path}[{i}]")
    elif isinstance(want, dict):
        assert list(got) == list(want), f"{path}: keys {list(got)} != {list(want)}"
        for key in want:
            if key == "score":
                assert got[key] == pytest.approx(want[key], rel=1e-4, abs=1e-6), path
            else:
                assert got[key] == want[key], f"{path}[{key!r}]: {got[key]!r} != {want[key]!r}"
    else:
        assert got == want, path


@pytest.fixture(scope="module")
def pipes():
    """(tokenmill, transformers) fill-mask pipelines per family, built once."""
    cache = {}

    def get(family):
        if family not in cache:
            d = tiny_encoders.tiny_encoder_dir(family, "masked-lm")
            theirs = transformers.pipeline("fill-mask", model=d, dtype=torch.float32, device="cpu")
            cache[family] = (pipeline("fill-mask", model=d), theirs)
        return cache[family]

    return get


def texts(mask):
    return [
        f"The weather is {mask} today.",
        f"Paris is the {mask} of France, and a rather large city by any measure.",
        f"{mask} is good",
    ]


@pytest.mark.parametrize("family", FAMILIES)
def test_single_inputs_and_lists_match_transformers(pipes, family):
    ours, theirs = pipes(family)
    batch = texts(ours.mask_token)
    assert_same(ours(batch[0]), theirs(batch[0]))
    assert_same(ours(batch), theirs(batch))  # one padded batch of mixed lengths
    assert_same(ours(batch, batch_size=1), theirs(batch))
    # as transformers: a list of one input gives that input's result
    assert_same(ours([batch[1]]), theirs([batch[1]]))
    assert isinstance(ours([batch[1]])[0], dict)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("top_k", [1, 3, 12])
def test_top_k(pipes, family, top_k):
    ours, theirs = pipes(family)
    batch = texts(ours.mask_token)
    got = ours(batch, top_k=top_k)
    assert [len(r) for r in got] == [top_k] * len(batch)
    assert_same(got, theirs(batch, top_k=top_k))


@pytest.mark.parametrize("family", FAMILIES)
def test_several_masks_give_a_list_per_mask(pipes, family):
    ours, theirs = pipes(family)
    m = ours.mask_token
    two = f"The {m} is {m} today."
    got = ours(two, top_k=3)
    assert len(got) == 2 and all(len(r) == 3 for r in got)
    # the other mask stays in each sequence, special tokens and all
    assert m in got[0][0]["sequence"] and m in got[1][0]["sequence"]
    assert_same(got, theirs(two, top_k=3))
    mixed = [two, f"Only one {m} here.", f"{m} {m} {m}"]
    assert_same(ours(mixed), theirs(mixed))


@pytest.mark.parametrize("family", FAMILIES)
def test_targets(pipes, family, caplog):
    ours, theirs = pipes(family)
    tok = theirs.tokenizer
    batch = texts(ours.mask_token)
    vocab_words = [w for w in ("the", "weather", "city", "good", "is", "a") if w in tok.get_vocab()]
    assert vocab_words, "the tiny vocabulary should hold some plain words"
    assert_same(ours(batch, targets=vocab_words), theirs(batch, targets=vocab_words))
    assert_same(ours(batch[0], targets=vocab_words[0]), theirs(batch[0], targets=vocab_words[0]))
    assert_same(ours(batch[0], targets=None), theirs(batch[0], targets=None))
    # words that are not one token score their first sub-token, with a warning
    oov = ["zzqxv", " weather", "Capital"]
    with caplog.at_level(logging.WARNING, logger="tokenmill.pipelines"):
        got = ours(batch, targets=oov, top_k=2)
    assert "is not in the model's vocabulary; scoring its first token" in caplog.text
    assert_same(got, theirs(batch, targets=oov, top_k=2))
    # top_k is capped at the number of targets
    capped = ours(batch[1], targets=vocab_words[:2], top_k=10)
    assert len(capped) == len(set(vocab_words[:2]))
    assert_same(capped, theirs(batch[1], targets=vocab_words[:2], top_k=10))


def test_options_as_pipeline_defaults():
    d = tiny_encoders.tiny_encoder_dir("bert", "masked-lm")
    ours = pipeline("fill-mask", model=d, top_k=2, targets=["the", "city", "good"])
    theirs = transformers.pipeline(
        "fill-mask", model=d, dtype=torch.float32, device="cpu", top_k=2, targets=["the", "city", "good"]
    )
    batch = texts("[MASK]")
    assert_same(ours(batch), theirs(batch))
    assert_same(ours(batch, top_k=3), theirs(batch, top_k=3))  # a call's option wins
    assert_same(ours(batch, top_k=None), theirs(batch, top_k=None))  # None: the default's


@pytest.mark.parametrize("family", ["bert", "roberta"])
def test_truncation(pipes, family):
    ours, theirs = pipes(family)
    long_text = f"{ours.mask_token} starts this. " + "words and more words " * 40
    with pytest.raises(PipelineInputError) as e:
        ours(["fine " + ours.mask_token, long_text])
    assert "input 1 is" in str(e.value) and "over this model's limit of 64" in str(e.value)
    assert "truncation=True" in str(e.value)
    assert_same(ours(long_text, truncation=True), theirs(long_text, tokenizer_kwargs={"truncation": True}))
    cut = "words " * 80 + ours.mask_token
    with pytest.raises(PipelineInputError, match=r"truncation=True cut it off"):
        ours(cut, truncation=True)


@pytest.mark.parametrize("family", FAMILIES)
def test_no_mask_names_the_models_mask_token(pipes, family):
    ours, _ = pipes(family)
    want = "[MASK]" if family in ("bert", "distilbert") else "<mask>"
    assert ours.mask_token == want
    with pytest.raises(PipelineInputError) as e:
        ours([f"ok {want}", "There is nothing to fill here."])
    assert str(e.value) == f"input 1 has no mask token; write {want} where the word to fill goes"


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda p: p([]), "fill-mask got an empty list of inputs"),
        (lambda p: p("  "), "input 0 is an empty string"),
        (lambda p: p(["a [MASK]", 3]), "input 1 must be a string, got int"),
        (lambda p: p("a [MASK]", top_k=0), "top_k must be a positive integer or None, got 0"),
        (lambda p: p("a [MASK]", top_k=2.5), "top_k must be a positive integer or None, got 2.5"),
        (lambda p: p("a [MASK]", targets=[]), "targets must be a string or a non-empty list of strings"),
        (lambda p: p("a [MASK]", targets=[1, 2]), "targets must be a string or a non-empty list of strings"),
        (lambda p: p("a [MASK]", target="the"), "fill-mask got unknown option(s) 'target'; it accepts"),
    ],
)
def test_bad_calls(pipes, call, message):
    ours, _ = pipes("bert")
    with pytest.raises(ValueError) as e:
        call(ours)
    assert message in str(e.value)


def test_targets_with_no_tokens_at_all(pipes):
    ours, _ = pipes("bert")
    with pytest.raises(ValueError, match="none of the targets \\[' '\\] gives a token of this model"):
        ours("a [MASK]", targets=[" "])


def test_bad_defaults_fail_when_the_pipeline_is_built():
    d = tiny_encoders.tiny_encoder_dir("bert", "masked-lm")
    with pytest.raises(ValueError, match="top_k must be a positive integer"):
        pipeline("fill-mask", model=d, top_k=-1)


def test_checkpoint_without_mlm_head_is_refused():
    with pytest.raises(ValueError) as e:
        pipeline("fill-mask", model="all-minilm-l6-v2")
    msg = str(e.value)
    assert "has no weights for a masked-language-model head (fill-mask)" in msg
    assert "cls.predictions" in msg


def test_tokenizer_without_mask_token_is_refused(tmp_path):
    d = str(tmp_path / "no-mask")
    shutil.copytree(tiny_encoders.tiny_encoder_dir("bert", "masked-lm"), d)
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        path = os.path.join(d, name)
        if os.path.isfile(path):
            with open(path) as f:
                cfg = json.load(f)
            cfg.pop("mask_token", None)
            with open(path, "w") as f:
                json.dump(cfg, f)
    with pytest.raises(ValueError, match="the tokenizer names no mask token of its vocabulary"):
        pipeline("fill-mask", model=d)


@pytest.mark.parametrize("family", ["bert", "roberta"])
def test_clean_up_tokenization_spaces_as_transformers(tmp_path, family):
    """transformers cleans " ," and " 's" when the tokenizer config says so, except for BPE."""
    d = str(tmp_path / family)
    shutil.copytree(tiny_encoders.tiny_encoder_dir(family, "masked-lm"), d)
    path = os.path.join(d, "tokenizer_config.json")
    with open(path) as f:
        cfg = json.load(f)
    cfg["clean_up_tokenization_spaces"] = True
    with open(path, "w") as f:
        json.dump(cfg, f)
    ours = pipeline("fill-mask", model=d)
    theirs = transformers.pipeline("fill-mask", model=d, dtype=torch.float32, device="cpu")
    assert ours.clean_up == (family == "bert")
    m = ours.mask_token
    batch = [f"Hello , it ' s {m} , isn ' t it ?", f"We 're {m} ."]
    assert_same(ours(batch), theirs(batch))


def test_clean_up_tokenization():
    assert clean_up_tokenization("a , b . it 's he 're do n't ?") == "a, b. it's he're don't?"
