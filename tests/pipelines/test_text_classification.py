"""text-classification (and sentiment-analysis) against transformers' pipeline on tiny encoders.

Every option (top_k, function_to_apply, text pairs, batches) on single-label, multi-label,
one-label and regression heads: same labels in the same order, scores within 1e-4, and
transformers' output shapes, including its legacy ones.
"""

import os

import pytest
import torch
import transformers

import tiny_encoders
import tiny_seq2seq
from tokenmill import pipeline
from tokenmill.pipelines.base import PipelineInputError

FAMILIES = tiny_encoders.FAMILIES
TEXTS = [
    "I loved this film, it was wonderful.",
    "Terrible.",
    "The plot was fine but the acting was rather wooden in places, sadly.",
]
PAIRS = [
    {"text": "A man is eating food.", "text_pair": "Someone eats."},
    {"text": "The weather is nice.", "text_pair": "It is raining heavily over the whole country today."},
    {"text": "Just a text, no pair."},
]


def assert_same(got, want, path="result"):
    """Equal structure, keys and labels; scores within 1e-4."""
    assert type(got) is type(want), f"{path}: {type(got).__name__} != {type(want).__name__}"
    if isinstance(want, list):
        assert len(got) == len(want), f"{path}: {len(got)} items, transformers has {len(want)}"
        for i, (g, w) in enumerate(zip(got, want)):
            assert_same(g, w, f"{path}[{i}]")
    elif isinstance(want, dict):
        assert list(got) == list(want), f"{path}: keys {list(got)} != {list(want)}"
        assert got["label"] == want["label"], f"{path}: {got['label']!r} != {want['label']!r}"
        assert got["score"] == pytest.approx(want["score"], abs=1e-4, rel=1e-4), path
    else:
        assert got == want, path


def one_label_dir(family: str) -> str:
    """A head with a single label and no problem_type: transformers applies a sigmoid."""
    path = os.path.join(tiny_encoders._root().name, f"{family}-one-label")
    if not os.path.isdir(path):
        cfg = tiny_encoders.hf_config(family, "sequence-classification", "regression")
        cfg.problem_type = None
        torch.manual_seed(1)
        tiny_encoders.hf_class(family, "sequence-classification")(cfg).save_pretrained(path)
        tiny_encoders.tiny_tokenizer(family).save_pretrained(path)
    return path


def model_dir(family: str, labels: str) -> str:
    if labels == "one-label":
        return one_label_dir(family)
    return tiny_encoders.tiny_encoder_dir(family, "sequence-classification", labels)


@pytest.fixture(scope="module")
def pipes():
    """(tokenmill, transformers) pipelines per (family, label set), built once."""
    cache = {}

    def get(family, labels="sentiment"):
        if (family, labels) not in cache:
            d = model_dir(family, labels)
            theirs = transformers.pipeline("text-classification", model=d, dtype=torch.float32, device="cpu")
            cache[family, labels] = (pipeline("text-classification", model=d), theirs)
        return cache[family, labels]

    return get


@pytest.mark.parametrize("family", FAMILIES)
def test_default_output_shapes_match_transformers(pipes, family):
    ours, theirs = pipes(family)
    single = ours(TEXTS[0])
    assert isinstance(single, list) and len(single) == 1 and set(single[0]) == {"label", "score"}
    assert_same(single, theirs(TEXTS[0]))
    assert_same(ours(TEXTS), theirs(TEXTS))  # one dict per input
    assert_same(ours(TEXTS, batch_size=1), theirs(TEXTS))
    assert_same(ours([TEXTS[1]]), theirs([TEXTS[1]]))


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("top_k", [1, 2, None])
def test_top_k(pipes, family, top_k):
    ours, theirs = pipes(family)
    got = ours(TEXTS[2], top_k=top_k)
    assert len(got) == (top_k or 3)
    assert [d["score"] for d in got] == sorted((d["score"] for d in got), reverse=True)
    assert_same(got, theirs(TEXTS[2], top_k=top_k))
    assert_same(ours(TEXTS, top_k=top_k), theirs(TEXTS, top_k=top_k))


# Which function applies is the pipeline's choice, not the family's: two families suffice
# (every family's head is checked above and under the sentiment-analysis alias).
@pytest.mark.parametrize("family", ["bert", "roberta"])
@pytest.mark.parametrize("labels", ["binary", "multi-label", "regression", "one-label"])
def test_label_kinds_pick_transformers_function(pipes, family, labels):
    ours, theirs = pipes(family, labels)
    expected = {"binary": "softmax", "multi-label": "sigmoid", "regression": "none", "one-label": "sigmoid"}
    assert ours.default_function() == expected[labels]
    assert_same(ours(TEXTS), theirs(TEXTS))
    assert_same(ours(TEXTS, top_k=None), theirs(TEXTS, top_k=None))
    if labels == "multi-label":  # independent sigmoids: the scores need not sum to one
        scores = [d["score"] for d in ours(TEXTS[0], top_k=None)]
        assert all(0 < s < 1 for s in scores) and abs(sum(scores) - 1) > 1e-3


@pytest.mark.parametrize("family", ["bert", "roberta"])
@pytest.mark.parametrize("function", ["softmax", "sigmoid", "none", "SIGMOID"])
def test_function_to_apply(pipes, family, function):
    ours, theirs = pipes(family, "multi-label")
    assert_same(ours(TEXTS, function_to_apply=function), theirs(TEXTS, function_to_apply=function))
    assert_same(
        ours(TEXTS[0], function_to_apply=function, top_k=None),
        theirs(TEXTS[0], function_to_apply=function, top_k=None),
    )


