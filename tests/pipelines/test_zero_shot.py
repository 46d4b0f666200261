"""zero-shot-classification against transformers' pipeline on tiny NLI-labelled classifiers.

BERT, DistilBERT, RoBERTa and XLM-RoBERTa are tests/tiny_encoders.py's with the "nli" labels;
BART (the family of bart-large-mnli) is tests/tiny_seq2seq.py's bart_nli_dir(). Each
classifier's output layer is reworked so the scores spread apart and their order says
something (see _spread_scores). Same labels in the same order, scores within 1e-4.
"""

import os

import pytest
import torch
import transformers

import tiny_encoders
import tiny_seq2seq
from tokenmill import pipeline
from tokenmill.pipelines.base import PipelineInputError
from tokenmill.pipelines.zero_shot import parse_labels

NLI = {0: "contradiction", 1: "neutral", 2: "entailment"}
FAMILIES = (*tiny_encoders.FAMILIES, "bart")
SEQUENCES = [
    "The team won the match in the last minute.",
    "Parliament passed the budget after a long debate about taxes.",
    "Stir the sauce.",
]
LABELS = ["sports", "politics", "cooking", "science fiction"]


def _spread_scores(model: torch.nn.Module, id2label: dict[int, str]) -> None:
    """Make a random classifier's scores informative.

    Its pooled states barely differ between inputs, so the output layer is scaled up (labels
    spread apart across candidates), and the contradiction row is pulled towards the
    entailment row, leaving their gap (what multi_label scores) unsaturated.
    """
    n = len(id2label)
    last = [m for m in model.modules() if isinstance(m, torch.nn.Linear) and m.out_features == n][-1]
    entail = next(i for i, v in id2label.items() if v.lower().startswith("entail"))
    contra = n - 1 if entail == 0 else 0  # the row transformers reads as contradiction
    with torch.no_grad():
        last.weight.mul_(30.0)
        last.weight[contra] = last.weight[entail] + 0.1 * (last.weight[contra] - last.weight[entail])
        last.bias[contra] = last.bias[entail]


def nli_dir(family: str, id2label: dict[int, str] = NLI) -> str:
    """A tiny sequence classifier of ``family`` labelled ``id2label``, saved once per process.

    BART starts from tests/tiny_seq2seq.py's bart-large-mnli look-alike (NLI labels only).
    """
    name = "-".join(v.lower() for v in id2label.values())
    path = os.path.join(tiny_encoders._root().name, f"{family}-zero-shot-{name}")
    if os.path.isdir(path):
        return path
    if family == "bart":
        if id2label != NLI:
            raise ValueError("the tiny BART classifier comes with the NLI labels only")
        source = tiny_seq2seq.bart_nli_dir()
        model = transformers.BartForSequenceClassification.from_pretrained(source, dtype=torch.float32)
        # its position table's limit, which the tiny tokenizer does not state
        tok = transformers.AutoTokenizer.from_pretrained(source, model_max_length=tiny_encoders.MAX_LENGTH)
    else:
        cfg = tiny_encoders.hf_config(family, "sequence-classification", "nli")
        cfg.id2label, cfg.label2id = dict(id2label), {v: k for k, v in id2label.items()}
        torch.manual_seed(0)
        model = tiny_encoders.hf_class(family, "sequence-classification")(cfg)
        tok = tiny_encoders.tiny_tokenizer(family)
    model.eval()
    _spread_scores(model, id2label)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def assert_same(got, want, path="result"):
    """Equal sequences and label order; scores within 1e-4."""
    assert type(got) is type(want), f"{path}: {type(got).__name__} != {type(want).__name__}"
    if isinstance(want, list):
        assert len(got) == len(want), f"{path}: {len(got)} results, transformers has {len(want)}"
        for i, (g, w) in enumerate(zip(got, want)):
            assert_same(g, w, f"{path}[{i}]")
        return
    assert list(got) == ["sequence", "labels", "scores"] == list(want), path
    assert got["sequence"] == want["sequence"], path
    assert got["labels"] == want["labels"], f"{path}: {got['labels']} != {want['labels']}"
    torch.testing.assert_close(
        torch.tensor(got["scores"]), torch.tensor(want["scores"]), atol=1e-4, rtol=1e-4
    )


