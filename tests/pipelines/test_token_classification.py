"""token-classification ("ner") against transformers' pipeline on tiny BIO-labelled encoders.

Every aggregation strategy, WordPiece (BERT, DistilBERT), byte-level BPE (RoBERTa) and
Unigram (XLM-RoBERTa) tokenizers: the same entities, words and offsets, scores within 1e-4.
"""

import os
import sys

import numpy as np
import pytest
import torch
import transformers

sys.path.insert(0, os.path.dirname(os.path.dirname(__file__)))
import tiny_encoders  # noqa: E402
from tokenmill import pipeline  # noqa: E402
from tokenmill.pipelines.base import PipelineInputError  # noqa: E402
from tokenmill.pipelines.token_classification import TokenClassificationPipeline  # noqa: E402
from tokenmill.weights.task_loader import MissingHeadError  # noqa: E402

STRATEGIES = ["none", "simple", "first", "average", "max"]
TEXTS = [
    "Hugging Face Inc. is a company based in New York City.",
    "Its headquarters are in DUMBO, near the Manhattan Bridge.",
    "Angela Merkel visited Zürich's café ☃ with naïve friends.",
    "Short",
]
# (family, seed): seed 1 of BERT predicts "O" for many tokens, so ignore_labels matters
MODELS = [("bert", 0), ("bert", 1), ("distilbert", 0), ("roberta", 0), ("xlm-roberta", 0)]


# transformers warns on every call that non-WordPiece tokenizers use a word heuristic
pytestmark = pytest.mark.filterwarnings("ignore:Tokenizer does not support real words")


@pytest.fixture(scope="module")
def pipes():
    """(ours, transformers') per model, built once."""
    cache = {}

    def get(family, seed=0):
        if (family, seed) not in cache:
            d = tiny_encoders.tiny_encoder_dir(family, "token-classification", seed=seed)
            theirs = transformers.pipeline("token-classification", model=d, dtype=torch.float32, device="cpu")
            cache[family, seed] = (pipeline("token-classification", model=d), theirs)
        return cache[family, seed]

    return get


def assert_same(got, want):
    assert len(got) == len(want), (got, want)
    for g, w in zip(got, want):
        assert list(g) == list(w)  # same keys, same order
        assert isinstance(g["score"], float)
        assert {k: v for k, v in g.items() if k != "score"} == {k: v for k, v in w.items() if k != "score"}
        assert abs(g["score"] - float(w["score"])) < 1e-4


@pytest.mark.parametrize("family, seed", MODELS)
def test_every_strategy_matches_transformers(pipes, family, seed):
    ours, theirs = pipes(family, seed)
    for strategy in STRATEGIES:
        got = ours(TEXTS, aggregation_strategy=strategy)  # one batch, padded
        for text, g in zip(TEXTS, got):
            want = theirs(text, aggregation_strategy=strategy)
            assert_same(g, want)
            for e in g:  # offsets point into the text
                assert 0 <= e["start"] <= e["end"] <= len(text)
    # the default is "none": one dict per token with its index
    tokens = ours(TEXTS[0])
    assert_same(tokens, theirs(TEXTS[0]))
    assert all("index" in e and "entity" in e for e in tokens)


def test_results_have_entities_and_groups(pipes):
    ours, _ = pipes("bert", 1)
    simple = ours(TEXTS[0], aggregation_strategy="simple")
    assert simple and all(set(e) == {"entity_group", "score", "word", "start", "end"} for e in simple)
    # some tokens are "O" and left out by default; ignore_labels=[] keeps them
    everything = ours(TEXTS[0], ignore_labels=[])
    assert len(everything) > len(ours(TEXTS[0]))
    assert any(e["entity"] == "O" for e in everything)


@pytest.mark.parametrize("family", ["bert", "roberta"])
def test_ignore_labels_match_transformers(pipes, family):
    ours, theirs = pipes(family)
    for labels in ([], ["O", "B-LOC", "I-LOC"]):
        for strategy in ("none", "first"):
            want = theirs(TEXTS[1], aggregation_strategy=strategy, ignore_labels=labels)
            assert_same(ours(TEXTS[1], aggregation_strategy=strategy, ignore_labels=labels), want)


@pytest.mark.parametrize("family", ["bert", "roberta", "xlm-roberta"])
def test_stride_chunks_long_text_as_transformers(pipes, family):
    ours, theirs = pipes(family)
    long_text = " ".join(TEXTS * 6)  # several times the 64-token limit
    for strategy, stride in (("simple", 8), ("first", 16), ("max", 0)):
        want = theirs(long_text, aggregation_strategy=strategy, stride=stride)
        got = ours(long_text, aggregation_strategy=strategy, stride=stride)
        assert_same(got, want)
        assert got[-1]["end"] > len(long_text) // 2  # entities from the later chunks too