def test_function_to_apply_default_means_the_models_choice(pipes):
    ours, _ = pipes("bert", "multi-label")
    assert_same(ours(TEXTS, function_to_apply="default"), ours(TEXTS, function_to_apply="sigmoid"))


@pytest.mark.parametrize("family", FAMILIES)
def test_text_pairs(pipes, family):
    ours, theirs = pipes(family)
    single = ours(PAIRS[0])
    assert isinstance(single, dict)  # transformers wraps a lone string, not a lone pair
    assert_same(single, theirs(PAIRS[0]))
    assert_same(ours(PAIRS), theirs(PAIRS))
    assert_same(ours(PAIRS, top_k=None), theirs(PAIRS, top_k=None))
    mixed = [TEXTS[0], PAIRS[1]]
    assert_same(ours(mixed, top_k=2), theirs(mixed, top_k=2))


def test_bart_classifier():
    """BART classifies from the decoder state at the last EOS, in padded batches too."""
    d = tiny_seq2seq.bart_nli_dir()
    ours = pipeline("text-classification", model=d)
    theirs = transformers.pipeline("text-classification", model=d, dtype=torch.float32, device="cpu")
    assert_same(ours(TEXTS), theirs(TEXTS))
    assert_same(ours(TEXTS + PAIRS, top_k=None), theirs(TEXTS + PAIRS, top_k=None))


def test_pair_is_not_the_same_as_the_joined_text(pipes):
    ours, _ = pipes("bert")
    pair = ours(PAIRS[0], top_k=None)
    joined = ours(PAIRS[0]["text"] + " " + PAIRS[0]["text_pair"], top_k=None)
    assert pair != joined  # the second segment is encoded as a second segment


def test_sentiment_analysis_alias_and_defaults():
    d = tiny_encoders.tiny_encoder_dir("distilbert", "sequence-classification", "binary")
    ours = pipeline("sentiment-analysis", model=d, top_k=None, function_to_apply="sigmoid")
    theirs = transformers.pipeline("sentiment-analysis", model=d, dtype=torch.float32, device="cpu")
    assert ours.task == "text-classification"
    assert_same(ours(TEXTS), theirs(TEXTS, top_k=None, function_to_apply="sigmoid"))
    # With top_k among the pipeline's defaults a lone string gives its list of labels.
    # (transformers' pipeline built with top_k=None wraps that list once more, [[...]]; tokenmill
    # answers as a call with top_k=None does.)
    assert_same(ours(TEXTS[0]), theirs(TEXTS[0], top_k=None, function_to_apply="sigmoid"))
    assert_same(ours(TEXTS[0], top_k=1), theirs(TEXTS[0], top_k=1, function_to_apply="sigmoid"))


@pytest.mark.parametrize("family", ["bert", "xlm-roberta"])
def test_truncation(pipes, family):
    ours, theirs = pipes(family)
    long_text = "This goes on and on and on. " * 30
    with pytest.raises(PipelineInputError) as e:
        ours([TEXTS[0], long_text])
    assert "input 1 is" in str(e.value) and "over this model's limit of 64" in str(e.value)
    assert "truncation=True" in str(e.value)
    assert_same(ours(long_text, truncation=True), theirs(long_text, truncation=True))
    long_pair = {"text": long_text, "text_pair": "A short second text."}
    assert_same(ours(long_pair, truncation=True, top_k=None), theirs(long_pair, truncation=True, top_k=None))


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda p: p([]), "text-classification got an empty list of inputs"),
        (lambda p: p(""), "input 0 is an empty string"),
        (lambda p: p(["ok", 7]), "input 1 must be a string or a dict with 'text' and 'text_pair', got int"),
        (lambda p: p([["a", "b"]]), 'input 0 is a list; to classify a text pair pass a dict {"text"'),
        (
            lambda p: p({"txt": "a"}),
            "input 0 must be a string or a dict with 'text' and optionally 'text_pair'",
        ),
        (lambda p: p({"text": "a", "pair": "b"}), "unknown key(s) 'pair'"),
        (lambda p: p({"text": "a", "text_pair": ""}), "input 0 is an empty string"),
        (lambda p: p("ok", top_k=0), "top_k must be a positive integer or None, got 0"),
        (lambda p: p("ok", top_k="all"), "top_k must be a positive integer or None, got 'all'"),
        (
            lambda p: p("ok", function_to_apply="relu"),
            "function_to_apply must be one of 'softmax', 'sigmoid', 'none' or 'default', got 'relu'",
        ),
        (lambda p: p("ok", return_all_scores=True), "unknown option(s) 'return_all_scores'"),
    ],
)
def test_bad_calls(pipes, call, message):
    ours, _ = pipes("bert")
    with pytest.raises(ValueError) as e:
        call(ours)
    assert message in str(e.value)


def test_bad_default_fails_when_the_pipeline_is_built():
    d = tiny_encoders.tiny_encoder_dir("bert", "sequence-classification")
    with pytest.raises(ValueError, match="function_to_apply must be one of"):
        pipeline("text-classification", model=d, function_to_apply="max")


def test_checkpoint_without_classifier_is_refused():
    with pytest.raises(ValueError) as e:
        pipeline("text-classification", model="all-minilm-l6-v2")
    assert "has no weights for a sequence classification head" in str(e.value)
    assert "classifier.weight" in str(e.value)