@pytest.fixture(scope="module")
def pipes():
    """(tokenmill, transformers) zero-shot pipelines per family, built once."""
    cache = {}

    def get(family, id2label=NLI):
        key = (family, tuple(id2label.values()))
        if key not in cache:
            d = nli_dir(family, id2label)
            theirs = transformers.pipeline(
                "zero-shot-classification", model=d, dtype=torch.float32, device="cpu"
            )
            cache[key] = (pipeline("zero-shot-classification", model=d), theirs)
        return cache[key]

    return get


@pytest.mark.parametrize("family", FAMILIES)
def test_single_and_batched_sequences_match_transformers(pipes, family):
    ours, theirs = pipes(family)
    got = ours(SEQUENCES[0], candidate_labels=LABELS)
    assert isinstance(got, dict) and sorted(got["labels"]) == sorted(LABELS)
    assert got["scores"] == sorted(got["scores"], reverse=True)
    assert sum(got["scores"]) == pytest.approx(1.0, abs=1e-5)
    assert_same(got, theirs(SEQUENCES[0], candidate_labels=LABELS))
    want = theirs(SEQUENCES, candidate_labels=LABELS)
    assert_same(ours(SEQUENCES, candidate_labels=LABELS), want)  # 12 rows of mixed lengths
    assert_same(ours(SEQUENCES, candidate_labels=LABELS, batch_size=1), want)
    assert_same(ours(SEQUENCES, LABELS), want)  # labels as the second positional argument


@pytest.mark.parametrize("family", FAMILIES)
def test_multi_label(pipes, family):
    ours, theirs = pipes(family)
    got = ours(SEQUENCES, candidate_labels=LABELS, multi_label=True)
    assert_same(got, theirs(SEQUENCES, candidate_labels=LABELS, multi_label=True))
    assert any(abs(sum(r["scores"]) - 1) > 1e-3 for r in got)  # each label scored on its own


@pytest.mark.parametrize("family", ["bert", "roberta"])
def test_one_label_is_scored_against_contradiction(pipes, family):
    ours, theirs = pipes(family)
    got = ours(SEQUENCES, candidate_labels=["sports"])
    assert any(r["scores"][0] < 0.999 for r in got)  # not a softmax over one label
    assert_same(got, theirs(SEQUENCES, candidate_labels=["sports"]))
    assert_same(ours(SEQUENCES, "sports", multi_label=True), theirs(SEQUENCES, "sports", multi_label=True))


@pytest.mark.parametrize("family", ["distilbert", "xlm-roberta"])
def test_comma_separated_labels_and_template(pipes, family):
    ours, theirs = pipes(family)
    labels = " sports, politics ,, cooking "
    assert parse_labels(labels) == ["sports", "politics", "cooking"]
    assert_same(ours(SEQUENCES, candidate_labels=labels), theirs(SEQUENCES, candidate_labels=labels))
    template = "The topic of this text is {}"
    assert_same(
        ours(SEQUENCES, candidate_labels=LABELS, hypothesis_template=template),
        theirs(SEQUENCES, candidate_labels=LABELS, hypothesis_template=template),
    )
    numbered = "Topic: {0}."
    assert_same(
        ours(SEQUENCES[0], candidate_labels=LABELS, hypothesis_template=numbered, multi_label=True),
        theirs(SEQUENCES[0], candidate_labels=LABELS, hypothesis_template=numbered, multi_label=True),
    )


def test_options_as_pipeline_defaults(pipes):
    _, theirs = pipes("bert")
    ours = pipeline(
        "zero-shot-classification", model=nli_dir("bert"), candidate_labels=LABELS, multi_label=True
    )
    assert_same(ours(SEQUENCES), theirs(SEQUENCES, candidate_labels=LABELS, multi_label=True))
    assert_same(  # a call's options win
        ours(SEQUENCES, candidate_labels="cooking, sports", multi_label=False),
        theirs(SEQUENCES, candidate_labels="cooking, sports"),
    )


@pytest.mark.parametrize(
    "id2label", [{0: "ENTAILMENT", 1: "NEUTRAL", 2: "CONTRADICTION"}, {0: "neutral", 1: "entails"}]
)
def test_entailment_found_by_name_anywhere(pipes, id2label):
    ours, theirs = pipes("roberta", id2label)
    entail = next(i for i, v in id2label.items() if v.lower().startswith("entail"))
    assert ours.entailment_id == entail
    # transformers' contradiction: label 0, or the last label when entailment is label 0
    assert ours.contradiction_id == (len(id2label) - 1 if entail == 0 else 0)
    for multi in (False, True):
        assert_same(
            ours(SEQUENCES, candidate_labels=LABELS, multi_label=multi),
            theirs(SEQUENCES, candidate_labels=LABELS, multi_label=multi),
        )