@pytest.mark.parametrize("family", ["bert", "roberta", "xlm-roberta"])
def test_pre_split_words_match_transformers(pipes, family):
    ours, theirs = pipes(family)
    words = ["Angela", "Merkel", "visited", "New", "York", "yesterday."]
    for strategy in ("none", "average"):
        want = theirs(words, is_split_into_words=True, aggregation_strategy=strategy)
        got = ours(words, is_split_into_words=True, aggregation_strategy=strategy)
        assert len(got) == len(want) == 1  # a list of words is one input; a list of results comes back
        assert_same(got[0], want[0])
    batch = [words, ["Paris", "and", "Berlin"]]
    got = ours(batch, is_split_into_words=True, aggregation_strategy="first", delimiter="  ")
    want = theirs(batch, is_split_into_words=True, aggregation_strategy="first", delimiter="  ")
    for g, w in zip(got, want):
        assert_same(g, w)


def test_over_long_input_is_an_error_unless_truncation(pipes):
    ours, theirs = pipes("bert")
    long_text = "word " * 100
    with pytest.raises(PipelineInputError) as e:
        ours(["fine", long_text])
    msg = str(e.value)
    assert "input 1 is 102 tokens long, over this model's limit of 64" in msg
    assert "truncation=True" in msg and "stride=" in msg
    # truncation=True cuts as transformers always does
    assert_same(ours(long_text, truncation=True), theirs(long_text))
    with pytest.raises(PipelineInputError, match="over this model's limit of 64"):
        ours(long_text.split(), is_split_into_words=True)


def test_ner_alias_and_batching(pipes):
    d = tiny_encoders.tiny_encoder_dir("distilbert", "token-classification")
    ner = pipeline("ner", model=d, aggregation_strategy="simple", batch_size=2)
    assert isinstance(ner, TokenClassificationPipeline)
    ours, _ = pipes("distilbert")
    batched = ner(TEXTS)
    for text, b in zip(TEXTS, batched):
        assert_same(b, ours(text, aggregation_strategy="simple"))


def test_grouping_follows_bio_tags():
    """Adjacent tokens of one tag merge; a B- tag starts a new entity; "O" groups too."""
    p = TokenClassificationPipeline.__new__(TokenClassificationPipeline)
    p._plain = type("Backend", (), {"decoder": None})()

    def ent(label, score, i):
        return {
            "entity": label,
            "score": np.float32(score),
            "word": f"w{i}",
            "start": 2 * i,
            "end": 2 * i + 1,
        }

    labels = ["B-PER", "I-PER", "B-PER", "I-LOC", "LOC", "O", "O"]
    groups = p._group_entities([ent(lbl, 0.5 + 0.05 * i, i) for i, lbl in enumerate(labels)])
    assert [(g["entity_group"], g["word"], g["start"], g["end"]) for g in groups] == [
        ("PER", "w0 w1", 0, 3),
        ("PER", "w2", 4, 5),
        ("LOC", "w3 w4", 6, 9),
        ("O", "w5 w6", 10, 13),
    ]
    assert groups[0]["score"] == pytest.approx(0.525)


@pytest.mark.parametrize(
    "call, message",
    [
        (
            lambda p: p("ok", aggregation_strategy="longest"),
            "aggregation_strategy must be one of none, simple",
        ),
        (lambda p: p("ok", ignore_labels="O"), "ignore_labels must be a list of label names"),
        (lambda p: p("ok", stride=-1), "stride must be a non-negative integer"),
        (lambda p: p("ok", stride=62, aggregation_strategy="simple"), "stride must be less than 62"),
        (lambda p: p("ok", stride=8), "pass aggregation_strategy='simple', 'first', 'average' or 'max'"),
        (lambda p: p("ok", is_split_into_words="yes"), "is_split_into_words must be True or False"),
        (lambda p: p("ok", is_split_into_words=True), "must be a non-empty list of words"),
        (lambda p: p([["a", 3]], is_split_into_words=True), "input 0 must be a non-empty list of words"),
        (lambda p: p("ok", aggregation="simple"), "unknown option(s) 'aggregation'"),
        (lambda p: p([]), "empty list of inputs"),
        (lambda p: p("  "), "input 0 is an empty string"),
        (lambda p: p(["ok", None]), "input 1 must be a string, got NoneType"),
    ],
)
def test_bad_inputs(pipes, call, message):
    ours, _ = pipes("bert")
    with pytest.raises(ValueError) as e:
        call(ours)
    assert message in str(e.value)


def test_bad_default_option_and_missing_head():
    d = tiny_encoders.tiny_encoder_dir("bert", "token-classification")
    with pytest.raises(ValueError, match="aggregation_strategy must be one of"):
        pipeline("ner", model=d, aggregation_strategy="all")
    with pytest.raises(MissingHeadError) as e:
        pipeline("ner", model=tiny_encoders.tiny_encoder_dir("bert", "base"))
    assert "no weights for a token classification head" in str(e.value)
    assert "classifier.weight" in str(e.value)