def test_equal_scores_keep_transformers_order(pipes):
    """Ties come out as numpy's reversed argsort puts them: the later label first."""
    from tokenmill.pipelines.base import Feature

    ours, _ = pipes("bert")
    labels = ["a", "b", "c", "d", "e"]
    entail = torch.tensor([1.0, 2.0, 1.0, 2.0, 0.5])
    outputs = [torch.tensor([0.0, 0.0, e]) for e in entail]
    features = [Feature([0], 0, meta={"label": x}) for x in labels]
    got = ours.postprocess("s", features, outputs, {})
    scores = entail.softmax(0).numpy()
    order = list(reversed(scores.argsort()))  # transformers' postprocess
    assert got["labels"] == [labels[i] for i in order] == ["d", "b", "c", "a", "e"]
    torch.testing.assert_close(torch.tensor(got["scores"]), torch.tensor(scores[order]))


@pytest.mark.parametrize("family", ["bert", "roberta"])
def test_truncation_cuts_the_sequence_only(pipes, family):
    ours, theirs = pipes(family)
    long_text = "The match went on and on into extra time. " * 12
    with pytest.raises(PipelineInputError) as e:
        ours(long_text, candidate_labels=LABELS)
    assert "input 0 is" in str(e.value) and "over this model's limit of 64" in str(e.value)
    assert "truncation=True" in str(e.value)
    # transformers truncates the sequence ("only_first") without being asked
    assert_same(
        ours([SEQUENCES[1], long_text], candidate_labels=LABELS, truncation=True),
        theirs([SEQUENCES[1], long_text], candidate_labels=LABELS),
    )
    with pytest.raises(PipelineInputError) as e:
        ours(
            "short",
            candidate_labels=["x"],
            hypothesis_template="{} " + "very long hypothesis " * 30,
            truncation=True,
        )
    assert "the hypothesis 'x very long hypothesis" in str(e.value)
    assert "shorten the label or hypothesis_template" in str(e.value)


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda p: p("text"), "zero-shot-classification needs candidate_labels, e.g."),
        (lambda p: p("text", candidate_labels=[]), "candidate_labels is empty; name at least one label"),
        (lambda p: p("text", candidate_labels=" , ,"), "candidate_labels is empty"),
        (lambda p: p("text", candidate_labels=["a", " "]), "candidate_labels must not hold empty labels"),
        (
            lambda p: p("text", candidate_labels=5),
            "candidate_labels must be a list of strings or a comma-separated",
        ),
        (lambda p: p("text", ["a"], "x"), "got 3 positional arguments"),
        (
            lambda p: p("text", candidate_labels=["a"], hypothesis_template="This example is."),
            "hypothesis_template 'This example is.' has no {} for the label to go in",
        ),
        (
            lambda p: p("text", candidate_labels=["a"], hypothesis_template="About {label}."),
            "hypothesis_template 'About {label}.' cannot be formatted with a label",
        ),
        (
            lambda p: p("text", candidate_labels=["a"], hypothesis_template=None),
            "hypothesis_template must be a string",
        ),
        (lambda p: p("text", candidate_labels=["a"], multi_label="yes"), "multi_label must be True or False"),
        (lambda p: p([], candidate_labels=["a"]), "empty list of inputs"),
        (lambda p: p(["ok", ""], candidate_labels=["a"]), "input 1 is an empty string"),
        (lambda p: p({"text": "a"}, candidate_labels=["a"]), "input 0 must be a string, got dict"),
        (lambda p: p("t", candidate_labels=["a"], labels=["b"]), "unknown option(s) 'labels'"),
    ],
)
def test_bad_calls(pipes, call, message):
    ours, _ = pipes("bert")
    with pytest.raises(ValueError) as e:
        call(ours)
    assert message in str(e.value)


def test_model_without_entailment_label_is_refused():
    d = tiny_encoders.tiny_encoder_dir("bert", "sequence-classification", "sentiment")
    with pytest.raises(ValueError) as e:
        pipeline("zero-shot-classification", model=d)
    msg = str(e.value)
    assert "is not labelled as an NLI model" in msg
    assert "label starting with 'entailment' in config.json's label2id" in msg
    assert "['negative', 'neutral', 'positive']" in msg


def test_checkpoint_without_classifier_is_refused():
    with pytest.raises(ValueError, match="has no weights for a sequence classification head"):
        pipeline("zero-shot-classification", model="all-minilm-l6-v2")
